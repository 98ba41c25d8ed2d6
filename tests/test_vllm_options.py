"""engine.generation_backend=vllm without vLLM's engine: the errors that name the option.

The engine itself is tested in ``tests/with_vllm`` (its own venv, ``.venv-vllm``).
"""

from __future__ import annotations

import sys

import pytest

from lightning_real.features import FeatureError, RuntimeFeatures
from lightning_real.layout import Layout
from lightning_real.runtime.build import check_features
from lightning_real.runtime.generation import make_generator
from lightning_real.runtime.vllm_engine import VllmUnavailable
from lightning_real.runtime.vllm_generation import check_vllm_layout


def test_a_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(VllmUnavailable, match=r"engine\.generation_backend=vllm.*lightning-real\[vllm\]"):
        make_generator("vllm")


def test_the_runtime_takes_the_backend() -> None:
    check_features(RuntimeFeatures(generation_backend="vllm"))
    with pytest.raises(FeatureError, match="allowed: native, vllm"):
        RuntimeFeatures(generation_backend="sglang")  # type: ignore[arg-type]


def test_layouts_it_cannot_run_are_refused() -> None:
    with pytest.raises(VllmUnavailable, match=r"'actor_gen' runs on d1t1p2@0-1 \(tp=1, pp=2\)"):
        check_vllm_layout(Layout.parse("d1t1p2@0-1"), 2, "actor_gen")
    with pytest.raises(VllmUnavailable, match=r"tp=2, pp=1"):
        check_vllm_layout(Layout.parse("d1t2p1@0-1"), 2, "actor_gen")
    with pytest.raises(VllmUnavailable, match=r"2 of the 4 ranks"):
        check_vllm_layout(Layout.parse("d2t1p1@0-1"), 4, "actor_gen")
    check_vllm_layout(Layout.parse("d4t1p1@0-3"), 4, "actor_gen")  # what it runs

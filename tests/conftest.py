"""Keep the CPU tests on CPU on machines with GPUs: only ``cuda``-marked tests see the GPUs."""

from __future__ import annotations

import pytest

from lightning_real.distributed.launch import BACKEND_ENV


@pytest.fixture(autouse=True)
def _cpu_unless_marked_cuda(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("cuda") is None:
        # Spawned workers start fresh, so hiding the GPUs here keeps them (and megatron) on CPU.
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        monkeypatch.setenv(BACKEND_ENV, "gloo")

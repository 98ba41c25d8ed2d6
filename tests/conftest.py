"""Keep the CPU tests on CPU on machines with GPUs: only ``cuda``-marked tests see the GPUs."""

from __future__ import annotations

import os

import pytest

from lightning_real.distributed.launch import BACKEND_ENV

# tests/with_vllm need vLLM, which lives in its own venv (scripts/setup_vllm.sh): .ci/run runs
# them there with LREAL_VLLM_TESTS=1, and the plain run leaves the folder to that line.
collect_ignore = [] if os.environ.get("LREAL_VLLM_TESTS") == "1" else ["with_vllm"]


@pytest.fixture(autouse=True)
def _cpu_unless_marked_cuda(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("cuda") is None:
        # Spawned workers start fresh, so hiding the GPUs here keeps them (and megatron) on CPU.
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        monkeypatch.setenv(BACKEND_ENV, "gloo")

"""The runtime's moves know the node size: cross-node bytes are the ones the plan predicts.

Four gloo processes form two "nodes" of two (ranks 0-1, 2-3). A move's plan prefers senders on the
receiver's node, so the bytes that cross nodes are exactly those no holder on the receiver's node
has: ``realloc_bytes(...).bytes_cross_node`` with 2 devices per node. The bytes are counted where
they really went (each rank's bytes per receiving rank), and classified here by the true node
size; a runtime planning with another node size (8 on one node, say) sends d2t2p1 -> d4t1p1's
bytes across nodes (729,088 of them for this model) where 0 need to.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_real.layout import Layout
from lightning_real.models.spec import tiny_spec
from lightning_real.realloc import plan_realloc, realloc_bytes

SCRIPT = Path(__file__).parent / "scripts" / "node_moves.py"
DEMO = {  # examples/ppo_demo.py's plan
    "actor_gen": "d2t2p1",
    "ref_inf": "d2t1p1@0-1",
    "rew_inf": "d2t1p1@2-3",
    "critic_inf": "d2t1p1@2-3",
    "actor_train": "d1t2p2",
    "critic_train": "d1t2p2",
}
NODE_LOCAL = {**DEMO, "actor_train": "d2t2p1", "actor_gen": "d4t1p1"}
"""The actor trains under d2t2p1 and generates under d4t1p1: every byte it needs is on its node
(each node holds a whole replica), but a plan made for one node of 8 sends 729,088 bytes between
the nodes."""


def _moves(out: Path) -> tuple[set[int], dict[tuple[str, str, str], int]]:
    """Node sizes the ranks used, and (role, src, dst) -> bytes that crossed nodes of 2."""
    sizes: set[int] = set()
    cross: dict[tuple[str, str, str], int] = {}
    for rank in range(4):
        doc = json.loads((out / f"moves-rank{rank}.json").read_text())
        sizes.add(doc["node_size"])
        for m in doc["moves"]:
            key = (m["role"], m["src"], m["dst"])
            sent = sum(n for dst, n in m["sent_to"].items() if int(dst) // 2 != rank // 2)
            cross[key] = cross.get(key, 0) + sent
    return sizes, cross


def _predicted(role: str, src: str, dst: str) -> int:
    spec = tiny_spec("llama", head="value" if role == "critic" else "lm")
    return realloc_bytes(
        spec, Layout.parse(src), Layout.parse(dst), gpus_per_node=2, element_size=4
    ).bytes_cross_node


def _check(out: Path, plan: dict[str, str]) -> dict[tuple[str, str, str], int]:
    sizes, cross = _moves(out)
    assert sizes == {2}
    moved = {
        (r, plan[a], plan[b])
        for r, a, b in (("actor", "actor_train", "actor_gen"), ("critic", "critic_train", "critic_inf"))
    }
    resolved = {(r, str(Layout.parse(s).resolve(4)), str(Layout.parse(d).resolve(4))) for r, s, d in moved}
    assert set(cross) == resolved
    for (role, src, dst), n in cross.items():
        assert n == _predicted(role, src, dst), (role, src, dst)
    return cross


@pytest.mark.timeout(300)
def test_moves_cross_nodes_as_planned_with_gpus_per_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The spawned workers import the script's callback by module name.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SCRIPT.parent), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from node_moves import run  # type: ignore[import-not-found]

    run(tmp_path / "demo", DEMO, gpus_per_node=2)
    cross = _check(tmp_path / "demo", DEMO)
    # the demo's actor moves from d1t2p2 (stages on different nodes) to d2t2p1: half its layers cross
    assert cross[("actor", "d1t2p2@0-3", "d2t2p1@0-3")] > 0
    run(tmp_path / "local", NODE_LOCAL, gpus_per_node=2)
    cross = _check(tmp_path / "local", NODE_LOCAL)
    assert cross[("actor", "d2t2p1@0-3", "d4t1p1@0-3")] == 0
    # ... where a plan made for one node of 8 would send bytes between ranks 0-1 and 2-3
    blind = plan_realloc(
        tiny_spec("llama"), Layout.parse("d2t2p1@0-3"), Layout.parse("d4t1p1@0-3"), gpus_per_node=8
    )
    assert sum(m.nbytes for m in blind.messages if m.src // 2 != m.dst // 2) == 729_088


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(300)
def test_node_size_comes_from_torchrun_local_world_size(tmp_path: Path) -> None:
    # Two torchrun "nodes" of 2 processes on loopback; RealStrategy is given no gpus_per_node.
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "LOCAL_WORLD"))}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "2",
                "--node-rank",
                str(node),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                str(SCRIPT),
                str(tmp_path / "out"),
                json.dumps(NODE_LOCAL),
            ],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    results = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    cross = _check(tmp_path / "out", NODE_LOCAL)
    assert cross[("actor", "d2t2p1@0-3", "d4t1p1@0-3")] == 0

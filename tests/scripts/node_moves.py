"""One PPO iteration of tiny models on 4 processes; each rank writes the moves it took part in.

Run in-process by ``tests/test_node_moves.py`` (Lightning spawns 4 workers) or under torchrun as
two "nodes" of 2 processes on loopback (``python -m torch.distributed.run --nnodes 2 ...``); then
``RealStrategy`` gets no ``gpus_per_node`` and must take torchrun's ``LOCAL_WORLD_SIZE``.

    python tests/scripts/node_moves.py OUT PLAN_JSON [GPUS_PER_NODE]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from lightning import Callback, Trainer

from lightning_real.data.modules import PromptDataModule
from lightning_real.data.task import asset
from lightning_real.models.generate import GenerationConfig
from lightning_real.models.spec import tiny_spec
from lightning_real.modules.ppo import PPOModule
from lightning_real.strategy import RealStrategy


class DumpMoves(Callback):
    """Every rank writes ``moves-rank{r}.json``: each move's role, layouts and bytes per receiver."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer: Trainer, module: Any) -> None:
        moves = [
            {
                "role": m.role,
                "src": str(m.src),
                "dst": str(m.dst),
                "sent_to": {str(k): v for k, v in m.stats.sent_to.items()},
            }
            for m in module.pool.moves
        ]
        doc = {"node_size": trainer.strategy.node_size, "moves": moves}
        (self.out / f"moves-rank{trainer.global_rank}.json").write_text(json.dumps(doc))


def run(out: Path, plan: dict[str, str], gpus_per_node: int | None, nodes: int = 1) -> None:
    out.mkdir(parents=True, exist_ok=True)
    strategy = RealStrategy(
        plan=plan, gpus_per_node=gpus_per_node, start_method="spawn" if nodes == 1 else "popen"
    )
    trainer = Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=4 // nodes,
        num_nodes=nodes,
        max_steps=1,
        logger=False,
        callbacks=[DumpMoves(out)],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    module = PPOModule(tiny_spec("llama"), batch_size=8, generation=GenerationConfig(max_new_tokens=4))
    trainer.fit(module, datamodule=PromptDataModule(asset("prompts"), batch_size=8, max_prompt_len=24))


if __name__ == "__main__":
    run(Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None, nodes=2)

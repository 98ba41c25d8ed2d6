"""Metrics of a run over steps as a PNG: ``lightning-real plot runs/ppo --out reward_kl.png``.

Reads the newest ``metrics.csv`` under the run folder (a recipe's ``output_dir`` or a
``CSVLogger`` folder) and draws one panel per metric.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

DEFAULT_KEYS: tuple[str, ...] = ("reward/mean", "actor/ref_kl")
"""Reward and KL against the reference: what an RLHF run is read by first."""


class PlotError(ValueError):
    """A run folder without metrics, or a metric the run did not log."""


def read_metrics(run: str | Path) -> list[dict[str, str]]:
    """Rows of the newest ``metrics.csv`` under ``run`` (a file path is read as is)."""
    path = Path(run)
    if path.is_dir():
        files = sorted(path.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
        if not files:
            raise PlotError(f"no metrics.csv under {path}; was the run logged with logger=csv or wandb?")
        path = files[-1]
    elif not path.is_file():
        raise PlotError(f"run folder {path} does not exist")
    with open(path) as f:
        return list(csv.DictReader(f))


def _step(row: dict[str, str], key: str) -> int:
    # A validation metric is drawn at the training steps its weights had taken (val/step), not
    # at Lightning's logging step (one less, and 0 for the evaluation before training too).
    if key.startswith("val/") and row.get("val/step") not in (None, ""):
        return int(float(row["val/step"]))
    return int(row["step"])


def series(rows: list[dict[str, str]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, skipping rows that do not carry it."""
    pts = [(_step(r, key), float(r[key])) for r in rows if r.get(key) not in (None, "")]
    if not pts:
        have = sorted(k for k in (rows[0] if rows else {}) if k != "step")
        raise PlotError(f"metric {key!r} is not in the run; logged: {', '.join(have[:40])}")
    return [s for s, _ in pts], [v for _, v in pts]


def plot(run: str | Path, out: str | Path, keys: Sequence[str] = DEFAULT_KEYS) -> Path:
    """Draw ``keys`` over steps into ``out`` (PNG); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run)
    data = [(k, *series(rows, k)) for k in keys]
    fig, axes = plt.subplots(1, len(data), figsize=(4.2 * len(data), 3.2), squeeze=False)
    for ax, (key, steps, values) in zip(axes[0], data):
        ax.plot(steps, values, marker="o" if len(steps) <= 40 else None, markersize=3)
        ax.set(title=key, xlabel="step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

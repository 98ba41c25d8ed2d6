"""An execution plan: a layout (with explicit ranks) and a microbatch count for every call."""

from __future__ import annotations

from dataclasses import dataclass, field

from lightning_real.layout import Layout


@dataclass(frozen=True)
class Plan:
    """Where and how each call of a workload runs; ``layouts`` is what the runtime consumes."""

    layouts: dict[str, Layout]
    """Call name -> resolved layout (explicit ranks)."""
    microbatches: dict[str, int]
    """Call name -> microbatches per data-parallel replica."""
    name: str = field(default="plan", compare=False)
    """Label for reports ('search', 'symmetric', ...)."""

    def __post_init__(self) -> None:
        if set(self.layouts) != set(self.microbatches):
            raise ValueError(
                f"Plan {self.name}: layouts name {sorted(self.layouts)} but microbatches name {sorted(self.microbatches)}"
            )
        for call, lay in self.layouts.items():
            if lay.ranks is None:
                raise ValueError(f"Plan {self.name}: layout of {call} ({lay}) has no explicit ranks")
        for call, m in self.microbatches.items():
            if m < 1:
                raise ValueError(f"Plan {self.name}: microbatches of {call} must be >= 1, got {m}")

    def to_strings(self) -> dict[str, str]:
        """Call name -> layout string (``d4t1p2@0-7``), as plan files and configs spell it."""
        return {k: str(v) for k, v in self.layouts.items()}

    def with_name(self, name: str) -> Plan:
        """The same plan under another label."""
        return Plan(dict(self.layouts), dict(self.microbatches), name)

"""Pure parts of `gen bench`: the interleaved run order, medians and spreads, ratios, targets.

A benchmark compares runs measured side by side: every run once per repeat, in the same order
(A B C A B C ...), so slow drift of the machine (thermal, other jobs) hits every run alike. A
ratio is taken of medians; its spread comes from the per-repeat ratios of runs that sat next
to each other in the order (paired), which cancels drift better than min/max of each side.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def interleave(names: Sequence[str], repeats: int) -> list[tuple[int, str]]:
    """The run order: every name once per repeat, in the given order.

    Args:
        names: distinct run names, in the order they run within a repeat.
        repeats: repeats, >= 1.
    Returns:
        (repeat index, name) pairs: [(0, A), (0, B), (1, A), (1, B), ...].
    Raises:
        ValueError: repeats < 1, or duplicate names.
    """
    if repeats < 1:
        raise ValueError(f"repeats {repeats} is invalid: must be >= 1")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate run names in {list(names)}")
    return [(r, n) for r in range(repeats) for n in names]


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median and spread of repeated measurements.

    Args:
        values: n >= 1 measurements.
    Returns:
        {"median", "min", "max", "q1", "q3", "n"}: quartiles by the "inclusive" method
        (Python's statistics.quantiles), equal to the median when n < 2.
    Raises:
        ValueError: no values.
    """
    if not values:
        raise ValueError("no values to summarize")
    vals = [float(v) for v in values]
    med = statistics.median(vals)
    q1, q3 = (statistics.quantiles(vals, n=4, method="inclusive")[i] for i in (0, 2)) if len(vals) > 1 else (med, med)
    return {"median": med, "min": min(vals), "max": max(vals), "q1": q1, "q3": q3, "n": len(vals)}


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Per-repeat ratios a_i / b_i of two interleaved runs.

    Raises:
        ValueError: lengths differ, or a denominator is <= 0.
    """
    if len(numerators) != len(denominators):
        raise ValueError(f"{len(numerators)} numerators vs {len(denominators)} denominators")
    if any(b <= 0 for b in denominators):
        raise ValueError(f"non-positive denominator in {list(denominators)}")
    return [a / b for a, b in zip(numerators, denominators)]


@dataclass(frozen=True, kw_only=True)
class Target:
    """A goal a ratio should meet, e.g. images/s gen / plain >= 1.0."""

    op: str
    """">=", ">" or "<="."""
    value: float
    """The bound."""

    def __post_init__(self) -> None:
        if self.op not in (">=", ">", "<="):
            raise ValueError(f"target operator {self.op!r} is invalid: one of >=, >, <=")

    def met(self, ratio: float) -> bool:
        """Whether ``ratio`` meets the target."""
        return {">=": ratio >= self.value, ">": ratio > self.value, "<=": ratio <= self.value}[self.op]

    def shortfall(self, ratio: float) -> float:
        """How far ``ratio`` is from the bound, relative to it: 0 when met, else > 0 (0.05 = 5%)."""
        if self.met(ratio):
            return 0.0
        return abs(self.value - ratio) / abs(self.value) if self.value else abs(ratio)

    def describe(self) -> str:
        """E.g. ">= 1.85"."""
        return f"{self.op} {self.value:g}"


def compare(name: str, numerators: Sequence[float], denominators: Sequence[float], *,
            what: str, target: Target | None = None) -> dict[str, Any]:  # fmt: skip
    """A ratio of two runs' repeated figures: median over median, with the paired spread.

    Args:
        name: the comparison's name, e.g. "cfg parallel".
        numerators, denominators: the runs' figures per repeat, in run order (same length).
        what: what the ratio means, e.g. "generate_wall_s 1 rank / 2 ranks (speed-up)".
        target: a goal for the ratio of medians, or None.
    Returns:
        {"name", "what", "ratio" (median / median), "paired" (spread of per-repeat ratios),
        "target" (e.g. ">= 1.85" or None), "met" (bool or None), "shortfall" (relative, 0 when
        met, None without target)}.
    Raises:
        ValueError: see paired_ratios.
    """
    ratio = statistics.median(numerators) / statistics.median(denominators)
    result: dict[str, Any] = {
        "name": name,
        "what": what,
        "ratio": ratio,
        "paired": spread(paired_ratios(numerators, denominators)),
        "target": None,
        "met": None,
        "shortfall": None,
    }
    if target is not None:
        result.update(target=target.describe(), met=target.met(ratio), shortfall=target.shortfall(ratio))
    return result


def best(figures: dict[str, Sequence[float]]) -> str:
    """The name whose median is highest (e.g. images/s over a batch-size sweep).

    Raises:
        ValueError: no figures.
    """
    if not figures:
        raise ValueError("nothing to choose from")
    return max(figures, key=lambda k: statistics.median(figures[k]))

"""The report's headline: one or two sentences computed from the numbers and their intervals.

It says what moved only where the 95% interval excludes zero, says "no measurable difference" where
it does not, and names the measure and the comparison, so a reader can check every word against the
table below it. It never says "the student learned X" from a point estimate alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Estimate", "StyleShift", "headline"]


@dataclass(frozen=True)
class Estimate:
    value: float
    lo: float
    hi: float

    @property
    def known(self) -> bool:
        return not any(math.isnan(x) for x in (self.value, self.lo, self.hi))

    @property
    def sign(self) -> int:
        """+1 / -1 when the whole interval is above / below zero, else 0 (no measurable difference)."""
        if not self.known:
            return 0
        return 1 if self.lo > 0 else -1 if self.hi < 0 else 0

    def text(self, digits: int = 3) -> str:
        return f"{self.value:+.{digits}f} [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}]"


@dataclass(frozen=True)
class StyleShift:
    measure: str  # e.g. "judge win rate against the teacher"
    delta: Estimate  # student − base, oriented so that positive = closer to the teacher
    unit: str = ""
    toward: str = "moved toward the teacher"  # what a positive / negative delta says about the student
    away: str = "moved away from the teacher"


def headline(student: str, base: str, style: StyleShift | None, substance: Estimate | None,
             substance_note: str = "") -> list[str]:
    """Sentences for the student vs the base: style shift toward the teacher, substance change."""
    out = []
    if style is None or not style.delta.known:
        out.append(f"Style: no trustworthy style measure for {student} vs {base} (no calibrated judge verdicts and "
                   "no teacher-likeness scores).")
    elif style.delta.sign > 0:
        out.append(f"Style: {student} {style.toward}: {style.measure} {style.delta.text()}{style.unit} "
                   f"relative to {base}.")
    elif style.delta.sign < 0:
        out.append(f"Style: {student} {style.away}: {style.measure} {style.delta.text()}{style.unit} "
                   f"relative to {base}.")
    else:
        out.append(f"Style: no measurable difference between {student} and {base} in {style.measure} "
                   f"({style.delta.text()}{style.unit}; the interval includes 0).")
    note = f" ({substance_note})" if substance_note else ""
    if substance is None or not substance.known:
        out.append(f"Substance: no benchmark scores shared by {student} and {base}.")
    elif substance.sign == 0:
        out.append(f"Substance: no measurable difference: {student} − {base} = {substance.text()} mean benchmark "
                   f"score{note}; the interval includes 0.")
    else:
        verb = "gained" if substance.sign > 0 else "lost"
        out.append(f"Substance: {student} {verb} capability: {student} − {base} = {substance.text()} mean benchmark "
                   f"score{note}.")
    if style is not None and style.delta.sign > 0 and substance is not None and substance.known \
            and substance.sign <= 0:
        out.append("Together: it looks more like the teacher without measurably knowing more — the false promise "
                   "of imitation, on these measures.")
    return out

"""Backoff schedules: the delays of every retry loop, defined in one place.

A schedule grows a first delay by a factor per attempt, caps it, and scales it by a
random draw (jitter) so that many processes retrying together spread out.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass(frozen=True)
class Backoff:
    """``first × factor^(attempt-1)``, capped at ``cap``, times a draw from ``jitter``."""

    first: float
    """Seconds before the first retry (before jitter)."""
    factor: float
    """Growth per attempt."""
    cap: float
    """The longest delay, jitter included."""
    jitter: tuple[float, float] = (0.5, 1.0)
    """The delay is scaled by a uniform draw from this range; ``(1, 1)`` for none."""

    def base(self, attempt: int) -> float:
        """The delay before retry ``attempt`` (1-based), without jitter."""
        # The exponent is bounded so that a long outage cannot overflow the float.
        return min(self.cap, self.first * self.factor ** min(max(attempt - 1, 0), 64))

    def delay(self, attempt: int, draw: float | None = None) -> float:
        """The delay before retry ``attempt`` (1-based); ``draw`` in [0, 1) fixes jitter."""
        low, high = self.jitter
        scale = low + (high - low) * (random.random() if draw is None else draw)
        return min(self.cap, self.base(attempt) * scale)

"""Exponential backoff with full jitter, shared by every reconnect and restart loop."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays of ``initial_s * factor**n`` capped at ``max_s``, with jitter so a fleet does not sync up.

    ``jitter`` is the fraction of the delay that is randomised (0 = none, 1 = full jitter).
    """

    initial_s: float = 1.0
    max_s: float = 60.0
    factor: float = 2.0
    jitter: float = 0.5
    attempts: int = 0
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def next_delay_s(self) -> float:
        """The delay before the next attempt; counts the attempt."""
        base = min(self.max_s, self.initial_s * self.factor**self.attempts)
        self.attempts += 1
        return base * (1.0 - self.jitter) + base * self.jitter * self._rng.random()

    def reset(self) -> None:
        """Back to the initial delay after a success."""
        self.attempts = 0

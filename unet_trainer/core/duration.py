"""Durations of training time: ``200ep``, ``1000ba``, ``64sp``.

Its own module (not in :mod:`unet_trainer.config`) because the trainer and the callbacks use it and
the config's schema is derived from the callbacks' signatures, which would otherwise import in a
circle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

DURATION_UNITS = {"ep": "epochs", "ba": "batches", "sp": "samples"}
_DURATION_RE = re.compile(r"^\s*(\d+)\s*(ep|ba|sp)\s*$")


@dataclass(frozen=True)
class Duration:
    """A span of training time: ``value`` epochs (``ep``), batches (``ba``) or samples (``sp``)."""

    value: int
    unit: str

    @classmethod
    def parse(cls, raw: Any) -> Duration:
        """Parse ``"200ep"``, ``"1000ba"``, ``"64sp"`` or a plain non-negative integer (epochs).

        Raises:
            ValueError: for anything else (the message says which forms are accepted).
        """
        if isinstance(raw, Duration):
            return raw
        if isinstance(raw, bool):
            raise ValueError(f"{raw!r} is not a duration")
        if isinstance(raw, int):
            if raw < 0:
                raise ValueError(f"{raw!r} is negative")
            return cls(raw, "ep")
        if isinstance(raw, str):
            match = _DURATION_RE.match(raw)
            if match:
                return cls(int(match.group(1)), match.group(2))
            if raw.strip().isdigit():
                return cls(int(raw), "ep")
        raise ValueError(f"{raw!r} is not a duration (use Nep, Nba or Nsp, e.g. 200ep, 1000ba, 64sp)")

    def __str__(self) -> str:
        return f"{self.value}{self.unit}"

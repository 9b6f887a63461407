"""The checks and limits every layer shares, defined once (layer 0: imports nothing of fastddpm).

Each check raises a one-line error naming the argument and what was expected.
"""
from __future__ import annotations

import operator
from typing import Sequence

__all__ = ["SEED_LIMIT", "SAMPLE_INDEX_LIMIT", "is_int", "check_seed", "check_choice"]

# Seeds key the 64-bit Philox stream: [0, 2**63), so that they also fit an int64 device tensor.
SEED_LIMIT = 2**63
# A sample's global index is the Philox counter's 32-bit sample word.
SAMPLE_INDEX_LIMIT = 2**32


def is_int(value) -> bool:
    """An int-like value (int, numpy integer, ...) that is not a bool or a tensor."""
    if isinstance(value, bool) or type(value).__module__.startswith("torch"):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def check_seed(value, name: str = "seed") -> int:
    """``value`` as an int in [0, SEED_LIMIT), else a ValueError naming ``name``."""
    if not (is_int(value) and 0 <= value < SEED_LIMIT):
        raise ValueError(f"{name} must be an int in [0, 2**63), got {value!r}")
    return operator.index(value)


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else a ValueError naming ``name`` and the choices."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value

"""The checks and limits every layer shares, defined once (layer 0: imports nothing of fastddpm).

Each check raises a one-line error naming the argument and what was expected.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Optional, Sequence

__all__ = ["SEED_LIMIT", "SAMPLE_INDEX_LIMIT", "is_int", "is_real", "check_int", "check_real", "check_positive",
           "check_bool", "check_seed", "draw_seed", "check_choice"]

# Seeds key the 64-bit Philox stream: [0, 2**63), so that they also fit an int64 device tensor.
SEED_LIMIT = 2**63
# A sample's global index is the Philox counter's 32-bit sample word.
SAMPLE_INDEX_LIMIT = 2**32


def _is_bool(value) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy's bool too


def is_int(value) -> bool:
    """An int-like value (int, numpy integer, ...) that is not a bool or a tensor."""
    if _is_bool(value) or type(value).__module__.startswith("torch"):
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


def draw_seed() -> int:
    """A seed from torch's global RNG (so ``torch.manual_seed`` reproduces it), in [0, SEED_LIMIT - 1)."""
    import torch

    return int(torch.randint(0, SEED_LIMIT - 1, (), dtype=torch.int64))


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else a ValueError naming ``name`` and the choices."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def is_real(value) -> bool:
    """A finite real number (int, float, numpy scalar) that is not a bool."""
    return isinstance(value, numbers.Real) and not _is_bool(value) and math.isfinite(value)


def _at_least(minimum: int) -> str:
    return {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")


def check_int(name: str, value, minimum: int = 0) -> int:
    """``value`` as an int >= ``minimum``, else a ValueError naming ``name``."""
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be {_at_least(minimum)}, got {value!r}")
    return operator.index(value)


def check_real(name: str, value) -> float:
    """``value`` as a finite float, else a ValueError naming ``name``."""
    if not is_real(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_positive(name: str, value, *, maximum: Optional[float] = None, allow_zero: bool = False) -> float:
    """``value`` as a float > 0 (>= 0 with ``allow_zero``), at most ``maximum``; else a ValueError."""
    kind = "a non-negative number" if allow_zero else "a positive number"
    bound = f" <= {maximum}" if maximum is not None else ""
    if not is_real(value) or value < 0 or (value == 0 and not allow_zero) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {kind}{bound}, got {value!r}")
    return float(value)


def check_bool(name: str, value) -> bool:
    """``value`` if it is a bool (numpy's too), else a TypeError naming ``name``."""
    if not _is_bool(value):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)

"""Checks shared by the benchmark tests: positive finite timings and strict JSON reports."""

import json
import math


def positive(value) -> bool:
    """A float that is finite and > 0 (a timing, a rate, a ratio)."""
    return isinstance(value, float) and math.isfinite(value) and value > 0


def strict_loads(text: str):
    """``json.loads`` that refuses the non-standard constants NaN and ±Infinity."""
    def reject(constant):
        raise ValueError(f"non-strict JSON constant {constant}")

    return json.loads(text, parse_constant=reject)

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


def last_line_report(stdout: str, benchmark: str) -> dict:
    """The report a benchmark prints as its last stdout line: one strict JSON object whose
    ``benchmark`` field names it."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "the benchmark printed nothing"
    report = strict_loads(lines[-1])
    assert isinstance(report, dict) and report.get("benchmark") == benchmark, lines[-1][:200]
    return report

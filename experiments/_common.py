"""Plumbing shared by the experiments' ``main`` functions (no mathematics here)."""

from __future__ import annotations

import json
import math
import os
import sys
import time


def strict_json(value):
    """``value`` with every non-finite float replaced by ``None`` (JSON has no NaN or inf)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_json(path: str, payload: dict) -> None:
    """Write ``payload`` as strict JSON atomically (temporary file, then rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(strict_json(payload), f, indent=1, allow_nan=False)
    os.replace(tmp, path)


def publishable(payload: dict, figures: list[str], verdict, started: float) -> dict:
    """A study's payload ready for its JSON: private (``_``) keys dropped, the figure file
    names, ``verdict(payload)`` and the total runtime since ``started`` (``time.perf_counter``)."""
    payload = {k: v for k, v in payload.items() if not k.startswith("_")}
    payload["figures"] = [os.path.basename(f) for f in figures]
    payload["verdict"] = verdict(payload)
    payload["runtime_s"]["total"] = time.perf_counter() - started
    return payload


def run_or_exit(run, args):
    """``run(args)``, turning a ``ValueError`` (bad input) into a message and exit status 2."""
    try:
        return run(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None

"""The crossover map on its smoke preset: the grid, the JSON contract and the figure (not the science)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_crossover_map_smoke(tmp_path):
    out = tmp_path / "map"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.crossover_map", "--preset", "smoke", "--out", str(out), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "crossover_map.json").read_text())
    cells = result["cells"]
    assert len(cells) == 2 * 2 * 2 and result["target"] == "true_velocity"
    for c in cells:
        assert c["class_radius"] == c["distance"] - c["data_offset"]
        for name in ("cfg", "cfg-star"):
            r = c[name]
            assert 0 <= r["frac_zero_beats_early"] <= 1 and len(r["err"]) == len(result["epochs"])
            assert r["reproduced"] == (r["zero_beats_early"] and r["crossover"]["found"])
            # zero beats the network mean at some epoch >= 1, recomputed from the stored curve
            assert r["zero_beats_early"] == any(e >= 1 and v > r["err_zero"] for e, v in zip(result["epochs"], r["err"]))
        # the exact CFG bias at t = 0 is (w - 1)·‖μ_c − μ̄‖, with ‖μ_c − μ̄‖ the class radius
        assert abs(c["cfg"]["guidance_bias"] - (c["scale"] - 1) * c["class_radius"]) < 1e-3 * max(1.0, c["cfg"]["guidance_bias"])
    assert set(result["summary"]) == {"cfg", "cfg-star"} and result["summary"]["cfg"]["cells"] == 8
    allowed = sum(c["cfg"]["guidance_bias"] < c["cfg"]["err_zero"] for c in cells)
    assert result["summary"]["cfg"]["bias_below_zero_line"] == allowed
    assert (out / "crossover_map.png").exists() and (out / "crossover_map.pdf").exists()
    assert "reproduced in" in proc.stdout

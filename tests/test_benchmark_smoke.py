"""The GPU benchmark scripts' --smoke modes: the same code as on the device, on tiny sizes on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def smoke(script: str, out: Path) -> dict:
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--smoke", "--out-dir", str(out)],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr
    return json.loads((out / f"{script.removesuffix('.py')}.json").read_text())


def test_sau_speed_smoke(tmp_path):
    results = smoke("sau_speed.py", tmp_path)
    speed = results["speed"]["cnn-small"]
    assert speed["lean_gflop_per_image_round"] > 0
    for path in ("backdoorbench", "reference", "fast"):
        figures = speed[path]
        assert figures["round_s"] > 0 and figures["first_round_s"] > 0 and figures["achieved_tflops"] > 0, path
        assert figures["trial_s"] > figures["round_s"]
    # On the CPU the fast path computes in fp32, op for op: delta agrees everywhere, the gradient to rounding.
    agreement = results["agreement"]["cnn-small"]
    assert agreement["dtype"] == "float32" and agreement["delta_agreement"] == 1.0
    assert agreement["grad_rel_error"] < 1e-5 and max(agreement["loss_rel_diff"].values()) < 1e-5
    assert results["attack_training"]["seconds"] > 0 and 0 <= results["attack_training"]["acc"] <= 1
    outcome = results["outcome"]
    assert {k: outcome["fast"][k] for k in ("acc", "asr", "ra")} == {k: outcome["reference"][k]
                                                                    for k in ("acc", "asr", "ra")}
    assert results["environment"]["command"].endswith("--smoke --out-dir " + str(tmp_path))


def test_packing_smoke(tmp_path):
    packing = smoke("packing.py", tmp_path)["packing"]["cnn-small"]
    assert set(packing) == {"1", "2"}
    for concurrency, figures in packing.items():
        assert len(figures["process_s"]) == int(concurrency)
        assert figures["trials_per_hour"] > 0 and figures["wall_s"] >= max(figures["process_s"]) * 0.999
    assert packing["1"]["gain"] == 1.0

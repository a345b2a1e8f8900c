"""`make gpu-check` (issue 23 §4): without CUDA it says so and exits 0; its stages cover every bundle's training →
evaluation → inference and the benchmarks' CUDA paths; the runner keeps to its budgets, skips what depends on a
failed stage and writes one figures file."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check
_spec.loader.exec_module(gpu_check)

BUNDLES = ("capsule", "glimpse", "wsi", "dermoscopy")


def test_without_cuda_it_says_so_and_exits_0(tmp_path: Path) -> None:
    recipe = subprocess.run(["make", "-s", "-n", "-C", str(ROOT), "gpu-check", f"GPU_CHECK_DIR={tmp_path / 'out'}"],
                            capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1].split()
    assert recipe[1:] == ["benchmarks/gpu_check.py", "--out", str(tmp_path / "out")]
    proc = subprocess.run([sys.executable, *recipe[1:]], cwd=ROOT, env={"PATH": "/usr/bin:/bin",
                          "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("gpu-check: no CUDA device here")
    assert not (tmp_path / "out").exists()  # nothing run, nothing written


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_stages_cover_every_bundle_and_the_cuda_benchmarks(device: str, tmp_path: Path) -> None:
    stages = gpu_check.build_stages(tmp_path, device, tiny=device == "cpu")
    names = [s.name for s in stages]
    for bundle in BUNDLES:
        steps = [n.split("/")[1] for n in names if n.startswith(f"{bundle}/")]
        assert steps[-3:] == ["train", "evaluate", "infer"]  # in that order, after the data
        train = next(s for s in stages if s.name == f"{bundle}/train")
        assert train.argv[train.argv.index("--max_epochs") + 1] in ("1", "2")
        assert all(n in names for n in train.needs)
    bench = {n: s.argv for n, s in ((s.name, s) for s in stages) if n.startswith("bench/")}
    assert set(bench) == {"bench/gradcam", "bench/gain_step", "bench/saliency", "bench/wsi_inference",
                          "bench/study_inference"}
    assert all(argv[argv.index("--device") + 1] == device for argv in bench.values())
    assert ("--amp" in bench["bench/study_inference"]) == (device == "cuda")
    for stage in stages:  # every script and config named exists; every output goes under the work folder
        for word in stage.argv:
            if word.endswith((".py", ".yaml", ".json")) and not word.startswith("["):
                assert (ROOT / word).is_file() or Path(word).is_file() or Path(word).is_relative_to(tmp_path), word
    if device == "cuda":  # the GPU run uses the bundles' own networks, not the CPU stand-in
        assert "small_cnn" not in " ".join(" ".join(s.argv) for s in stages if not s.name.startswith("bench/"))


def test_runner_budgets_dependencies_and_figures_file(tmp_path: Path) -> None:
    ok = [sys.executable, "-c", "print('fine')"]
    figures = tmp_path / "metrics.json"
    figures.write_text(json.dumps({"test_auc": 0.9, "nested": {"x": 1}}))
    stages = [
        gpu_check.Stage("a/data", ok, 30),
        gpu_check.Stage("a/train", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], 30,
                        needs=("a/data",)),
        gpu_check.Stage("a/evaluate", ok, 30, needs=("a/train",)),
        gpu_check.Stage("b/train", [sys.executable, "-c", "import time; time.sleep(30)"], 1),
        gpu_check.Stage("c/evaluate", ok, 30, figures=(figures,)),
        gpu_check.Stage("bench/x", ok, 30),
    ]
    records = gpu_check.run_stages(stages, 60, {"PATH": "/usr/bin:/bin"}, jobs=2)
    status = {r["stage"]: r["status"] for r in records}
    assert status == {"a/data": "passed", "a/train": "failed (exit 3)", "a/evaluate": "skipped: a/train did not pass",
                      "b/train": "timed out after 1 s", "c/evaluate": "passed", "bench/x": "passed"}
    assert records[1]["output"] == ["boom"] and records[3]["seconds"] < 10
    assert records[4]["figures"] == {"test_auc": 0.9} and records[5]["output"] == ["fine"]
    report = {"machine": {"device": "X", "torch": "t", "cuda": "c", "python": "p"}, "seconds": 1.0, "passed": 3,
              "stages": records}
    text = gpu_check.markdown(report)
    assert "| a/evaluate | skipped: a/train did not pass | 0.0 |  |" in text and "test_auc=0.9" in text

"""The first run on a CUDA machine: every bundle's training (2 epochs, AMP) → evaluation → inference on tiny
synthetic data, then the benchmarks' CUDA paths (Grad-CAM batches, the GAIN step with AMP, SmoothGrad, slide
inference, and the capsule study inference with its frames per second), in at most 8 minutes.

Every stage is a subprocess with its own time budget (and the run with a total one): a stage that fails or runs
out of time is recorded with the end of its output and the stages that need it are skipped; the others go on.
Writes ``OUT/gpu_check.json`` (machine, then per stage: command, status, seconds, figures, output tail) and
``OUT/gpu_check.md`` (the same as a table); the exit code is 1 when a stage failed. Without CUDA it says so and
exits 0. ``--dry-run`` runs the same stages on the CPU at the smallest sizes (minutes on 2 cores), to check the
commands; ``--list`` prints the stages.

    .venv/bin/python benchmarks/gpu_check.py --out gpu_check        # or: make gpu-check
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT / "bundles"
TOTAL_BUDGET_S = 480.0
BUNDLES_SHARE = 0.5  # of the total budget, for the bundles' stages
DRY_RUN_SLOWDOWN = 8.0  # stage budgets on the CPU dry run (2 shared cores) are this many times the GPU's
TAIL_LINES = 15
HEADLINE = re.compile(r"(auc|f1|iou|froc|sensitivity|specificity|rows)$")  # the figures gpu_check.md shows


@dataclass
class Stage:
    """One command of the check.

    Args:
        name: ``group/step``, e.g. ``capsule/train``.
        argv: the command, run from the repository root.
        budget_s: seconds it may take before it is stopped.
        needs: stages that must have passed first (else this one is skipped).
        figures: JSON files whose content (a flat mapping) is recorded after the stage passed.
        counts: CSV files whose data rows are counted after the stage passed (e.g. ``predictions.csv``).
    """

    name: str
    argv: list[str]
    budget_s: float
    needs: tuple[str, ...] = ()
    figures: tuple[Path, ...] = ()
    counts: tuple[Path, ...] = ()
    result: dict[str, Any] = field(default_factory=dict)


def _medgain(*args: str) -> list[str]:
    return [sys.executable, "-m", "medgain.cli", *args]


def _bundle(bundle: str, workflow: str, configs: tuple[str, ...], root: Path, **overrides: Any) -> list[str]:
    configs_dir = BUNDLES / bundle / "configs"
    files = [str(configs_dir / name) for name in configs]
    argv = [sys.executable, "-m", "monai.bundle", "run", workflow, "--bundle_root", str(root),
            "--meta_file", str(configs_dir / "metadata.json"), "--logging_file", str(configs_dir / "logging.conf"),
            "--config_file", files[0] if len(files) == 1 else str(files)]
    for key, value in overrides.items():
        argv += [f"--{key}", str(value)]
    return argv


def build_stages(work: Path, device: str, tiny: bool) -> list[Stage]:
    """The check's stages in run order: per bundle data → train → evaluate → infer, then the benchmarks.

    Args:
        work: folder for data, bundle roots and benchmark studies.
        device: ``cuda`` or ``cpu`` (the benchmarks' ``--device``; the bundles choose CUDA and AMP themselves).
        tiny: the smallest sizes (the CPU dry run) instead of the GPU sizes.

    Returns:
        the stages, each with its command and time budget.
    """
    size = 48 if tiny else 128
    network = {"network": "small_cnn"} if tiny else {}  # on the GPU: each bundle's default network
    loader = {"num_workers": 0 if tiny else 4}
    train = {"max_epochs": 2, "val_interval": 1, **loader, **network}
    stages: list[Stage] = []

    capsule, croot = work / "capsule" / "data", work / "capsule" / "root"
    ccommon = {"dataset_dir": capsule, "image_size": size, "batch_size": 8 if tiny else 32}
    stages += [
        Stage("capsule/data", _medgain("synth", "capsule", "--out", str(capsule), "--seed", "0",
                                       "--n-frames", "48" if tiny else "480", "--size", str(size),
                                       "--prevalence", "0.3", "--frames-per-study", "6"), 60),
        Stage("capsule/train", _bundle("capsule_endoscopy_gain", "training", ("train.yaml",), croot, **ccommon,
                                       **train), 90, needs=("capsule/data",)),
        Stage("capsule/evaluate", _bundle("capsule_endoscopy_gain", "evaluate", ("train.yaml", "evaluate.yaml"),
                                          croot, **ccommon, **loader), 45, needs=("capsule/train",),
              figures=(croot / "outputs" / "evaluation" / "metrics.json",)),
        Stage("capsule/infer", _bundle("capsule_endoscopy_gain", "inference", ("inference.yaml",), croot,
                                       input_dir=capsule / "images", output_dir=croot / "inference", **loader), 45,
              needs=("capsule/train",), counts=(croot / "inference" / "predictions.csv",)),
    ]

    glimpse, groot = work / "glimpse" / "data", work / "glimpse" / "root"
    gsizes = {"image_size": size, "batch_size": 4 if tiny else 32}
    if tiny:
        gsizes |= {"glimpse_size": 8, "hidden_size": 16, "context_size": 16, "num_glimpses": 3}
    gconfigs = ("train.yaml", "evaluate.yaml")
    stages += [
        Stage("glimpse/data", _medgain("synth", "patterns", "--kind", "pattern2", "--rgb", "--size", str(size),
                                       "--n-images", "16" if tiny else "320", "--seed", "0",
                                       "--split-fractions", "0.5", "0.25", "0.25", "--out", str(glimpse)), 60),
        Stage("glimpse/train", _bundle("glimpse_attention", "training", ("train.yaml",), groot,
                                       dataset_dir=glimpse, **gsizes, **{k: v for k, v in train.items()
                                                                          if k != "network"}), 90,
              needs=("glimpse/data",)),
        Stage("glimpse/evaluate", _bundle("glimpse_attention", "evaluate", gconfigs, groot, dataset_dir=glimpse,
                                          **gsizes, **loader), 45, needs=("glimpse/train",),
              figures=(groot / "outputs" / "evaluation" / "metrics.json",)),
        Stage("glimpse/infer", _bundle("glimpse_attention", "inference", ("train.yaml", "inference.yaml"), groot,
                                       dataset_dir=glimpse, input_dir=glimpse / "images",
                                       output_dir=groot / "inference", **gsizes, **loader), 45,
              needs=("glimpse/train",), counts=(groot / "inference" / "predictions.csv",)),
    ]

    slides, wdata, wroot = work / "wsi" / "slides", work / "wsi" / "data", work / "wsi" / "root"
    patch = 32 if tiny else 64
    wcommon = {"dataset_dir": wdata, "level": 1}
    stages += [
        Stage("wsi/data", _medgain("synth", "wsi", "--out", str(slides), "--n-slides", "6", "--seed", "1",
                                   "--size", "1024" if tiny else "2048", "--tumour-rate", "0.5", "--mpp", "2.0"),
              60),
        Stage("wsi/patches", _medgain("wsi", "patches", "--labels", str(slides / "labels.csv"), "--out", str(wdata),
                                      "--level", "1", "--patch-size", str(patch),
                                      "--max-eval-patches", "80" if tiny else "400"), 60, needs=("wsi/data",)),
        Stage("wsi/train", _bundle("wsi_patch_gain", "training", ("train.yaml",), wroot, **wcommon, patch_size=patch,
                                   batch_size=8 if tiny else 64, **train), 90, needs=("wsi/patches",)),
        Stage("wsi/evaluate", _bundle("wsi_patch_gain", "evaluate", ("train.yaml", "evaluate.yaml"), wroot,
                                      **wcommon, **loader), 60, needs=("wsi/train",),
              figures=(wroot / "outputs" / "evaluation" / "metrics.json",)),
        Stage("wsi/infer", _bundle("wsi_patch_gain", "inference", ("inference.yaml",), wroot,
                                   input_dir=slides / "images", output_dir=wroot / "inference", **loader), 60,
              needs=("wsi/train",), counts=(wroot / "inference" / "slides.csv",)),
    ]

    derm, droot = work / "dermoscopy" / "data", work / "dermoscopy" / "root"
    dcommon = {"dataset_dir": derm, "image_size": 32 if tiny else size, "batch_size": 8 if tiny else 32,
               "n_folds": 2, "tta_views": 2}
    stages += [
        Stage("dermoscopy/data", _medgain("synth", "dermoscopy", "--out", str(derm), "--seed", "4",
                                          "--n-images", "40" if tiny else "240", "--prevalence", "0.35",
                                          "--images-per-patient", "3", "--min-size", "40" if tiny else "160",
                                          "--max-size", "80" if tiny else "320"), 60),
        Stage("dermoscopy/train", _bundle("dermoscopy_gain", "training", ("train.yaml",), droot, **dcommon,
                                          **train), 90, needs=("dermoscopy/data",)),
        Stage("dermoscopy/evaluate", _bundle("dermoscopy_gain", "evaluate", ("train.yaml", "evaluate.yaml"), droot,
                                             **dcommon, **loader, **network), 45, needs=("dermoscopy/train",),
              figures=(droot / "outputs" / "fold0" / "evaluation" / "metrics.json",)),
        Stage("dermoscopy/infer", _bundle("dermoscopy_gain", "inference", ("inference.yaml",), droot,
                                          input_dir=derm / "images", output_dir=droot / "inference",
                                          checkpoint=droot / "models" / "fold0" / "model.pt", **loader), 45,
              needs=("dermoscopy/train",), counts=(droot / "inference" / "predictions.csv",)),
    ]

    bench = [sys.executable]
    amp = ["--amp"] if device == "cuda" else []
    small = ["--image-size", "32", "--batch-size", "2", "--rounds", "1"] if tiny else ["--rounds", "3"]
    stages += [
        Stage("bench/gradcam", [*bench, "benchmarks/gradcam.py", "--device", device, *small], 60),
        Stage("bench/gain_step", [*bench, "benchmarks/gain_step.py", "--device", device, *amp, *small], 60),
        Stage("bench/saliency", [*bench, "benchmarks/saliency.py", "--device", device, *small,
                                 *(["--samples", "2"] if tiny else [])], 60),
        Stage("bench/wsi_inference", [*bench, "benchmarks/wsi_inference.py", "--device", device, *amp,
                                      "--size", "1024" if tiny else "4096", "--rounds", "1",
                                      *(["--patch-size", "32", "--batch-size", "8"] if tiny else [])], 90),
        Stage("bench/study_inference", [*bench, "benchmarks/study_inference.py", "--device", device, *amp,
                                        "--study", str(work / "study"),
                                        *(["--frames", "16", "--distinct", "4", "--frame-size", "32",
                                           "--image-size", "32", "--workers", "0"] if tiny else
                                          ["--network", "mobilenet_v2", "--image-size", "224", "--frames", "2000",
                                           "--distinct", "100", "--workers", "4"])], 120),
    ]
    return stages


def _tail(text: str) -> list[str]:
    return text.rstrip().splitlines()[-TAIL_LINES:]


def _figures(stage: Stage) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in stage.figures:
        if path.is_file():
            data = json.loads(path.read_text())
            out.update({k: v for k, v in data.items() if isinstance(v, (int, float, str)) or v is None})
    for path in stage.counts:
        if path.is_file():
            out[f"{path.name} rows"] = max(0, len(path.read_text().splitlines()) - 1)
    return out


def _run_group(stages: list[Stage], deadline: float, env: dict[str, str], passed: set[str]) -> None:
    """Run ``stages`` one after the other, each within its budget and before ``deadline``; each one's record goes
    to its :attr:`Stage.result`, the names of those that passed to ``passed``."""
    for stage in stages:
        record = stage.result
        record |= {"stage": stage.name, "command": shlex.join(stage.argv), "seconds": 0.0}
        left = deadline - time.monotonic()
        missing = [name for name in stage.needs if name not in passed]
        if missing:
            record["status"] = f"skipped: {', '.join(missing)} did not pass"
        elif left < 5:
            record["status"] = "skipped: the total time budget is spent"
        else:
            print(f"gpu-check: {stage.name} started (budget {min(stage.budget_s, left):.0f} s)", flush=True)
            began = time.monotonic()
            try:
                proc = subprocess.run(stage.argv, cwd=ROOT, env=env, capture_output=True, text=True,
                                      timeout=min(stage.budget_s, left))
                record["status"] = "passed" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
                printed, output = proc.stdout, proc.stdout + proc.stderr
            except subprocess.TimeoutExpired as err:
                record["status"] = f"timed out after {min(stage.budget_s, left):.0f} s"
                printed = output = "".join(part.decode(errors="replace") if isinstance(part, bytes) else part or ""
                                           for part in (err.stdout, err.stderr))
            record["seconds"] = round(time.monotonic() - began, 1)
            if record["status"] == "passed":
                passed.add(stage.name)
                record["figures"] = _figures(stage)
                if stage.name.startswith("bench/"):  # a benchmark's figures are the table it prints
                    record["output"] = _tail(printed)
            else:
                record["output"] = _tail(output)
            print(f"gpu-check: {stage.name}: {record['status']} in {record['seconds']} s", flush=True)


def run_stages(stages: list[Stage], total_budget_s: float, env: dict[str, str], jobs: int = 1) -> list[dict[str, Any]]:
    """Run ``stages`` within ``total_budget_s``: the bundles' groups (``capsule/…``, ``wsi/…``) ``jobs`` at a time,
    each group in order, within the first :data:`BUNDLES_SHARE` of the budget, then the benchmarks (``bench/…``) one by one, alone on the machine so that their
    timings are undisturbed.

    Returns:
        one record per stage, in the order of ``stages``: name, command, status (``passed``, ``failed (exit N)``,
        ``timed out after S s``, ``skipped: …``), seconds, figures and, unless passed (or for a benchmark), the
        last lines of its output.
    """
    start = time.monotonic()
    deadline = start + total_budget_s
    passed: set[str] = set()
    groups: dict[str, list[Stage]] = {}
    for stage in stages:
        groups.setdefault(stage.name.split("/")[0], []).append(stage)
    bench = groups.pop("bench", [])
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        bundles_deadline = start + BUNDLES_SHARE * total_budget_s  # the rest is the benchmarks' at least
        for future in [pool.submit(_run_group, group, bundles_deadline, env, passed) for group in groups.values()]:
            future.result()
    _run_group(bench, deadline, env, passed)
    return [stage.result for stage in stages]


def machine() -> dict[str, Any]:
    """The device the check ran on: GPU name, memory, torch and CUDA versions (or the CPU)."""
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {"device": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                 "capability": f"{props.major}.{props.minor}", "gpus": torch.cuda.device_count()}
    else:
        info["device"] = "CPU (dry run)"
    return info


def markdown(report: dict[str, Any]) -> str:
    """``gpu_check.md``: the machine, a table of the stages with their headline figures (all of them are in
    ``gpu_check.json``), the benchmarks' printed tables and the end of the output of the stages that failed."""
    m = report["machine"]
    lines = [f"# GPU check: {m['device']}", "",
             f"torch {m['torch']}, CUDA {m['cuda']}, Python {m['python']}; {report['seconds']} s in all, "
             f"{report['passed']} of {len(report['stages'])} stages passed.", "",
             "| stage | status | seconds | figures |", "| --- | --- | ---: | --- |"]
    for r in report["stages"]:
        figures = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in r.get("figures", {}).items() if HEADLINE.search(k))
        lines.append(f"| {r['stage']} | {r['status']} | {r['seconds']} | {figures} |")
    for r in report["stages"]:
        if r.get("output"):
            lines += ["", f"## {r['stage']}", "", "```", *r["output"], "```"]
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Run the check; returns the exit code (0 without CUDA, 1 when a stage failed)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu_check"), help="folder of gpu_check.json / .md and the runs")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds for all stages together (default: {TOTAL_BUDGET_S:.0f}; on the dry run "
                        f"{DRY_RUN_SLOWDOWN:.0f} times that)")
    p.add_argument("--dry-run", action="store_true", help="the same stages on the CPU at the smallest sizes")
    p.add_argument("--jobs", type=int, default=None, help="bundles checked at once (default: 4 on CUDA, 1 on CPU)")
    p.add_argument("--list", action="store_true", help="print the stages and their budgets, run nothing")
    args = p.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda and not args.dry_run else "cpu"
    out = args.out.resolve()
    stages = build_stages(out / "work", device, tiny=device == "cpu")
    budget = args.budget or TOTAL_BUDGET_S * (DRY_RUN_SLOWDOWN if device == "cpu" else 1.0)
    if device == "cpu":
        for stage in stages:
            stage.budget_s *= DRY_RUN_SLOWDOWN
    if args.list:
        for stage in stages:
            print(f"{stage.name:24s} {stage.budget_s:4.0f} s  {shlex.join(stage.argv)}")
        return 0
    if device == "cpu" and not args.dry_run:
        print(f"gpu-check: no CUDA device here (torch {torch.__version__}, built for CUDA {torch.version.cuda}): "
              "nothing to check. Run it on a machine with an NVIDIA GPU; --dry-run runs the stages on the CPU.")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        env |= {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")}
    began = time.monotonic()
    records = run_stages(stages, budget, env, args.jobs or (4 if device == "cuda" else 1))
    report = {"machine": machine(), "dry_run": device == "cpu", "budget_s": budget,
              "seconds": round(time.monotonic() - began, 1),
              "passed": sum(r["status"] == "passed" for r in records), "stages": records}
    _write(out / "gpu_check.json", json.dumps(report, indent=2) + "\n")
    _write(out / "gpu_check.md", markdown(report))
    print(f"gpu-check: {report['passed']} of {len(records)} stages passed in {report['seconds']} s; "
          f"figures in {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0 if report["passed"] == len(records) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Attention-guided cropping on synthetic dermoscopy: the full-image model, the crop model and their ensemble at the
same input size, per seed (data and training), AUC with 95 % patient-bootstrap intervals.

For every seed: ``make_dermoscopy_dataset`` (``--n-images`` images of 160-320 px, prevalence 0.2, 3 images per
patient) and the whole pipeline with ``pipelines/attention_crop/demo.yaml`` (small_cnn at 64², 3 folds, 8
epochs, ensemble weights on out-of-fold predictions). Single-threaded CPU; a finished seed is not re-run.

Per seed, ``seed<k>/per_image.csv`` keeps every image's scores (columns id, label, group, split, then one log-odds
column per model; ``id`` and ``group`` are synthetic indices, not file names or patient ids; split ``oof`` or
``test``), and ``differences.json`` the paired patient-bootstrap intervals of each model's AUC and accuracy
(decision at log-odds 0) minus the full-image model's, per seed and split.

    OMP_NUM_THREADS=1 python benchmarks/attention_crop.py --seeds 0 1 2 --out runs/bench_attention_crop
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
from common import differences_table, paired_bootstrap_differences, write_prediction_table

from medgain.ensemble import ensemble_scores
from medgain.model_file import atomic_write
from medgain.pipeline import read_predictions, run_attention_crop
from medgain.synth import make_dermoscopy_dataset

REPO = Path(__file__).resolve().parents[1]
MODELS = ("full", "crop", "ensemble")
STAGE_FOLDERS = {"full": "full", "crop": "cropnet", "chipnet": "chipnet"}  # ensemble member → pipeline stage


def run_seed(out: Path, seed: int, n_images: int) -> dict:
    """Data and pipeline of one seed (skipped when its summary exists); the summary with the wall time."""
    data = out / f"seed{seed}" / "data"
    if not (data / "train.csv").is_file():
        make_dermoscopy_dataset(
            data, n_images, seed=seed, prevalence=0.2, images_per_patient=3, min_size=160, max_size=320
        )
    start = time.perf_counter()
    summary = run_attention_crop(
        REPO / "pipelines" / "attention_crop" / "demo.yaml",
        dataset_dir=str(data),
        output_dir=str(out / f"seed{seed}" / "pipeline"),
        seed=seed,
    )
    summary["wall_s"] = time.perf_counter() - start
    return summary


def per_image_predictions(pipeline: Path) -> dict[str, object]:
    """Every image's scores from a finished pipeline folder: each ensemble member's out-of-fold score (cross-
    validation images) or mean test score over the fold models (test images), and the ensemble's with the
    summary's weights, as the pipeline computes them.

    Returns:
        ``{"ids", "labels", "groups", "splits", "scores": {model: (N,) log-odds}}`` in ``folds.csv`` order; ids and
        groups are synthetic indices (``img0000``, ``pat0000``).

    Raises:
        ValueError: naming the file for an image without a prediction.
    """
    weights = json.loads((pipeline / "ensemble" / "summary.json").read_text())["weights"]
    with (pipeline / "folds.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    keys = [Path(row["image"]).stem for row in rows]
    folds = [int(row["fold"]) for row in rows]
    n_folds = max(folds) + 1
    patients = {p: f"pat{k:04d}" for k, p in enumerate(dict.fromkeys(row["patient"] for row in rows))}
    scores: dict[str, np.ndarray] = {}
    for model in weights:
        folder = pipeline / STAGE_FOLDERS[model] / "outputs"
        oof_files = [folder / "oof" / f"fold{k}.csv" for k in range(n_folds)]
        oof = read_predictions(oof_files)
        test_files = [folder / f"fold{k}" / "evaluation" / "predictions.csv" for k in range(n_folds)]
        tests = [read_predictions([p]) for p in test_files if p.is_file()]
        values = []
        for key, fold in zip(keys, folds):
            if fold >= 0:
                if key not in oof:
                    raise ValueError(f"{folder / 'oof'}: no out-of-fold prediction for image {key}")
                values.append(oof[key][0])
                continue
            found = [t[key][0] for t in tests if key in t]
            if len(found) != n_folds:
                raise ValueError(f"{folder}: {len(found)} of {n_folds} fold models predicted test image {key}")
            values.append(float(np.mean(found)))  # mean log-odds of the fold models
        scores[model] = np.asarray(values)
    scores["ensemble"] = ensemble_scores(scores, weights)
    return {
        "ids": [f"img{k:04d}" for k in range(len(rows))],
        "labels": np.asarray([int(row["label"]) for row in rows]),
        "groups": [patients[row["patient"]] for row in rows],
        "splits": ["test" if fold < 0 else "oof" for fold in folds],
        "scores": scores,
    }


def seed_differences(seed_dir: Path, n_bootstrap: int, seed: int) -> list[dict]:
    """Write ``per_image.csv`` of a seed's pipeline and return the paired intervals of every model minus ``full``,
    per split (patients resampled)."""
    table = per_image_predictions(seed_dir / "pipeline")
    write_prediction_table(
        seed_dir / "per_image.csv", table["ids"], table["labels"], table["scores"],
        extra={"group": table["groups"], "split": table["splits"]},
    )
    rows = []
    splits = np.asarray(table["splits"])
    for split in ("oof", "test"):
        keep = splits == split
        if not keep.any():
            continue
        found = paired_bootstrap_differences(
            table["labels"][keep], {m: s[keep] for m, s in table["scores"].items()}, "full",
            metrics=("auc", "accuracy"), threshold=0.0, groups=[g for g, k in zip(table["groups"], keep) if k],
            n_bootstrap=n_bootstrap, seed=seed,
        )
        rows += [{"where": f"seed {seed}, {split}", **r} for r in found]
    return rows


def table(summaries: dict[int, dict]) -> str:
    """Markdown table: per seed and model, out-of-fold AUC and test AUC with their intervals."""
    lines = [
        "| seed | model | weight | OOF AUC, fold mean | OOF AUC, pooled (95 % CI) | test AUC (95 % CI) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for seed, summary in sorted(summaries.items()):
        for model in MODELS:
            oof, test = summary["oof"][model], summary["test"][model]
            weight = f"{summary['weights'][model]:.2f}" if model in summary["weights"] else ""
            lines.append(
                f"| {seed} | {model} | {weight} | {oof['fold_mean']:.3f} | "
                f"{oof['pooled']:.3f} ({oof['ci_low']:.3f}–{oof['ci_high']:.3f}) | "
                f"{test['auc']:.3f} ({test['ci_low']:.3f}–{test['ci_high']:.3f}) |"
            )
    for model in MODELS:
        mean = {
            field: sum(s[key][model][field] for s in summaries.values()) / len(summaries)
            for key, field in (("oof", "fold_mean"), ("oof", "pooled"), ("test", "auc"))
        }
        lines.append(
            f"| mean of {len(summaries)} | {model} | | {mean['fold_mean']:.3f} | {mean['pooled']:.3f} | "
            f"{mean['auc']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-images", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_attention_crop"))
    parser.add_argument(
        "--report", action="store_true", help="only tabulate the seeds' existing ensemble/summary.json files"
    )
    parser.add_argument("--n-bootstrap", type=int, default=2000, help="resamples of the paired intervals")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.report:
        summaries = {
            seed: json.loads((args.out / f"seed{seed}" / "pipeline" / "ensemble" / "summary.json").read_text())
            for seed in args.seeds
        }
    else:
        summaries = {seed: run_seed(args.out, seed, args.n_images) for seed in args.seeds}
        (args.out / "results.json").write_text(json.dumps(summaries, indent=2, default=str) + "\n")
    print(table(summaries))
    differences = [r for seed in args.seeds for r in seed_differences(args.out / f"seed{seed}", args.n_bootstrap, seed)]
    text = json.dumps(differences, indent=2) + "\n"
    atomic_write(args.out / "differences.json", lambda f: f.write(text.encode()))
    print()
    print(differences_table(differences))


if __name__ == "__main__":
    main()

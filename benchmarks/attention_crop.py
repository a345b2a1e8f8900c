"""Attention-guided cropping on synthetic dermoscopy: the full-image model, the crop model and their ensemble at the
same input size, per seed (data and training), AUC with 95 % patient-bootstrap intervals.

For every seed: ``make_dermoscopy_dataset`` (``--n-images`` images of 160-320 px, prevalence 0.2, 3 images per
patient) and the whole pipeline with ``pipelines/attention_crop/demo.yaml`` (small_cnn at 64², 3 folds, 8
epochs, ensemble weights on out-of-fold predictions). Single-threaded CPU; a finished seed is not re-run.

    OMP_NUM_THREADS=1 python benchmarks/attention_crop.py --seeds 0 1 2 --out runs/bench_attention_crop
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from medgain.pipeline import run_attention_crop
from medgain.synth import make_dermoscopy_dataset

REPO = Path(__file__).resolve().parents[1]
MODELS = ("full", "crop", "ensemble")


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


if __name__ == "__main__":
    main()

"""Recurrent glimpse model on synthetic ``pattern2``: test F1 and whether the glimpse locations move.

Trains :class:`medgain.networks.RecurrentGlimpseNetwork` with :class:`medgain.losses.GlimpseLoss` on in-memory
``pattern2`` images (the generator of ``medgain synth patterns``), single-threaded, Adam with a cosine learning
rate, and writes one JSON with the per-epoch training loss and validation and test metrics: F1 and accuracy
(decision at probability 0.5), AUC, and the glimpse statistics (step distance, centre spread, fraction of later
glimpses on a checkerboard vs its area fraction). ``best`` is the test row of the epoch with the best
validation AUC (as the bundle's best checkpoint), ``final`` the last epoch's.

    python benchmarks/glimpse_pattern2.py --seed 0 --out glimpse_seed0.json
    python benchmarks/glimpse_pattern2.py --seed 0 --alpha 1.0 --out area_only.json        # ablations:
    python benchmarks/glimpse_pattern2.py --seed 0 --alpha 0.0 --out distance_only.json    # location loss
    python benchmarks/glimpse_pattern2.py --seed 0 --location-weight 0 --out none.json     # variants

Each run also writes the test images' predictions, ``<out>.predictions.csv``: id (image size, colour and test
index, so that only runs on the same test images join: the data seed is fixed), label, then the probability of
the best-validation epoch in a column named ``--name`` and of the last epoch in ``<name>@final``. ``--compare``
joins such tables and writes the paired bootstrap intervals of every run's AUC and accuracy (decision at 0.5)
minus the ``--reference`` run's to ``--out``:

    python benchmarks/glimpse_pattern2.py --compare glimpse_seed0.predictions.csv none.predictions.csv \
        --reference glimpse_seed0 --out compare.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from common import differences_table, paired_bootstrap_differences, read_prediction_tables, write_prediction_table
from monai.metrics import compute_roc_auc
from monai.utils import set_determinism

from medgain.handlers import glimpse_records, glimpse_statistics
from medgain.losses import GlimpseLoss
from medgain.model_file import atomic_write
from medgain.networks import RecurrentGlimpseNetwork
from medgain.synth import make_pattern_image

_DATA_SEED = 2026


def _data(first: int, n: int, size: int, rgb: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (uint8), labels and masks of pattern2 images ``first .. first + n - 1`` (half tumour)."""
    images, labels, masks = [], [], []
    for index in range(first, first + n):
        positive = index % 2 == 1
        image, mask = make_pattern_image("pattern2", _DATA_SEED, index, positive, size=size, rgb=rgb)
        images.append(image.transpose(2, 0, 1) if rgb else image[None])
        labels.append(int(positive))
        masks.append(mask[None])
    return torch.from_numpy(np.stack(images)), torch.tensor(labels), torch.from_numpy(np.stack(masks))


def _evaluate(
    net: RecurrentGlimpseNetwork, data: tuple[torch.Tensor, ...], batch_size: int
) -> tuple[dict[str, float], torch.Tensor]:
    """Metrics and glimpse statistics of ``data``, and each image's probability of the positive class."""
    images, labels, masks = data
    net.eval()
    records, probs = [], []
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            x = images[start : start + batch_size].float() / 255.0
            out = net(x)
            probs.append(torch.softmax(out.logits, 1)[:, 1])
            records.append(
                glimpse_records(
                    out.centers, out.scales, out.glimpse_logits, labels[start : start + batch_size],
                    masks[start : start + batch_size],
                )
            )
    net.train()
    prob = torch.cat(probs)
    decision = (prob >= 0.5).long()
    tp = int(((decision == 1) & (labels == 1)).sum())
    fp = int(((decision == 1) & (labels == 0)).sum())
    fn = int(((decision == 0) & (labels == 1)).sum())
    merged = {key: torch.cat([r[key] for r in records]) for key in records[0]}
    metrics = {
        "f1": 2 * tp / max(2 * tp + fp + fn, 1),
        "accuracy": float((decision == labels).float().mean()),
        "auc": float(compute_roc_auc(prob.double(), labels)),
        **glimpse_statistics(merged),
    }
    return metrics, prob


def compare(tables: list[Path], reference: str, out: Path, n_bootstrap: int, seed: int) -> list[dict]:
    """Paired bootstrap intervals of every method's test AUC and accuracy (decision at probability 0.5) minus
    ``reference``'s, from joined per-image prediction tables; written to ``out`` as JSON and returned."""
    _, labels, scores = read_prediction_tables(tables)
    rows = paired_bootstrap_differences(
        labels, scores, reference, metrics=("auc", "accuracy"), threshold=0.5, n_bootstrap=n_bootstrap, seed=seed
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"tables": [t.name for t in tables], "differences": rows}, indent=2)
    atomic_write(out, lambda f: f.write(text.encode()))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0, help="training seed (initialisation and batch order)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--grey", action="store_true", help="grey images instead of 3-channel")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--encoder", default="small_cnn")
    p.add_argument("--num-glimpses", type=int, default=4)
    p.add_argument("--glimpse-size", type=int, default=16)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--min-scale", type=float, default=0.1)
    p.add_argument("--max-scale", type=float, default=0.5)
    p.add_argument("--init-scale", type=float, default=0.3)
    p.add_argument("--batch-stats", action="store_true", help="train the encoder's BatchNorm on batch statistics")
    p.add_argument("--include-first", action="store_true", help="aggregate over all glimpses (glimpse-0 shortcut)")
    p.add_argument("--alpha", type=float, default=0.5, help="area share of the location loss")
    p.add_argument("--location-weight", type=float, default=1.0)
    p.add_argument("--rank-weight", type=float, default=0.0)
    p.add_argument("--step-weight", type=float, default=0.0, help="weight of the inhibition-of-return step loss")
    p.add_argument("--min-step", type=float, default=0.15, help="free step between glimpses (fraction of the side)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default=None, help="score column of the predictions table (default: --out's stem)")
    p.add_argument("--compare", type=Path, nargs="+", default=None, help="prediction tables to compare; no training")
    p.add_argument("--reference", default=None, help="with --compare: the method the others are compared with")
    p.add_argument("--n-bootstrap", type=int, default=2000, help="with --compare: resamples of the intervals")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.compare:
        if args.reference is None:
            p.error("--compare needs --reference")
        rows = compare(args.compare, args.reference, args.out, args.n_bootstrap, args.seed)
        print(differences_table(rows))
        return
    torch.set_num_threads(args.threads)
    set_determinism(seed=args.seed)
    rgb = not args.grey
    started = time.perf_counter()
    train = _data(0, args.n_train, args.size, rgb)
    val = _data(10**6, args.n_val, args.size, rgb)
    test = _data(2 * 10**6, args.n_test, args.size, rgb)
    net = RecurrentGlimpseNetwork(
        encoder=args.encoder,
        in_channels=3 if rgb else 1,
        num_glimpses=args.num_glimpses,
        glimpse_size=args.glimpse_size,
        hidden_size=args.hidden_size,
        context_size=args.context_size,
        min_scale=args.min_scale,
        max_scale=args.max_scale,
        init_scale=args.init_scale,
        exclude_first_glimpse=not args.include_first,
        freeze_encoder_norm=not args.batch_stats,
    )
    loss_fn = GlimpseLoss(
        location_weight=args.location_weight, alpha=args.alpha, rank_weight=args.rank_weight,
        step_weight=args.step_weight, min_step=args.min_step,
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    generator = torch.Generator().manual_seed(args.seed)
    history, test_probs = [], []
    for epoch in range(args.epochs):
        order = torch.randperm(args.n_train, generator=generator)
        sums: dict[str, float] = {}
        for start in range(0, args.n_train - args.batch_size + 1, args.batch_size):
            idx = order[start : start + args.batch_size]
            out = net(train[0][idx].float() / 255.0)
            terms = loss_fn(out, train[1][idx], train[2][idx], epoch=epoch)
            optimizer.zero_grad()
            terms["loss"].backward()
            optimizer.step()
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
        schedule.step()
        steps = args.n_train // args.batch_size
        test_metrics, prob = _evaluate(net, test, 64)
        test_probs.append(prob)
        row = {"epoch": epoch + 1, **{f"train_{k}": v / steps for k, v in sums.items()}, **test_metrics}
        row |= {f"val_{k}": v for k, v in _evaluate(net, val, 64)[0].items()}
        row["elapsed_s"] = time.perf_counter() - started
        history.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    best = max(history, key=lambda r: (r["val_auc"], r["val_f1"]))
    summary = {"config": config, "history": history, "final": history[-1], "best": best}
    text = json.dumps(summary, indent=2)
    atomic_write(args.out, lambda f: f.write(text.encode()))
    name = args.name or args.out.stem
    write_prediction_table(
        args.out.with_name(f"{args.out.stem}.predictions.csv"),
        [f"{args.size}{'grey' if args.grey else 'rgb'}-{k:05d}" for k in range(args.n_test)],  # test image k
        test[1].numpy(),
        {name: test_probs[best["epoch"] - 1].numpy(), f"{name}@final": test_probs[-1].numpy()},
    )


if __name__ == "__main__":
    main()

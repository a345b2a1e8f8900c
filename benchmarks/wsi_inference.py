"""Slide inference: medgain's ``SlideInferer`` against a plain MONAI ``SlidingPatchWSIDataset`` + ``DataLoader`` loop.

Both run the same network (logits + Grad-CAM of the tumour class through ``medgain.attention.grad_cam``) over
the same tissue patches of the same synthetic slide, read with the same backend, in one process, alternating;
both times include finding the tissue patches. medgain reads one region per block of patches on a background
thread, cuts the patches from it and runs the network in channels-last memory format (also timed without);
the MONAI loop reads every patch on its own. The outputs are checked to be equal. "Reading only" times the
data path alone (patches to float tensors). Target: at least 1.5x the patches per second.

With the tifffile backend both use medgain's tile-exact ``TiledTiffFileWSIReader``: MONAI's own tifffile reader
decodes the whole level for every patch, which the script also times on a few patches for reference.

    python benchmarks/wsi_inference.py [--size 8192] [--network small_cnn] [--backend tifffile|openslide]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import alternate, machine
from monai.data import DataLoader, SlidingPatchWSIDataset
from monai.data.wsi_reader import TiffFileWSIReader

from medgain.attention import grad_cam
from medgain.metrics import positive_score
from medgain.networks import TARGET_LAYERS, build_classifier
from medgain.synth import make_wsi_slide
from medgain.wsi import Slide, SlideInferer, TiledTiffFileWSIReader


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slide", type=Path, help="an existing slide (default: a synthetic one in a temporary folder)")
    p.add_argument("--size", type=int, default=8192, help="side of the synthetic slide in pixels")
    p.add_argument("--network", default="small_cnn", help="registry name of the classifier")
    p.add_argument("--patch-size", type=int, default=224)
    p.add_argument("--level", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--backend", default="tifffile", choices=["tifffile", "openslide"])
    p.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    slide_path = args.slide
    if slide_path is None:
        start = time.perf_counter()
        slide_path = make_wsi_slide(Path(tmp.name) / "bench.tif", seed=0, size=args.size, tumour=True).path
        print(f"synthetic {args.size}² slide written in {time.perf_counter() - start:.1f} s")
    torch.manual_seed(0)
    layer = TARGET_LAYERS[args.network]
    net = build_classifier(args.network, num_classes=2).to(args.device).eval()
    size, level, batch = args.patch_size, args.level, args.batch_size
    options = {
        "patch_size": size,
        "level": level,
        "batch_size": batch,
        "backend": args.backend,
        "device": args.device,
        "amp": args.amp,
    }
    # separate copies: the inferer converts its network to channels-last in place
    inferer = SlideInferer(copy.deepcopy(net), layer, **options)
    inferer_nchw = SlideInferer(copy.deepcopy(net), layer, channels_last=False, **options)
    results: dict[str, np.ndarray] = {}

    def ours() -> None:
        results["medgain"] = inferer(slide_path).log_odds

    def ours_nchw() -> None:
        results["medgain (NCHW)"] = inferer_nchw(slide_path).log_odds

    def ours_reading() -> None:
        with Slide(slide_path, backend=args.backend) as slide:
            for _, patches in inferer.iter_batches(slide, inferer.tissue_grid(slide)):
                torch.from_numpy(patches).to(args.device).float()

    def forward(images: torch.Tensor) -> torch.Tensor:
        x = images.to(args.device).float() / 255.0
        autocast = (
            torch.autocast("cuda")
            if args.amp and args.device.startswith("cuda")
            else torch.autocast("cpu", enabled=False)
        )
        with torch.no_grad(), autocast:
            logits, _ = grad_cam(net, x, layer, 1)
        return positive_score(logits)

    def monai_dataset() -> tuple[SlidingPatchWSIDataset, tuple[int, int], float]:
        with Slide(slide_path, backend=args.backend) as slide:
            grid = inferer.tissue_grid(slide)
            step0 = size * slide.downsamples[level]
        reader = TiledTiffFileWSIReader if args.backend == "tifffile" else args.backend
        ds = SlidingPatchWSIDataset([{"image": str(slide_path)}], patch_size=size, patch_level=level, reader=reader)
        keep = {(int(round(i * step0)), int(round(j * step0))) for i, j in np.argwhere(grid)}
        ds.data = [d for d in ds.data if tuple(int(v) for v in d["location"]) in keep]
        return ds, grid.shape, step0

    def monai_loop() -> None:
        ds, shape, step0 = monai_dataset()
        out = np.full(shape, np.nan)
        for item in DataLoader(ds, batch_size=batch, num_workers=0):
            z = forward(item["image"]).cpu().numpy()
            loc = torch.as_tensor(item["image"].meta["location"]).numpy().reshape(len(z), 2)  # (top, left) per patch
            cells = (loc / step0).round().astype(int)
            out[cells[:, 0], cells[:, 1]] = z
        results["monai"] = out

    def monai_reading() -> None:
        for item in DataLoader(monai_dataset()[0], batch_size=batch, num_workers=0):
            item["image"].as_tensor().to(args.device).float()

    candidates = {
        "medgain SlideInferer": ours,
        "MONAI SlidingPatchWSIDataset + DataLoader": monai_loop,
        "medgain SlideInferer, channels_last=False": ours_nchw,
        "reading only: medgain": ours_reading,
        "reading only: MONAI": monai_reading,
    }
    times = alternate(candidates, args.rounds, args.device)
    for name in ("medgain", "medgain (NCHW)"):
        if not np.allclose(results[name], results["monai"], rtol=1e-4, atol=1e-3, equal_nan=True):
            raise SystemExit(f"{name} and the MONAI loop disagree: not the same patches or outputs")
    n = int(np.isfinite(results["medgain"]).sum())
    print(
        f"machine: {machine(args.device)}; {args.network}, {size}-px patches at level {level}, batch {batch}, "
        f"backend {args.backend}{', AMP' if args.amp else ''}; {n} tissue patches"
    )
    for name, seconds in times.items():
        print(f"{name:44s} {seconds:8.2f} s/slide {n / seconds:9.1f} patches/s")
    monai = times["MONAI SlidingPatchWSIDataset + DataLoader"]
    print(
        f"speed-up {monai / times['medgain SlideInferer']:.2f}x "
        f"(channels_last=False {monai / times['medgain SlideInferer, channels_last=False']:.2f}x); "
        f"reading only {times['reading only: MONAI'] / times['reading only: medgain']:.2f}x"
    )
    if args.backend == "tifffile":
        stock = SlidingPatchWSIDataset(
            [{"image": str(slide_path)}], patch_size=size, patch_level=level, reader=TiffFileWSIReader
        )
        start = time.perf_counter()
        for k in range(4):
            stock[len(stock) // 2 + k]
        per_patch = (time.perf_counter() - start) / 4
        print(
            f"MONAI's own TiffFileWSIReader (whole level decoded per patch): {1 / per_patch:.2f} patches/s read alone"
        )
    tmp.cleanup()


if __name__ == "__main__":
    main()

"""Glimpse boxes drawn in order on the image: a per-round panel for validation, one PNG per image at inference."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw

from medgain.handlers.utils import attach_per_round, class_indices, log_artifact
from medgain.metrics.scores import positive_score, score_to_probability, stack_output

if TYPE_CHECKING:
    from ignite.engine import Engine
    from monai.handlers import MLFlowHandler

__all__ = ["GlimpseOverlaySaver", "draw_glimpses", "glimpse_boxes"]


def glimpse_boxes(
    centers: torch.Tensor, scales: torch.Tensor, height: int, width: int
) -> list[tuple[float, float, float]]:
    """``(x, y, side)`` of each glimpse in pixels of an image of ``height`` × ``width``.

    Args:
        centers: (G, 2) centres (x, y) in [-1, 1].
        scales: (G,) glimpse sides as fractions of the shorter image side.
        height: image height in pixels.
        width: image width in pixels.
    """
    xy = (centers.detach().double().cpu() + 1.0) * 0.5 * torch.tensor([width - 1, height - 1], dtype=torch.float64)
    sides = scales.detach().double().cpu() * min(height, width)
    return [(float(x), float(y), float(s)) for (x, y), s in zip(xy.tolist(), sides.tolist())]


def _colour(step: int, steps: int) -> tuple[int, int, int]:
    """Glimpse colours in order: yellow (first) to red (last)."""
    t = step / max(steps - 1, 1)
    return 255, int(round(230 * (1.0 - t))), 0


def draw_glimpses(image: torch.Tensor | np.ndarray, centers: torch.Tensor, scales: torch.Tensor) -> Image.Image:
    """The image (C, H, W, values in [0, 1]) as RGB with each glimpse's square drawn and numbered in order.

    Args:
        image: (C, H, W) image with 1 or 3 channels.
        centers: (G, 2) glimpse centres (x, y) in [-1, 1].
        scales: (G,) glimpse sides as fractions of the shorter image side.
    """
    pixels = np.asarray(image.detach().float().cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float32)
    if pixels.ndim != 3 or pixels.shape[0] not in (1, 3):
        raise ValueError(f"draw_glimpses: image must be (1 or 3, H, W), got shape {pixels.shape}")
    rgb = np.repeat(pixels, 3, 0) if pixels.shape[0] == 1 else pixels
    canvas = Image.fromarray(np.round(np.clip(rgb.transpose(1, 2, 0), 0.0, 1.0) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    h, w = pixels.shape[1:]
    boxes = glimpse_boxes(centers, scales, h, w)
    width = max(1, round(min(h, w) / 128))
    for step, (x, y, side) in enumerate(boxes):
        colour = _colour(step, len(boxes))
        half = side / 2.0
        draw.rectangle([x - half, y - half, x + half, y + half], outline=colour, width=width)
        draw.text((x - half + 2 * width, y - half + width), str(step), fill=colour)
    return canvas


class GlimpseOverlaySaver:
    """Each validation round, a grid of fixed samples with their glimpses drawn in order (yellow → red).

    The samples are the first ``num_positives`` tumour and ``num_negatives`` normal images in the split's order;
    each tile is enlarged to at least ``min_tile_size`` pixels and titled with its label and probability. The grid
    goes to ``output_dir/glimpses/<split>_epoch_<epoch:03d>.png`` (``per_round``) or
    ``output_dir/glimpses/<split>.png`` and, with an MLflow handler, to the run under ``artifact_path``. The
    evaluator output must hold ``image``, ``pred``, ``label``, ``glimpse_centers`` and
    ``glimpse_scales`` (see :class:`~medgain.handlers.GlimpseInferer`).

    Args:
        output_dir: folder under which ``glimpses/`` is created.
        num_positives: tumour images shown.
        num_negatives: normal images shown.
        mlflow_handler: the MONAI ``MLFlowHandler`` owning the run, or None to only write files.
        artifact_path: MLflow artifact folder.
        split: name of the evaluated split, in file names ("validation", "test").
        per_round: one file per round (validation during training) or a single file (a test evaluation).
        min_tile_size: smallest side of a tile in pixels; smaller images are enlarged (nearest neighbour).
    """

    def __init__(
        self,
        output_dir: str,
        num_positives: int = 4,
        num_negatives: int = 4,
        mlflow_handler: MLFlowHandler | None = None,
        artifact_path: str = "glimpses",
        split: str = "validation",
        per_round: bool = True,
        min_tile_size: int = 256,
    ) -> None:
        if num_positives < 0 or num_negatives < 0 or num_positives + num_negatives == 0:
            raise ValueError(
                f"GlimpseOverlaySaver: needs a non-negative number of samples per class and at least one, got "
                f"num_positives={num_positives}, num_negatives={num_negatives}"
            )
        self.output_dir = Path(output_dir) / "glimpses"
        self.wanted = {1: num_positives, 0: num_negatives}
        self.mlflow_handler = mlflow_handler
        self.artifact_path = artifact_path
        self.split = split
        self.per_round = per_round
        self.min_tile_size = min_tile_size
        self.tiles: dict[int, list[Image.Image]] = {0: [], 1: []}

    def attach(self, engine: Engine) -> None:
        """Collect tiles every iteration of the evaluator and write the grid at the end of each round."""
        attach_per_round(engine, self)

    def reset(self, engine: Engine | None = None) -> None:
        """Start a new round."""
        self.tiles = {0: [], 1: []}

    def __call__(self, engine: Engine) -> None:
        """Draw the samples of this batch that are still needed."""
        if all(len(self.tiles[c]) >= n for c, n in self.wanted.items()):
            return
        images, logits, labels, centers, scales = stack_output(
            engine.state.output, ("image", "pred", "label", "glimpse_centers", "glimpse_scales")
        )
        classes = (class_indices(labels) != 0).long().tolist()
        probabilities = score_to_probability(positive_score(logits)).tolist()
        for i, cls in enumerate(classes):
            if len(self.tiles[cls]) < self.wanted[cls]:
                image = images[i]
                zoom = max(1, -(-self.min_tile_size // min(image.shape[-2:])))
                if zoom > 1:
                    image = torch.nn.functional.interpolate(image[None].float(), scale_factor=zoom, mode="nearest")[0]
                tile = draw_glimpses(image, centers[i], scales[i])
                ImageDraw.Draw(tile).text((3, tile.height - 12), f"y={cls} p={probabilities[i]:.2f}", fill=(0, 255, 255))
                self.tiles[cls].append(tile)

    def write(self, engine: Engine) -> Path | None:
        """Write this round's grid (positives on the first row, normals on the second); None when empty."""
        rows = [self.tiles[1], self.tiles[0]]
        if not any(rows):
            return None
        tile_h = max(t.height for row in rows for t in row)
        tile_w = max(t.width for row in rows for t in row)
        columns = max(len(row) for row in rows)
        grid = Image.new("RGB", (columns * tile_w, sum(1 for r in rows if r) * tile_h), (0, 0, 0))
        for r, row in enumerate(r for r in rows if r):
            for c, tile in enumerate(row):
                grid.paste(tile, (c * tile_w, r * tile_h))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        name = f"{self.split}_epoch_{engine.state.epoch:03d}.png" if self.per_round else f"{self.split}.png"
        path = self.output_dir / name
        grid.save(path)
        log_artifact(self.mlflow_handler, path, self.artifact_path)
        return path

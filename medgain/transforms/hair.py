"""Random hair strands drawn over skin images: a dermoscopy augmentation (array and dictionary transforms)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

__all__ = ["DrawHair", "DrawHaird", "hair_alpha"]

_HAIR_TINT = np.array([1.0, 0.8, 0.65], np.float32)  # dark brown rather than grey


def _pair(name: str, value: Sequence[float], low: float, high: float | None = None) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not low <= lo <= hi or (high is not None and hi > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an increasing pair in {bound}, got {tuple(value)}")
    return lo, hi


def hair_alpha(
    shape: Sequence[int],
    rng: np.random.Generator,
    num_hairs: int,
    width: Sequence[float] = (0.002, 0.006),
    length: Sequence[float] = (0.3, 1.0),
) -> np.ndarray:
    """Opacity (H, W) float32 in [0, 1] of ``num_hairs`` curved strands (quadratic Bézier curves).

    Args:
        shape: (H, W).
        rng: random generator.
        num_hairs: number of strands.
        width: (min, max) strand width as a fraction of the shorter side (at least 1 pixel).
        length: (min, max) strand length as a fraction of the shorter side.
    """
    height, width_px = int(shape[0]), int(shape[1])
    short = min(height, width_px)
    canvas = Image.new("L", (width_px, height), 0)
    draw = ImageDraw.Draw(canvas)
    t = np.linspace(0.0, 1.0, 24)[:, None]
    for _ in range(num_hairs):
        start = rng.uniform([0.0, 0.0], [width_px, height])
        angle = rng.uniform(0.0, 2.0 * np.pi)
        span = rng.uniform(*length) * short
        end = start + span * np.array([np.cos(angle), np.sin(angle)])
        bend = rng.uniform(-0.35, 0.35) * span * np.array([-np.sin(angle), np.cos(angle)])
        control = (start + end) / 2.0 + bend
        points = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end
        stroke = max(1, int(round(rng.uniform(*width) * short)))
        draw.line([tuple(p) for p in points.tolist()], fill=int(rng.uniform(200, 255)), width=stroke, joint="curve")
    alpha = np.asarray(canvas, np.float32) / 255.0
    return np.clip(gaussian_filter(alpha, 0.4), 0.0, 1.0)  # soft edges


class DrawHair(RandomizableTransform):
    """Draw random dark, curved hair strands over a channel-first image (e.g. an RGB dermoscopy image).

    Apply it before intensity normalisation: strands are blended towards ``darkness * max_value`` (tinted brown).

    Args:
        prob: probability of drawing hair on an image.
        num_hairs: (min, max) number of strands, inclusive.
        width: (min, max) strand width as a fraction of the shorter image side (at least 1 pixel).
        length: (min, max) strand length as a fraction of the shorter image side.
        darkness: (min, max) strand intensity as a fraction of ``max_value``.
        max_value: intensity of white (1.0 for images in [0, 1], 255 for uint8-range images).
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        prob: float = 0.5,
        num_hairs: Sequence[int] = (1, 10),
        width: Sequence[float] = (0.002, 0.006),
        length: Sequence[float] = (0.3, 1.0),
        darkness: Sequence[float] = (0.0, 0.25),
        max_value: float = 1.0,
    ) -> None:
        super().__init__(prob)
        lo, hi = (int(v) for v in num_hairs)
        if not 0 <= lo <= hi:
            raise ValueError(f"num_hairs must be an increasing pair of non-negative integers, got {tuple(num_hairs)}")
        self.num_hairs = (lo, hi)
        self.width = _pair("width", width, 0.0, 1.0)
        self.length = _pair("length", length, 0.0)
        self.darkness = _pair("darkness", darkness, 0.0, 1.0)
        self.max_value = float(max_value)
        self._seed = 0

    def randomize(self, data: Any = None) -> None:
        """Decide whether to draw and fix the seed of the strands."""
        super().randomize(None)
        self._seed = int(self.R.randint(0, 2**31 - 1))

    def _alpha_and_colour(self, shape: Sequence[int], channels: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self._seed)
        n = int(rng.integers(self.num_hairs[0], self.num_hairs[1] + 1))
        alpha = hair_alpha(shape, rng, n, self.width, self.length)
        tint = _HAIR_TINT if channels == 3 else np.ones(channels, np.float32)
        colour = rng.uniform(*self.darkness) * self.max_value * tint
        return alpha * rng.uniform(0.75, 0.95), colour.astype(np.float32)

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        """Draw hair on ``img`` (C, H, W); returns the same type, dtype and device.

        Args:
            img: channel-first image.
            randomize: draw a new decision and new strands first (False reuses the last ones).
        """
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        if img.ndim != 3:
            raise ValueError(f"DrawHair expects a channel-first (C, H, W) image, got shape {tuple(img.shape)}")
        data = convert_to_tensor(img, track_meta=False)
        alpha, colour = self._alpha_and_colour(data.shape[-2:], data.shape[0])
        a = torch.as_tensor(alpha, device=data.device)[None]
        c = torch.as_tensor(colour, device=data.device)[:, None, None]
        out = data.float() * (1.0 - a) + c * a
        if not data.dtype.is_floating_point:
            out = out.round()
        return convert_to_dst_type(out, img, dtype=img.dtype)[0]


class DrawHaird(RandomizableTransform, MapTransform):
    """Dictionary version of :class:`DrawHair`: the same strands on every key (images of one size).

    Args:
        keys: keys of the channel-first images.
        prob: probability of drawing hair on a sample.
        allow_missing_keys: skip absent keys.
        kwargs: the other :class:`DrawHair` arguments.
    """

    backend = DrawHair.backend

    def __init__(
        self, keys: KeysCollection, prob: float = 0.5, allow_missing_keys: bool = False, **kwargs: Any
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.hair = DrawHair(prob=1.0, **kwargs)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> DrawHaird:
        """Seed this transform and its inner :class:`DrawHair`."""
        super().set_random_state(seed, state)
        self.hair.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        """Draw hair on ``keys`` of a sample with probability ``prob``."""
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        self.hair.randomize()
        for key in self.key_iterator(d):
            d[key] = self.hair(d[key], randomize=False)
        return d

"""H&E colour augmentation: random scaling and shifting in haematoxylin-eosin-DAB space (HED jitter)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from skimage.color import hed_from_rgb, rgb_from_hed

__all__ = ["RandHEDJitterd", "hed_jitter"]


def hed_jitter(
    image: np.ndarray, alpha: Sequence[float], beta: Sequence[float], max_value: float = 255.0
) -> np.ndarray:
    """Stain jitter of one (3, H, W) RGB image: ``hed' = alpha * hed + beta`` per stain channel.

    Args:
        image: (3, H, W) RGB with intensities in [0, ``max_value``].
        alpha: (3,) multiplicative factors (1 = unchanged) for H, E, D.
        beta: (3,) additive shifts in optical-density units.
        max_value: intensity of white (255 for uint8, 1 for scaled images).

    Returns:
        the jittered image, float32 in [0, ``max_value``].
    """
    rgb = np.moveaxis(np.asarray(image, dtype=np.float64), 0, -1) / max_value
    # optical density -> stain concentrations (Ruifrok & Johnston matrices); unlike skimage's rgb2hed the
    # concentrations are not clipped at 0, so alpha = 1, beta = 0 gives the image back
    density = -np.log(np.clip(rgb, 1e-6, 1.0))
    hed = density @ hed_from_rgb
    hed = hed * np.asarray(alpha, dtype=np.float64) + np.asarray(beta, dtype=np.float64)
    out = np.clip(np.exp(-(hed @ rgb_from_hed)), 0.0, 1.0) * max_value
    return np.moveaxis(out, -1, 0).astype(np.float32)


class RandHEDJitterd(RandomizableTransform, MapTransform):
    """Random HED stain jitter (Tellez et al. 2018): per image, ``alpha ~ U(1 - sigma_alpha, 1 + sigma_alpha)``
    and ``beta ~ U(-sigma_beta, sigma_beta)`` for each stain channel.

    Args:
        keys: keys of (3, H, W) RGB images.
        prob: probability of jittering an image.
        sigma_alpha: half-width of the stain scaling range.
        sigma_beta: half-width of the stain shift range.
        max_value: intensity of white (255 for uint8 patches, 1 after scaling).
        allow_missing_keys: skip keys that are absent.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.5,
        sigma_alpha: float = 0.05,
        sigma_beta: float = 0.05,
        max_value: float = 255.0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if sigma_alpha < 0 or sigma_beta < 0:
            raise ValueError(f"sigma_alpha and sigma_beta must be >= 0, got {sigma_alpha} and {sigma_beta}")
        self.sigma_alpha = sigma_alpha
        self.sigma_beta = sigma_beta
        self.max_value = max_value
        self._alpha = np.ones(3)
        self._beta = np.zeros(3)

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self._alpha = self.R.uniform(1.0 - self.sigma_alpha, 1.0 + self.sigma_alpha, 3)
        self._beta = self.R.uniform(-self.sigma_beta, self.sigma_beta, 3)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            image = d[key]
            jittered = hed_jitter(
                image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image,
                self._alpha,
                self._beta,
                self.max_value,
            )
            if isinstance(image, torch.Tensor):
                out = torch.as_tensor(jittered, dtype=torch.float32, device=image.device)
                if hasattr(image, "meta"):
                    out = type(image)(out, meta=image.meta)
                d[key] = out
            else:
                d[key] = jittered
        return d

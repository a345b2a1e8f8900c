"""Unveiling panels: each image beside its unveiled regions, outlined in distinct colours with the probability
after each step, and the lesion label map derived from the regions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from medgain.unveil.loop import UnveilResult
from medgain.visualize import to_display_rgb

__all__ = ["PanelSample", "roi_label_map", "unveil_panel"]

_COLOURS = matplotlib.colormaps["tab10"].colors


@dataclass
class PanelSample:
    """One column of an unveiling panel.

    Attributes:
        image: (C, H, W) image (C = 1 or 3), shown as :func:`medgain.visualize.to_display_rgb` shows it.
        result: its unveiling, masks of the image's size.
        title: first line of the column title (e.g. the file name or the label).
        lesion_mask: (H, W) ground-truth lesion mask drawn as a dashed white contour, or None.
    """

    image: torch.Tensor | np.ndarray
    result: UnveilResult
    title: str = ""
    lesion_mask: torch.Tensor | np.ndarray | None = None


def roi_label_map(result: UnveilResult) -> np.ndarray:
    """(H, W) uint8 map of the regions: 0 outside, k inside ROI k (the k-th step's mask)."""
    if result.cumulative is None:
        raise ValueError("roi_label_map: the result holds no masks (cumulative is None)")
    out = np.zeros(tuple(result.cumulative.shape), np.uint8)
    for k, mask in enumerate(result.masks, start=1):
        out[np.asarray(mask, bool)] = k
    return out


def unveil_panel(samples: Sequence[PanelSample], suptitle: str | None = None) -> Figure:
    """A figure with one column per sample: the image on top, its unveiled regions outlined below.

    ROI k is outlined in the k-th ``tab10`` colour; the legend gives the target probability after hiding ROIs
    1..k, the column title the probability of the untouched image and why unveiling stopped.

    Raises:
        ValueError: when ``samples`` is empty or a mask does not have the image's size.
    """
    if not samples:
        raise ValueError("unveil_panel: no sample to show")
    fig = Figure(figsize=(3.0 * len(samples), 6.4), layout="constrained")
    if suptitle:
        fig.suptitle(suptitle)
    axes = fig.subplots(2, len(samples), squeeze=False)
    for column, sample in enumerate(samples):
        rgb = to_display_rgb(sample.image)
        result = sample.result
        if result.cumulative is not None and tuple(result.cumulative.shape) != rgb.shape[:2]:
            raise ValueError(
                f"unveil_panel: masks of size {tuple(result.cumulative.shape)} for an image of size {rgb.shape[:2]}"
            )
        top, bottom = axes[0, column], axes[1, column]
        top.imshow(rgb)
        top.set_title(
            f"{sample.title}\nclass {result.target}: p = {result.initial_probability:.3f}\n"
            f"{result.steps} ROI(s), stop: {result.stop_reason}",
            fontsize=8,
        )
        bottom.imshow(rgb)
        handles = []
        for k, (mask, probability) in enumerate(zip(result.masks, result.probabilities)):
            colour = _COLOURS[k % len(_COLOURS)]
            bottom.contour(np.asarray(mask, np.float32), levels=[0.5], colors=[colour], linewidths=1.5)
            handles.append(Line2D([], [], color=colour, lw=2, label=f"ROI {k + 1}: p = {probability:.3f}"))
        if sample.lesion_mask is not None and np.asarray(sample.lesion_mask).any():
            bottom.contour(np.asarray(sample.lesion_mask, np.float32), levels=[0.5], colors="white", linestyles="--")
            handles.append(Line2D([], [], color="white", ls="--", label="lesion"))
        if handles:
            bottom.legend(
                handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.02), facecolor="0.25",
                labelcolor="white",
            )
        for ax in (top, bottom):
            ax.set_axis_off()
    return fig

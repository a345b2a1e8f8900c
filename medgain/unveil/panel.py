"""Unveiling panels: each image beside its unveiled regions, outlined in distinct colours with the probability
after each step, and the lesion label map derived from the regions."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib
import matplotlib.axes
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from scipy import ndimage

from medgain.unveil.loop import UnveilResult
from medgain.visualize import to_display_rgb

__all__ = ["PanelSample", "roi_label_map", "stop_words", "unveil_panel"]

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


def stop_words(result: UnveilResult) -> str:
    """Why the unveiling of ``result`` stopped, in words a reviewer reads (not the ``stop_reason`` key)."""
    n = len(result.masks)
    regions = f"{n} region{'s' if n != 1 else ''}"
    if result.stop_reason == "initially_below":
        return "nothing unveiled: the untouched image is already below the probability threshold"
    if result.stop_reason == "below_threshold":
        return f"stopped: hiding {regions} brought p below the threshold"
    if result.stop_reason == "steps":
        return f"stopped at the step limit ({regions} hidden); p is still above the threshold"
    if result.stop_reason == "no_new_region":
        return f"stopped: the attention showed no new region ({regions} hidden)"
    if result.stop_reason == "probability_rose":
        rose = "" if result.rejected_score is None else f" (to {1.0 / (1.0 + np.exp(-result.rejected_score)):.3f})"
        return f"stopped: hiding the next region raised p{rose}, so it is no evidence and was not kept"
    return f"stopped: {result.stop_reason}"


def _number_blobs(ax: matplotlib.axes.Axes, mask: np.ndarray, number: int, colour: tuple) -> None:
    """Write the region's step number on each of its separate blobs."""
    blobs, count = ndimage.label(mask)
    for y, x in ndimage.center_of_mass(mask, blobs, range(1, count + 1)):
        ax.text(x, y, str(number), color="white", fontsize=8, fontweight="bold", ha="center", va="center",
                bbox={"boxstyle": "circle,pad=0.15", "facecolor": colour, "edgecolor": "none"})


def unveil_panel(samples: Sequence[PanelSample], suptitle: str | None = None) -> Figure:
    """A figure with one column per sample: the image on top, its unveiled regions outlined below.

    ROI k is filled (translucent) and outlined in the k-th ``tab10`` colour, and each of its separate blobs
    carries its number k; the legend gives the target probability after hiding ROIs 1..k, the column title the
    probability of the untouched image and why unveiling stopped, in words (:func:`stop_words`). When nothing was
    unveiled the lower picture is dimmed and says so, instead of repeating the image.

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
            + textwrap.fill(stop_words(result), 38),
            fontsize=8,
        )
        handles = []
        if not result.masks:
            bottom.imshow(rgb, alpha=0.35)
            bottom.text(0.5, 0.5, "nothing unveiled\n(see above)", transform=bottom.transAxes, ha="center",
                        va="center", fontsize=9, bbox={"facecolor": "white", "edgecolor": "0.5"})
        else:
            bottom.imshow(rgb)
        for k, (mask, probability) in enumerate(zip(result.masks, result.probabilities)):
            colour = _COLOURS[k % len(_COLOURS)]
            region = np.asarray(mask, bool)
            fill = np.zeros((*region.shape, 4), np.float32)
            fill[region] = (*colour, 0.3)
            bottom.imshow(fill)
            bottom.contour(region.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.5)
            _number_blobs(bottom, region, k + 1, colour)
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

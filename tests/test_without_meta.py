"""WithoutMetad: a MONAI random transform without MetaTensor bookkeeping, the same draws, the setting restored."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor, get_track_meta, set_track_meta
from monai.transforms import Compose, RandFlipd, RandRotate90d

from medgain.transforms import WithoutMetad


def _pipeline(wrapped: bool) -> Compose:
    flips = [RandFlipd(keys="image", prob=0.5, spatial_axis=0), RandRotate90d(keys="image", prob=0.5)]
    return Compose([WithoutMetad(t) for t in flips] if wrapped else flips).set_random_state(seed=7)


def test_same_draws_as_the_bare_transforms_as_plain_tensors() -> None:
    bare, wrapped = _pipeline(False), _pipeline(True)
    for i in range(12):
        image = torch.arange(2 * 5 * 6, dtype=torch.float32).reshape(2, 5, 6) + i
        expected, out = bare({"image": image.clone()}), wrapped({"image": image.clone()})
        assert isinstance(expected["image"], MetaTensor)  # what MONAI gives by default
        assert type(out["image"]) is torch.Tensor
        torch.testing.assert_close(out["image"], expected["image"].as_tensor())


@pytest.mark.parametrize("setting", [True, False])
def test_restores_the_callers_setting_also_after_an_error(setting: bool) -> None:
    def fails(data: dict) -> dict:
        assert not get_track_meta()
        raise RuntimeError("inside")

    try:
        set_track_meta(setting)
        WithoutMetad(lambda d: d)({"image": torch.zeros(1, 2, 2)})
        assert get_track_meta() is setting
        with pytest.raises(RuntimeError, match="inside"):
            WithoutMetad(fails)({})
        assert get_track_meta() is setting
    finally:
        set_track_meta(True)

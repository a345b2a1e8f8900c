"""ResizeImaged: the values of MONAI's bilinear Resized, as a plain tensor."""

from __future__ import annotations

import pytest
import torch
from monai.transforms import Resized

from medgain.transforms import ResizeImaged


@pytest.mark.parametrize("size", [(24, 24), (13, 40), (17, 9)])
def test_same_values_as_monai_resized_without_metadata(size):
    image = torch.rand(3, 17, 9, generator=torch.Generator().manual_seed(0))
    ours = ResizeImaged(["image"], size)({"image": image, "frame": 2})
    theirs = Resized(["image"], size, mode="bilinear")({"image": image})["image"]
    assert type(ours["image"]) is torch.Tensor and ours["frame"] == 2
    assert ours["image"].shape == (3, *size)
    torch.testing.assert_close(ours["image"], theirs.as_tensor(), atol=1e-6, rtol=0)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="spatial_size"):
        ResizeImaged(["image"], (0, 4))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        ResizeImaged(["image"], (4, 4))({"image": torch.rand(4, 4)})

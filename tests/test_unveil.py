"""Tests of the mask smoothing and the iterative unveiling loop (medgain.unveil)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import binary_dilation, binary_erosion, correlate, label
from torch import nn

from medgain.cli import build_parser, main
from medgain.metrics import equal_area_mask, unveil_counts, unveil_recall
from medgain.model_file import ModelSpec, build_network, spec_from_config
from medgain.networks import TARGET_LAYERS, build_classifier
from medgain.saliency import SALIENCY_SOURCES
from medgain.synth import make_capsule_dataset, make_capsule_frame, make_capsule_frame_lesions
from medgain.unveil import Unveiler, smooth_mask, target_probability, unveil


class BlobNet(nn.Module):
    """A classifier whose evidence is known: bright 3x3 blobs.

    A fixed 3x3 box filter with bias -0.45 responds only to (nearly) whole blobs brighter than 0.45; the
    "lesion" logit is ``20 * max(response) - 2`` against a constant 0. Guided backpropagation of the max lands
    on the strongest blob, so unveiling must hide the blobs from the brightest to the dimmest and stop once none
    is left.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.fill_(1.0 / 9.0)
            self.conv.bias.fill_(-0.45)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveMaxPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        evidence = self.pool(self.relu(self.conv(x))).flatten(1)
        return torch.cat([torch.zeros_like(evidence), 20.0 * evidence - 2.0], 1)


def blob_image(blobs: list[tuple[int, int, float]], size: int = 40) -> torch.Tensor:
    image = torch.zeros(1, size, size)
    for r, c, value in blobs:
        image[0, r - 1 : r + 2, c - 1 : c + 2] = value
    return image


SCENES = [
    [(30, 8, 0.6), (8, 8, 1.0), (20, 30, 0.8)],  # three blobs, brightest listed second
    [(20, 20, 0.9)],
    [(8, 32, 0.7), (32, 8, 1.0)],
]


def _reference_smoothing(maps: np.ndarray, k: int, iterations: int, threshold: float) -> np.ndarray:
    out = []
    for m in maps[:, 0].astype(np.float64):
        for _ in range(iterations):
            total = correlate(m, np.ones((k, k)), mode="constant", cval=0.0)  # k² x the window mean
            m = ((total >= threshold * total.max()) & (total.max() > 0)).astype(np.float64)
        out.append(m.astype(bool))
    return np.stack(out)[:, None]


def test_smoothing_equals_mean_filter_reference() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((3, 1, 24, 24)) ** 4
    maps[1] *= 1000.0  # per-sample relative threshold: scale does not matter
    maps[2] = 0.0
    for k, iterations, threshold in ((3, 1, 0.5), (5, 3, 0.4), (11, 3, 0.5)):
        ours = smooth_mask(torch.from_numpy(maps).float(), k, iterations, threshold).numpy()
        np.testing.assert_array_equal(ours, _reference_smoothing(maps, k, iterations, threshold))
    assert not smooth_mask(torch.from_numpy(maps).float())[2].any()


def test_smoothing_follows_the_region_shape() -> None:
    """A speckled L-shaped region with a hole becomes one solid L; isolated salient pixels disappear."""
    rng = np.random.default_rng(0)
    region = np.zeros((48, 48), bool)
    region[6:40, 6:18] = True
    region[28:40, 6:42] = True
    saliency = np.where(region, rng.random((48, 48)) < 0.7, 0.0)
    saliency[20:23, 10:13] = 0.0  # a hole inside the region
    saliency[2, 44] = saliency[44, 44] = 1.0  # isolated salient pixels
    mask = smooth_mask(torch.from_numpy(saliency)[None, None].float(), kernel_size=5, iterations=3)[0, 0].numpy()
    assert not mask[2, 44] and not mask[44, 44]
    assert not (mask & ~binary_dilation(region)).any()
    assert mask[binary_erosion(region, iterations=3)].all()  # the hole is filled, the interior covered
    assert label(mask)[1] == 1


def test_smoothing_errors() -> None:
    with pytest.raises(ValueError, match="odd kernel_size"):
        smooth_mask(torch.zeros(1, 1, 8, 8), kernel_size=4)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        smooth_mask(torch.zeros(1, 3, 8, 8))


def test_unveils_every_blob_in_order_of_strength_and_stops_per_sample() -> None:
    model = BlobNet().eval()
    images = torch.stack([blob_image(s) for s in SCENES])
    results = unveil(model, images, 1, steps=5, prob_threshold=0.5, fill=0.0, kernel_size=3, threshold=0.4)
    for scene, result in zip(SCENES, results):
        expected = sorted(scene, key=lambda b: -b[2])
        assert result.steps == len(scene) and result.stop_reason == "below_threshold"
        for (r, c, _), mask in zip(expected, result.masks):
            assert mask[r - 1 : r + 2, c - 1 : c + 2].all() and mask.sum() <= 16
        assert all(p >= 0.5 for p in result.probabilities[:-1]) and result.probabilities[-1] < 0.5
        assert result.probabilities == sorted(result.probabilities, reverse=True)
        assert torch.equal(result.cumulative, torch.stack(result.masks).any(0))
        assert not (result.masks[0] & torch.stack(result.masks[1:]).any(0)).any() if result.steps > 1 else True
    assert results[0].initial_probability == pytest.approx(float(torch.sigmoid(torch.tensor(20 * 0.55 - 2.0))))


def test_step_budget_and_initially_below() -> None:
    model = BlobNet().eval()
    images = torch.stack([blob_image(SCENES[0]), blob_image([])])
    results = unveil(model, images, 1, steps=2, prob_threshold=0.5, fill=0.0, kernel_size=3, threshold=0.4)
    assert results[0].steps == 2 and results[0].stop_reason == "steps" and results[0].probabilities[-1] >= 0.5
    assert results[1].steps == 0 and results[1].stop_reason == "initially_below"
    assert not results[1].cumulative.any()


def test_mean_fill_and_equal_to_alone() -> None:
    """The default fill is each image's own mean colour; a sample's result does not depend on its batch."""
    model = BlobNet().eval()
    images = torch.stack([blob_image(s) for s in SCENES]) + 0.1
    batched = unveil(model, images, 1, kernel_size=3, threshold=0.4)
    for i, result in enumerate(batched):
        alone = unveil(model, images[i : i + 1], 1, kernel_size=3, threshold=0.4)[0]
        assert alone.probabilities == pytest.approx(result.probabilities)
        assert all(torch.equal(a, b) for a, b in zip(alone.masks, result.masks))
    mean = images[1].mean()
    hidden = batched[1].cumulative
    erased = torch.where(hidden, mean, images[1, 0])
    expected = target_probability(model(erased[None, None]), torch.tensor([1]))
    assert batched[1].probabilities[-1] == pytest.approx(float(expected[0]))


@pytest.mark.parametrize("source", SALIENCY_SOURCES)
def test_unveil_alone_equals_inside_a_batch_for_every_source(source: str) -> None:
    """An image unveiled alone gets the same hidden pixels, steps and scores as inside a batch of 4, whatever its
    position, with the default content keys and with caller keys (SmoothGrad chunks straddle samples)."""
    torch.manual_seed(0)
    model = build_classifier("small_cnn", num_classes=2).eval()
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    options = {"source": source, "steps": 4, "prob_threshold": 0.3, "kernel_size": 3, "threshold": 0.4,
               "target_layer": TARGET_LAYERS["small_cnn"], "n_samples": 4, "chunk_size": 3}
    keys, order = torch.tensor([40, 41, 42, 43]), [3, 1, 0, 2]

    def check(alone: list, batch: list) -> None:
        for i, (one, many) in enumerate(zip(alone, batch)):
            assert torch.equal(one.cumulative, many.cumulative), f"{source}: hidden pixels of sample {i}"
            assert (one.steps, one.stop_reason) == (many.steps, many.stop_reason)
            assert all(torch.equal(a, b) for a, b in zip(one.masks, many.masks))
            assert one.scores == pytest.approx(many.scores, rel=1e-4, abs=1e-5)

    batched = unveil(model, images, **options)
    assert sum(r.steps for r in batched) > 0
    check([unveil(model, images[i : i + 1], **options)[0] for i in range(4)], batched)
    keyed = unveil(model, images, **options, sample_keys=keys)
    alone_keyed = [unveil(model, images[i : i + 1], **options, sample_keys=[int(keys[i])])[0] for i in range(4)]
    check(alone_keyed, keyed)
    reordered = unveil(model, images[order], **options, sample_keys=keys[order])
    check([alone_keyed[i] for i in order], reordered)
    with pytest.raises(ValueError, match="sample_keys has 3 entries for a batch of 4"):
        unveil(model, images, **options, sample_keys=[0, 1, 2])


def test_unveiler_from_config_and_errors() -> None:
    model = BlobNet().eval()
    images = blob_image(SCENES[1])[None]
    unveiler = Unveiler(source="gradient", steps=3, fill=0.0, kernel_size=3, threshold=0.4)
    assert unveiler(model, images, 1)[0].stop_reason == "below_threshold"
    with pytest.raises(ValueError, match="target_layer"):
        Unveiler(source="grad_cam")
    with pytest.raises(ValueError, match="odd kernel_size"):
        Unveiler(kernel_size=2)
    with pytest.raises(ValueError, match="prob_threshold"):
        unveil(model, images, 1, prob_threshold=1.5)
    with pytest.raises(ValueError, match="fill"):
        unveil(model, images, 1, fill=[0.0, 0.0])


def test_unveil_recall_counts_lesions() -> None:
    lesions = np.zeros((20, 20), np.uint8)
    lesions[2:6, 2:6] = 1  # 16 px
    lesions[10:14, 10:14] = 2  # 16 px, touching lesion 3 below
    lesions[14:18, 10:14] = 3
    region = np.zeros((20, 20), bool)
    region[2:6, 2:3] = True  # 4 / 16 = 25 % of lesion 1: found
    region[10:11, 10:13] = True  # 3 / 16 of lesion 2: not found
    region[0, 19] = True  # outside every lesion
    per_lesion = unveil_counts(region, lesions, per_lesion=True)
    assert (per_lesion.lesions, per_lesion.found) == (3, 1)
    assert (per_lesion.region_pixels, per_lesion.region_in_lesion) == (8, 7)
    assert per_lesion.precision == pytest.approx(7 / 8)
    components = unveil_counts(region, lesions > 0)  # lesions 2 and 3 touch: one component of 32 px
    assert (components.lesions, components.found) == (2, 1)
    empty = np.zeros((20, 20), bool)
    total = unveil_recall([region, empty], [torch.from_numpy(lesions)[None], lesions], per_lesion=True)
    assert (total.lesions, total.found) == (6, 1) and total.recall == pytest.approx(1 / 6)
    assert np.isnan(unveil_recall([region], [np.zeros((20, 20))]).recall)
    with pytest.raises(ValueError, match="differ in size"):
        unveil_counts(region[:10], lesions)


def test_equal_area_mask_keeps_the_most_salient_pixels() -> None:
    saliency = np.arange(16, dtype=np.float32).reshape(4, 4)
    mask = equal_area_mask(saliency, 3)
    assert mask.sum() == 3 and mask.ravel()[-3:].all()
    assert not equal_area_mask(saliency, 0).any()
    with pytest.raises(ValueError, match="pixels"):
        equal_area_mask(saliency, 17)


def test_synthetic_frames_with_several_lesions(tmp_path: Path) -> None:
    args = {"n_frames": 8, "seed": 2, "size": 48, "prevalence": 0.5, "frames_per_study": 4}
    datalist = json.loads(make_capsule_dataset(tmp_path / "multi", **args, lesions_per_frame=(2, 3)).read_text())
    items = [item for split in datalist.values() for item in split]
    assert sum(item["label"] for item in items) == 4
    for item in items:
        label_map = np.asarray(Image.open(tmp_path / "multi" / item["label_map"]))
        lesion_map = np.asarray(Image.open(tmp_path / "multi" / item["lesion_map"]))
        nifti = nib.load(tmp_path / "multi" / item["lesion_map"].replace(".png", ".nii.gz")).get_fdata()
        np.testing.assert_array_equal(nifti, lesion_map)
        np.testing.assert_array_equal(lesion_map > 0, label_map > 0)
        assert sorted(np.unique(lesion_map[lesion_map > 0])) == list(range(1, item["n_lesions"] + 1))
        assert (item["n_lesions"] >= 2) == bool(item["label"])
    plain = make_capsule_dataset(tmp_path / "plain", **args)
    assert not (tmp_path / "plain" / "lesions").exists()
    assert all("lesion_map" not in item for split in json.loads(plain.read_text()).values() for item in split)
    image, label_map = make_capsule_frame(2, 0, 1, 48, positive=True)
    image2, label_map2, lesion_map = make_capsule_frame_lesions(2, 0, 1, 48, positive=True)
    assert np.array_equal(image, image2) and np.array_equal(label_map, label_map2)
    np.testing.assert_array_equal(lesion_map > 0, label_map > 0)
    with pytest.raises(ValueError, match="lesions_per_frame"):
        make_capsule_dataset(tmp_path / "bad", **args, lesions_per_frame=(0, 2))
    argv = ["synth", "capsule", "--out", "x", "--n-frames", "1", "--seed", "0", "--lesions-per-frame", "1-3"]
    assert build_parser().parse_args(argv).lesions_per_frame == (1, 3)


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("unveil_cli")
    make_capsule_dataset(root / "data", 3, seed=0, size=40, prevalence=0.5, frames_per_study=3)
    (root / "data" / "images" / "broken.png").write_bytes(b"not a png")
    torch.manual_seed(0)
    spec = spec_from_config("small_cnn", 2, 32)
    net = build_network(ModelSpec(**spec))
    torch.save({"model": net.state_dict(), "model_spec": spec}, root / "model.pt")
    torch.save(net.state_dict(), root / "plain.pt")
    return root


def test_cli_writes_panels_masks_and_csv(frames: Path) -> None:
    out = frames / "out"
    argv = ["unveil", "--checkpoint", str(frames / "model.pt"), "--input", str(frames / "data" / "images"),
            "--output", str(out), "--steps", "2", "--prob-threshold", "0.01", "--kernel-size", "3"]
    assert main(argv) == 0
    with (out / "unveil.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["file"]).name for r in rows] == [f"study0000_frame00{i}.png" for i in range(3)]
    with (out / "errors.csv").open() as f:
        assert [Path(r["file"]).name for r in csv.DictReader(f)] == ["broken.png"]
    for row in rows:
        name = f"{Path(row['file']).stem}_f000"
        label_map = np.asarray(Image.open(out / "masks" / f"{name}.png"))
        assert label_map.shape == (40, 40) and (out / "panels" / f"{name}.png").is_file()
        np.testing.assert_array_equal(nib.load(out / "masks" / f"{name}.nii.gz").get_fdata(), label_map)
        steps = int(row["steps"])  # 0 when hiding the first region raised the probability (random network)
        listed = [len(row[key].split(";")) if steps else 0 for key in ("probabilities", "roi_areas")]
        assert listed == [steps, steps]
        assert sorted(np.unique(label_map[label_map > 0])) == list(range(1, steps + 1))
        assert (row["stop_reason"] == "probability_rose") == (row["rejected_probability"] != "")
        areas = [float(a) for a in row["roi_areas"].split(";")] if steps else []
        assert [float((label_map == k).mean()) for k in range(1, steps + 1)] == pytest.approx(areas, abs=1e-6)


def test_cli_spec_from_checkpoint_or_flags(frames: Path, capsys: pytest.CaptureFixture) -> None:
    common = ["--input", str(frames / "data" / "images"), "--output", str(frames / "out2"), "--steps", "1"]
    assert main(["unveil", "--checkpoint", str(frames / "plain.pt"), *common]) == 1
    assert "holds no model_spec" in capsys.readouterr().err
    flags = ["--network", "small_cnn", "--num-classes", "2", "--image-size", "32", "--source", "grad_cam"]
    assert main(["unveil", "--checkpoint", str(frames / "plain.pt"), *common, *flags]) == 0
    assert main(["unveil", "--checkpoint", str(frames / "model.pt"), *common, "--image-size", "48"]) == 1
    assert "trained with image_size" in capsys.readouterr().err


def test_handler_logs_recall_and_panels(tmp_path: Path) -> None:
    from monai.engines import SupervisedEvaluator

    from medgain.handlers import UnveilPanelSaver

    images = torch.stack([blob_image(s) for s in SCENES])
    masks = (images > 0).float()
    batch = {"image": images, "label": torch.tensor([1, 1, 1]), "mask": masks, "has_mask": torch.tensor([1, 1, 0])}
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=[batch], network=BlobNet().eval(), decollate=False
    )
    unveiler = Unveiler(steps=5, fill=0.0, kernel_size=3, threshold=0.4)
    UnveilPanelSaver(str(tmp_path), unveiler, num_samples=3, num_panels=2).attach(evaluator)
    evaluator.run()
    assert evaluator.state.metrics["val_unveil_recall"] == 1.0  # every blob of the two masked samples
    assert (tmp_path / "unveil" / "epoch_001.png").is_file()
    with pytest.raises(ValueError, match="num_panels"):
        UnveilPanelSaver(str(tmp_path), unveiler, num_samples=2, num_panels=3)

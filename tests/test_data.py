"""Tests for medgain.data: datalists, frame expansion, mask budget, folder scan, sampler, fill-colour cache."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from conftest import write_dicom
from torch.utils.data import DataLoader

import medgain.transforms.io
from medgain.data.datalist import apply_mask_budget, expand_frames, load_datalist, scan_folder
from medgain.data.fill_color import cached_fill_color
from medgain.data.sampler import PositiveFractionBatchSampler


def write_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def write_clip(path: Path, n_frames: int) -> Path:
    return write_dicom(path, np.zeros((n_frames, 4, 5, 3), np.uint8))


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    write_png(tmp_path / "images" / "a.png", np.zeros((4, 5, 3), np.uint8))
    write_png(tmp_path / "images" / "b.png", np.zeros((4, 5, 3), np.uint8))
    write_png(tmp_path / "labels" / "a.png", np.zeros((4, 5), np.uint8))
    write_clip(tmp_path / "images" / "clip.dcm", 3)
    return tmp_path


def write_datalist(directory: Path, content: dict) -> Path:
    path = directory / "datalist.json"
    path.write_text(json.dumps(content))
    return path


def test_load_datalist_resolves_paths(dataset_dir):
    path = write_datalist(
        dataset_dir,
        {
            "training": [
                {"image": "images/a.png", "label": 1, "label_map": "labels/a.png", "study": "images"},
                {"image": "images/b.png", "label": 0, "label_map": None},
            ],
            "validation": [{"image": "images/a.png", "label": 0}],
        },
    )
    items = load_datalist(path, "training")
    assert items == [
        {
            "image": str(dataset_dir / "images" / "a.png"),
            "label": 1,
            "label_map": str(dataset_dir / "labels" / "a.png"),
            "study": "images",
        },
        {"image": str(dataset_dir / "images" / "b.png"), "label": 0},
    ]
    other = dataset_dir / "copy"
    write_png(other / "images" / "a.png", np.zeros((2, 2), np.uint8))
    assert load_datalist(path, "validation", base_dir=other)[0]["image"] == str(other / "images" / "a.png")


def test_load_datalist_errors(dataset_dir):
    path = write_datalist(
        dataset_dir, {"training": [{"image": "images/a.png", "label": 1}, {"image": "images/zz.png", "label": 0}]}
    )
    missing_image = r"datalist\.json: item 1 of 'training': image file not found: .*zz\.png"
    with pytest.raises(FileNotFoundError, match=missing_image):
        load_datalist(path, "training")
    with pytest.raises(ValueError, match=re.escape("no split 'test' in the datalist, available splits: ['training']")):
        load_datalist(path, "test")
    missing_map = write_datalist(
        dataset_dir, {"training": [{"image": "images/a.png", "label": 1, "label_map": "labels/zz.png"}]}
    )
    with pytest.raises(FileNotFoundError, match=r"item 0 of 'training': label_map file not found: .*zz\.png"):
        load_datalist(missing_map, "training")
    for bad_label in ("1", 1.5, True, -1, None):
        bad = write_datalist(dataset_dir, {"training": [{"image": "images/a.png", "label": bad_label}]})
        with pytest.raises(ValueError, match=r"item 0 of 'training': 'label' must be a non-negative integer"):
            load_datalist(bad, "training")
    no_image = write_datalist(dataset_dir, {"training": [{"label": 0}]})
    with pytest.raises(ValueError, match="'image' must be a file path string"):
        load_datalist(no_image, "training")
    broken = dataset_dir / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json: datalist is not valid JSON"):
        load_datalist(broken, "training")
    with pytest.raises(FileNotFoundError, match=r"nope\.json: datalist file not found"):
        load_datalist(dataset_dir / "nope.json", "training")


def test_expand_frames(dataset_dir):
    items = [
        {"image": str(dataset_dir / "images" / "a.png"), "label": 1},
        {"image": str(dataset_dir / "images" / "clip.dcm"), "label": 0, "study": "s1"},
    ]
    expanded = expand_frames(items)
    assert [(Path(i["image"]).name, i["frame"]) for i in expanded] == [
        ("a.png", 0),
        ("clip.dcm", 0),
        ("clip.dcm", 1),
        ("clip.dcm", 2),
    ]
    assert all(i["study"] == "s1" for i in expanded[1:])
    assert "frame" not in items[1]


def budget_items(n_with_map: int) -> list[dict]:
    items = [{"image": f"/d/pos{i}.png", "label": 1, "label_map": f"/d/lab{i}.png"} for i in range(n_with_map)]
    items += [{"image": f"/d/nomap{i}.png", "label": 1} for i in range(20)]
    items += [{"image": f"/d/neg{i}.png", "label": 0, "label_map": f"/d/nlab{i}.png"} for i in range(30)]
    return items


def chosen(items: list[dict]) -> set[str]:
    return {i["image"] for i in items if i["has_mask"]}


@pytest.mark.parametrize("n, fraction, expected", [(200, 1.0, 200), (200, 0.1, 20), (200, 0.01, 2), (30, 0.01, 1)])
def test_mask_budget_counts_and_order_independence(n, fraction, expected):
    items = budget_items(n)
    result = apply_mask_budget(items, fraction, seed=7)
    selected = chosen(result)
    assert len(selected) == expected
    assert all(name.startswith("/d/pos") for name in selected)
    assert all(isinstance(i["has_mask"], bool) for i in result) and "has_mask" not in items[0]
    shuffled = items[:]
    random.Random(0).shuffle(shuffled)
    assert chosen(apply_mask_budget(shuffled, fraction, seed=7)) == selected
    assert chosen(apply_mask_budget(items, fraction, seed=7)) == selected
    if expected < n:
        assert chosen(apply_mask_budget(items, fraction, seed=8)) != selected


def test_mask_budget_zero_and_invalid():
    assert chosen(apply_mask_budget(budget_items(10), 0.0, seed=0)) == set()
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\]"):
        apply_mask_budget(budget_items(10), 1.5, seed=0)


def test_scan_folder_probes_every_file(tmp_path):
    write_png(tmp_path / "b" / "x.png", np.zeros((4, 5, 3), np.uint8))
    write_png(tmp_path / "a.PNG", np.zeros((4, 5), np.uint8))
    write_clip(tmp_path / "b" / "clip.dcm", 2)
    truncated = write_clip(tmp_path / "c_trunc.dcm", 3)
    truncated.write_bytes(truncated.read_bytes()[:-30])
    corrupt = write_png(tmp_path / "corrupt.png", np.zeros((4, 5, 3), np.uint8))
    corrupt.write_bytes(corrupt.read_bytes()[:-30])
    (tmp_path / "notes.txt").write_text("ignored")
    items, errors = scan_folder(tmp_path)
    assert [(Path(i["image"]).relative_to(tmp_path).as_posix(), i["frame"]) for i in items] == [
        ("a.PNG", 0),
        ("b/clip.dcm", 0),
        ("b/clip.dcm", 1),
        ("b/x.png", 0),
    ]
    assert [Path(e["file"]).name for e in errors] == ["c_trunc.dcm", "corrupt.png"]
    assert "cannot decode pixel data of frame 2" in errors[0]["reason"]
    assert "cannot decode image" in errors[1]["reason"]
    with pytest.raises(NotADirectoryError, match="input folder not found"):
        scan_folder(tmp_path / "missing")


LABELS = [1] * 10 + [0] * 40


def test_sampler_batches():
    sampler = PositiveFractionBatchSampler(LABELS, batch_size=8, pos_fraction=0.25, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == math.ceil(40 / 6)
    for batch in batches:
        assert len(batch) == 8 and sum(LABELS[i] for i in batch) == 2
    assert {LABELS[batch[0]] for batch in batches} == {0, 1}  # positives are not always first
    negatives = [i for batch in batches for i in batch if LABELS[i] == 0]
    assert set(negatives) == set(range(10, 50))
    positives = [i for batch in batches for i in batch if LABELS[i] == 1]
    assert sorted(positives[:10]) == list(range(10))  # one full pass before any positive repeats
    assert list(PositiveFractionBatchSampler(LABELS, 8, 0.25, seed=1)) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches
    sampler.set_epoch(0)
    assert list(sampler) == batches
    assert len(PositiveFractionBatchSampler(LABELS, 8, 0.25, num_batches=3)) == 3
    assert len(list(PositiveFractionBatchSampler(LABELS, 8, 0.25, num_batches=3))) == 3
    as_items = PositiveFractionBatchSampler([{"label": v} for v in LABELS], 8, 0.25, seed=1)
    assert list(as_items) == batches
    assert all(sum(LABELS[i] for i in b) == 1 for b in PositiveFractionBatchSampler(LABELS, 4, 0.1))


def test_sampler_ddp_shares_are_disjoint():
    labels = [1] * 5 + [0] * 48
    shares = [list(PositiveFractionBatchSampler(labels, 8, 0.25, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 4
    negatives = [{i for b in share for i in b if labels[i] == 0} for share in shares]
    assert not negatives[0] & negatives[1] and len(negatives[0] | negatives[1]) == 48
    # an odd number of batches is padded so that every rank gets the same count, in the global order
    global_batches = list(PositiveFractionBatchSampler(LABELS, 8, 0.25, seed=3, num_batches=8))
    ranks = [PositiveFractionBatchSampler(LABELS, 8, 0.25, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    assert [len(r) for r in ranks] == [4, 4]
    assert list(ranks[0]) == global_batches[0::2] and list(ranks[1]) == global_batches[1::2]


def test_sampler_with_dataloader_and_errors():
    data = [{"x": i} for i in range(len(LABELS))]
    loader = DataLoader(data, batch_sampler=PositiveFractionBatchSampler(LABELS, 8, 0.25))
    assert [len(b["x"]) for b in loader] == [8] * 7
    with pytest.raises(ValueError, match="needs positive and negative labels, got 0 positive"):
        PositiveFractionBatchSampler([0, 0, 0], 2)
    with pytest.raises(ValueError, match="and 0 negative"):
        PositiveFractionBatchSampler([1, 1], 2)
    for fraction in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"pos_fraction must be in \(0, 1\)"):
            PositiveFractionBatchSampler(LABELS, 8, fraction)
    with pytest.raises(ValueError, match="rank"):
        PositiveFractionBatchSampler(LABELS, 8, num_replicas=2, rank=2)


def fill_items(tmp_path: Path) -> list[dict]:
    first = np.zeros((4, 4, 3), np.uint8)
    first[:2, :2] = (204, 51, 102)  # lesion (label 1), 4 pixels
    first[3, 3] = (255, 255, 255)  # label 2, not a lesion by default
    label1 = np.zeros((4, 4), np.uint8)
    label1[:2, :2] = 1
    label1[3, 3] = 2
    second = np.full((4, 4, 3), 10, np.uint8)
    second[0, :2] = (0, 255, 0)  # lesion, 2 pixels
    label2 = np.zeros((4, 4), np.uint8)
    label2[0, :2] = 1
    return [
        {"image": str(write_png(tmp_path / "1.png", first)), "label_map": str(write_png(tmp_path / "l1.png", label1))},
        {"image": str(write_png(tmp_path / "2.png", second)), "label_map": str(write_png(tmp_path / "l2.png", label2))},
        {"image": str(write_png(tmp_path / "3.png", second))},
    ]


def test_fill_color_value_and_cache(tmp_path, monkeypatch):
    items = fill_items(tmp_path)
    cache_dir = tmp_path / ".medgain_cache"
    color = cached_fill_color(items, cache_dir, ignore_labels=[2])
    expected = (4 * np.array([0.8, 0.2, 0.4]) + 2 * np.array([0.0, 1.0, 0.0])) / 6
    np.testing.assert_allclose(color, expected, atol=1e-6)
    cache_files = list(cache_dir.glob("fill_color_*.json"))
    assert len(cache_files) == 1
    assert json.loads(cache_files[0].read_text())["fill_color"] == color

    def no_reading(*args, **kwargs):
        raise AssertionError("the cache hit must not read any image")

    monkeypatch.setattr(medgain.transforms.io, "read_frame", no_reading)
    assert cached_fill_color(list(reversed(items)), cache_dir, ignore_labels=[2]) == color
    with pytest.raises(AssertionError, match="must not read"):
        cached_fill_color(items, cache_dir, lesion_labels=[1, 2])
    monkeypatch.undo()

    both = cached_fill_color(items, cache_dir, lesion_labels=[1, 2])
    np.testing.assert_allclose(both, (4 * np.array([0.8, 0.2, 0.4]) + 2 * np.array([0.0, 1.0, 0.0]) + 1) / 7, atol=1e-6)
    assert len(list(cache_dir.glob("fill_color_*.json"))) == 2
    budgeted = [{**items[0], "has_mask": False}, items[1]]
    np.testing.assert_allclose(cached_fill_color(budgeted, cache_dir), [0.0, 1.0, 0.0], atol=1e-6)


def test_fill_color_errors(tmp_path):
    items = fill_items(tmp_path)
    with pytest.raises(ValueError, match="none of the 1 items has a label map"):
        cached_fill_color(items[2:], tmp_path)
    with pytest.raises(ValueError, match="no lesion pixel"):
        cached_fill_color(items, tmp_path, lesion_labels=[5], ignore_labels=[1, 2])
    assert not list(tmp_path.glob("fill_color_*.json"))
    small = write_png(tmp_path / "small.png", np.zeros((2, 2), np.uint8))
    wrong_size = [{"image": items[0]["image"], "label_map": str(small)}]
    with pytest.raises(ValueError, match=r"small\.png.*1\.png"):
        cached_fill_color(wrong_size, tmp_path)


def test_sampler_passes_advance_the_shuffle_deterministically() -> None:
    from medgain.data.sampler import PositiveFractionBatchSampler

    labels = [1] * 6 + [0] * 30
    a, b = PositiveFractionBatchSampler(labels, 8, seed=3), PositiveFractionBatchSampler(labels, 8, seed=3)
    first, second = list(a), list(a)
    assert first != second  # a new epoch, a new order
    assert [first, second] == [list(b), list(b)]  # same seed, same sequence of epochs


def test_image_listed_in_two_splits_is_rejected(dataset_dir):
    from medgain.data.capsule import check_study_splits, prepare_items

    (dataset_dir / "images" / "sub").mkdir()
    content = {
        "training": [{"image": "images/a.png", "label": 1}, {"image": "images/clip.dcm", "label": 0}],
        "validation": [{"image": "images/b.png", "label": 0}],
        "test": [{"image": "images/sub/../a.png", "label": 1}],  # the same file, spelled differently
    }
    path = write_datalist(dataset_dir, content)
    message = r"images/a\.png.*appears in both 'training' and 'test'"
    with pytest.raises(ValueError, match=message):
        check_study_splits(path)
    with pytest.raises(ValueError, match=message):
        prepare_items(path, "validation")
    content["test"] = [{"image": "images/clip.dcm", "label": 0, "frame": 2}]  # every frame of a clip is used
    with pytest.raises(ValueError, match=r"clip\.dcm.*appears in both 'training' and 'test'"):
        check_study_splits(write_datalist(dataset_dir, content))
    (dataset_dir / "images" / "link.png").symlink_to(dataset_dir / "images" / "b.png")
    content["test"] = [{"image": "images/link.png", "label": 0}]
    with pytest.raises(ValueError, match=r"b\.png.*appears in both 'validation' and 'test'"):
        check_study_splits(write_datalist(dataset_dir, content))
    content["test"] = [{"image": "images/a.png", "label": 1}]
    content["training"] = content["training"][1:] * 2  # repeated within one split: allowed
    check_study_splits(write_datalist(dataset_dir, content))


def video_items(root: Path, videos: int = 5, frames: int = 20) -> list[dict]:
    return [
        {"image": str(root / f"video_{v}" / f"frame_{f:04d}.png"), "label": 1, "label_map": "m.png"}
        for v in range(videos)
        for f in range(1, frames + 1)
    ]


def test_mask_budget_ranks_the_path_inside_the_data_set(tmp_path):
    def picked(root: Path, items: list[dict]) -> set[str]:
        result = apply_mask_budget(items, 0.2, seed=0, base_dir=root)
        return {Path(i["image"]).relative_to(root).as_posix() for i in result if i["has_mask"]}

    here, there = tmp_path / "a" / "data", tmp_path / "b" / "copy"
    selected = picked(here, video_items(here))
    assert len(selected) == 20
    names_per_video = [{Path(p).name for p in selected if p.startswith(f"video_{v}/")} for v in range(5)]
    assert len(set().union(*names_per_video)) > 4  # not the same few frame names in every video
    assert len({frozenset(names) for names in names_per_video}) > 1
    shuffled = video_items(there)
    random.Random(1).shuffle(shuffled)
    assert picked(there, shuffled) == selected  # wherever the data set is stored, in any item order


def test_prepare_items_budget_uses_the_datalist_folder(tmp_path):
    from medgain.data.capsule import prepare_items

    content = {"training": []}
    for v in range(5):
        for f in range(1, 21):
            image = write_png(tmp_path / f"video_{v}" / f"frame_{f:04d}.png", np.zeros((2, 2), np.uint8))
            relative = image.relative_to(tmp_path).as_posix()
            content["training"].append({"image": relative, "label": 1, "label_map": "m.png"})
    write_png(tmp_path / "m.png", np.zeros((2, 2), np.uint8))
    items = prepare_items(write_datalist(tmp_path, content), "training", masks_fraction=0.05, seed=0)
    names = {Path(i["image"]).name for i in items if i["has_mask"]}
    expected = apply_mask_budget(video_items(tmp_path), 0.05, seed=0, base_dir=tmp_path)
    assert names == {Path(i["image"]).name for i in expected if i["has_mask"]}
    assert len(names) > 1


@pytest.mark.parametrize(
    "batch_size, fraction, positives",
    [(10, 0.25, 3), (10, 0.35, 4), (10, 0.15, 2), (10, 0.45, 5)]
    + [(8, 0.25, 2), (4, 0.1, 1), (2, 0.9, 1), (20, 0.99, 19)],
)
def test_sampler_positive_count_rounds_half_up(batch_size, fraction, positives):
    labels = [1] * 30 + [0] * 40
    sampler = PositiveFractionBatchSampler(labels, batch_size, fraction)
    assert sampler.pos_per_batch == positives and sampler.neg_per_batch == batch_size - positives
    assert all(sum(labels[i] for i in b) == positives for b in sampler)


@pytest.mark.parametrize("n_pos, n_neg", [(3, 13), (5, 7), (4, 9)])
def test_sampler_never_repeats_an_index_within_a_batch(n_pos, n_neg):
    labels = [1] * n_pos + [0] * n_neg
    for seed in range(12):
        sampler = PositiveFractionBatchSampler(labels, 6, 0.5, seed=seed, num_batches=40)
        batches = list(sampler)
        assert all(len(set(b)) == 6 for b in batches)
        # every pass over a class is still a permutation: after any number of batches, counts differ by <= 1
        counts = np.zeros(len(labels), int)
        for batch in batches:
            counts[batch] += 1
            assert np.ptp(counts[:n_pos]) <= 1 and np.ptp(counts[n_pos:]) <= 1


def test_sampler_small_class_repeats_evenly():
    labels = [1] * 3 + [0] * 20  # 5 positives per batch from 3 positive samples: 2 + 2 + 1 copies
    for seed in range(10):
        for batch in PositiveFractionBatchSampler(labels, 10, 0.5, seed=seed, num_batches=8):
            assert sorted(batch.count(i) for i in (0, 1, 2)) == [1, 2, 2]
            assert len(set(batch)) == 8  # the negatives do not repeat


@pytest.mark.parametrize("num_workers", [0, 1])
def test_sampler_epoch_follows_a_resumed_trainer(num_workers):
    from ignite.engine import Engine, Events

    from medgain.handlers import SamplerEpoch

    labels = [1] * 5 + [0] * 19
    data = list(range(len(labels)))

    def engine() -> tuple[Engine, DataLoader, dict[int, list[list[int]]]]:
        sampler = PositiveFractionBatchSampler(labels, 6, seed=4)
        loader = DataLoader(data, batch_sampler=sampler, num_workers=num_workers)
        seen: dict[int, list[list[int]]] = {}
        trainer = Engine(lambda e, batch: seen.setdefault(e.state.epoch, []).append(batch.tolist()))
        SamplerEpoch(sampler).attach(trainer)
        return trainer, loader, seen

    full, loader, seen_full = engine()
    full.run(loader, max_epochs=3)
    assert seen_full[1] != seen_full[2] != seen_full[3]
    first, loader, _ = engine()
    first.add_event_handler(Events.EPOCH_COMPLETED(once=2), lambda e: e.terminate())
    first.run(loader, max_epochs=3)
    resumed, loader, seen_resumed = engine()
    resumed.load_state_dict(first.state_dict())  # what the checkpoint of the trainer restores
    resumed.run(loader)
    assert list(seen_resumed) == [3] and seen_resumed[3] == seen_full[3]

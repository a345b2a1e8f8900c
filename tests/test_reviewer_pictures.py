"""What a reviewer sees (issue 21): attention outside the capsule's field of view flagged and never setting the
colour scale, one honest scale, and a review report whose counts and comparisons say only what is true."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from PIL import Image

from medgain.attention_fov import FieldOfView, attention_outside_fov, attention_peak_outside_fov, fov_display_scale
from medgain.handlers.attention_outside_fov import AttentionOutsideFOV
from medgain.handlers.attention_overlay import AttentionOverlaySaver
from medgain.handlers.heatmap_writer import HeatmapWriter
from medgain.registry.figures import RecordArrays, bootstrap_figures, calibration, confusion, operating_table
from medgain.registry.report import metric_words, render_report
from medgain.registry.review import attention_fov_summary, compare_versions
from medgain.synth.capsule import make_capsule_frame
from medgain.visualize import cam_overlay, colorize, decision_words, heatmap_panel

SIZE = 64


def _capsule(frame: int) -> torch.Tensor:
    """A synthetic capsule frame (1, 3, H, W) in [0, 1]: a lit disc inside a dark vignette."""
    image, _ = make_capsule_frame(0, 0, frame, SIZE)
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0


def _blob(cy: float, cx: float, height: float = 1.0, sigma: float = 3.0) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(SIZE.__float__()), torch.arange(SIZE.__float__()), indexing="ij")
    return height * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))


def test_fov_of_a_capsule_frame_and_the_attention_outside_it() -> None:
    image = _capsule(0)
    fov = FieldOfView()(image)
    assert fov.shape == (1, 1, SIZE, SIZE) and fov.dtype == torch.bool
    assert not fov[0, 0, 0, 0] and not fov[0, 0, -1, -1] and fov[0, 0, SIZE // 2, SIZE // 2]
    assert 0.6 < float(fov.float().mean()) < 0.8  # a disc of radius ~0.48 of the side: pi * 0.48^2 ~ 0.72
    corner = _blob(0, 0)[None, None]  # all its mass in the dark corner
    centre = _blob(SIZE / 2, SIZE / 2)[None, None]
    both = corner + centre
    fractions = attention_outside_fov(torch.cat([corner, centre, both]), fov.expand(3, 1, SIZE, SIZE))
    assert fractions[0] > 0.95 and fractions[1] < 0.01
    expected = float((corner * ~fov).sum() / both.sum())  # the corner blob's share of the pair
    assert fractions[2] == pytest.approx(expected, rel=1e-5) and 0.15 < fractions[2] < 0.35
    peaks = attention_peak_outside_fov(torch.cat([corner, centre, 2 * corner + centre]), fov.expand(3, 1, SIZE, SIZE))
    assert peaks.tolist() == [True, False, True]
    assert attention_outside_fov(torch.zeros(1, 1, SIZE, SIZE), fov).item() == 0.0  # no attention, nothing outside


def test_fov_keeps_dark_regions_inside_the_disc_and_reads_a_mask_file(tmp_path: Path) -> None:
    image = _capsule(1)
    image[..., 28:36, 28:36] = 0.0  # a dark lumen in the middle is tissue, not vignette
    fov = FieldOfView()(image)
    assert bool(fov[0, 0, 28:36, 28:36].all())
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask).save(tmp_path / "fov.png")
    fixed = FieldOfView(mask_file=str(tmp_path / "fov.png"))(torch.rand(2, 3, 32, 32))
    assert fixed.shape == (2, 1, 32, 32) and int(fixed[0].sum()) == 16 * 16 and bool(fixed[0, 0, 8:24, 8:24].all())
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(ValueError, match=r"empty\.png: the field-of-view mask is empty"):
        FieldOfView(mask_file=str(tmp_path / "empty.png"))
    (tmp_path / "bad.png").write_text("not a picture")
    with pytest.raises(ValueError, match=r"bad\.png: cannot read the field-of-view mask"):
        FieldOfView(mask_file=str(tmp_path / "bad.png"))


def test_attention_outside_fov_metric_is_the_mean_over_frames() -> None:
    images = torch.cat([_capsule(0), _capsule(2)])
    cams = torch.stack([_blob(0, 0), _blob(SIZE / 2, SIZE / 2)])[:, None]
    engine = Engine(lambda e, b: b)
    metric = AttentionOutsideFOV(FieldOfView())
    metric.attach(engine, "test_attention_outside_fov")
    engine.run([{"image": images, "cam": cams}], max_epochs=1)
    expected = float(attention_outside_fov(cams, FieldOfView()(images)).mean())
    assert engine.state.metrics["test_attention_outside_fov"] == pytest.approx(expected) and expected > 0.45


def test_one_scale_shared_across_frames_not_set_outside_the_fov(tmp_path: Path) -> None:
    images = [_capsule(i) for i in range(3)]
    fovs = [FieldOfView()(im)[0, 0] for im in images]
    cams = [_blob(0, 0, 50.0) + _blob(30, 30, 2.0), _blob(0, 0, 50.0) + _blob(30, 30, 0.5), _blob(30, 34, 1.0)]
    scale = fov_display_scale(cams, fovs)
    assert scale == pytest.approx(2.0, rel=1e-3)  # the largest value inside the field of view, of all frames
    assert fov_display_scale(cams, None) == pytest.approx(50.0, rel=1e-3)  # without one: the corner would set it
    saver = AttentionOverlaySaver(str(tmp_path), 2, 1, split="test", per_round=False, threshold_metric="t",
                                  fov=FieldOfView())
    for i, (image, cam) in enumerate(zip(images, cams)):
        saver.samples.append({"image": image[0], "cam": cam, "mask": None, "ill": i < 2, "class": int(i < 2),
                              "score": 2.0 - 2 * i, "id": f"f-{i:016x}", "fov": fovs[i]})
    saver.write(SimpleNamespace(state=SimpleNamespace(epoch=1, metrics={"t": 0.0})))
    with Image.open(tmp_path / "attention" / "test.png") as png:
        assert png.size == (990, 700)  # 3 columns of 2.9 in + colour bar, one row of image and overlay, 100 dpi
    assert saver.display is not None and saver.display["scale"] == pytest.approx(2.0, rel=1e-3)  # for the model file
    assert saver.display["epoch"] == 1 and "inside the field of view" in saver.display["how"]


def test_decision_words_say_p_threshold_and_decision() -> None:
    assert decision_words(float(np.log(0.97 / 0.03)), float(np.log(0.9987 / 0.0013))) == "p 0.97 < 0.9987 → healthy"
    assert decision_words(3.0, 0.0) == "p 0.9526 ≥ 0.5 → ILL"
    logit = lambda p: float(np.log(p / (1 - p)))  # noqa: E731
    assert decision_words(logit(0.99871), logit(0.99874)) == "p 0.99871 < 0.99874 → healthy"  # digits tell them apart
    assert "no operating point" in decision_words(0.0, None)


def _rows(n_pos: int = 8, n_neg: int = 12) -> list[dict[str, Any]]:
    scores = np.concatenate([np.linspace(-1.5, 2.5, n_pos), np.linspace(-3.0, 0.5, n_neg)])  # 3 missed, 2 alarms
    rows = []
    for i, score in enumerate(scores.tolist()):
        ill = i < n_pos
        rows.append({"ref": f"f-{i:016x}", "label": int(ill), "score": score, "iou": None, "attention_in_mask": None,
                     "attention_outside_fov": 0.9 if i % 3 == 0 else 0.05, "peak_outside_fov": i % 3 == 0})
    return rows


def _review(tmp_path: Path, champion_threshold: float | None) -> dict[str, Any]:
    """A review dict of 20 frames (8 ill) at the log-odds threshold 0, the gallery showing 2 frames a kind."""
    rows = _rows()
    records, threshold = RecordArrays(rows), 0.0
    champion = RecordArrays([{**r, "score": r["score"] + 0.3} for r in rows])
    folder = tmp_path / "candidate" / "gallery"
    folder.mkdir(parents=True)
    gallery: dict[str, Any] = {"threshold": threshold, "note": "", "scale": 2.0, "scale_note": "one colour scale"}
    for kind, want_ill, want_above in (("true_positive", 1, True), ("false_negative", 1, False),
                                       ("false_positive", 0, True)):
        chosen = [r for r in rows if r["label"] == want_ill and (r["score"] >= threshold) == want_above][:2]
        for r in chosen:
            Image.fromarray(np.zeros((8, 16, 3), np.uint8)).save(folder / f"{r['ref']}.png")
        gallery[kind] = [{"ref": r["ref"], "score": r["score"], "probability": 0.5, "iou": None} for r in chosen]
    gallery["counts"] = confusion(records, gallery["threshold"])
    figures = bootstrap_figures(records, threshold, 20)
    names = ("the candidate (version 2)", "champion (version 1)")
    return {
        "model_card": {"model": "m", "version": "2"}, "split": "test", "data_hash": "abc", "time": "now",
        "figures": figures, "resampled_by": "frame", "n_bootstrap": 20, "counts": {"frames": 20, "positives": 8},
        "notes": {"test_tpr_at_fpr_0.0005": "too few negatives"}, "unit": "study",
        "operating_points": operating_table(records, threshold, None), "calibration": calibration(records),
        "confusion": confusion(records, threshold), "gallery": gallery, "attention_fov": attention_fov_summary(rows),
        "subgroups": {"level": {"figures": {"n": 3, "positives": 2, "auc": 0.5}, "units": []}, "subgroups": {}},
        "curves": {"version 2": {"score": records.score.tolist(), "label": records.label.tolist()}},
        "comparison": {"alias": "champion", "version": "1",
                       **compare_versions(records, champion, (threshold, champion_threshold), names, 20)},
    }


def test_report_counts_come_from_the_confusion_table(tmp_path: Path) -> None:
    review = _review(tmp_path, champion_threshold=0.0)
    text = render_report(review, tmp_path)
    counts = review["confusion"]
    assert counts["fn"] > len(review["gallery"]["false_negative"]) == 2
    assert f"False negatives (missed lesions): {counts['fn']}; the 2 lowest-scored shown" in text
    assert f"True positives (lesions found): {counts['tp']}" in text
    assert f"False positives (false alarms): {counts['fp']}" in text
    assert "studys" not in text and "(3 studies, 2 with lesions" in text
    assert "<abbr title='test_tpr_at_fpr_0.0005'>sensitivity at 0.05 % false alarms</abbr>" in text
    assert metric_words("test_retuned_tpr_at_fpr_0.001", "test").startswith("sensitivity at 0.1 % false alarms")
    assert "Grad-CAM, one scale" not in text or "colour bar" in text  # the gallery's colour bar is an image
    assert "alt='colour bar'" in text


def test_no_disagreement_list_when_the_champion_takes_no_decisions(tmp_path: Path) -> None:
    review = _review(tmp_path / "a", champion_threshold=None)
    comparison = review["comparison"]
    assert not comparison["decisions"] and comparison["disagreements"] is None
    assert "sensitivity" not in comparison["figures"] and "auc" in comparison["figures"]  # scores only
    text = render_report(review, tmp_path / "a")
    assert "decide differently" not in text and "<th class='l'>frame</th><th>truth" not in text
    assert "Champion (version 1) has no operating point and so takes no decisions" in text
    decided = _review(tmp_path / "b", champion_threshold=0.0)["comparison"]
    assert decided["decisions"] and decided["n_disagreements"] == len(decided["disagreements"]) > 0
    assert "Frames where the two decide differently" in render_report(_review(tmp_path / "c", 0.0), tmp_path / "c")


def test_report_lists_frames_whose_attention_peak_is_outside_the_fov(tmp_path: Path) -> None:
    review = _review(tmp_path, champion_threshold=0.0)
    fov = review["attention_fov"]
    assert fov["n_peak_outside"] == 7 and fov["high"]
    assert fov["mean_outside"] == pytest.approx((7 * 0.9 + 13 * 0.05) / 20)
    text = render_report(review, tmp_path)
    assert "class='warn'>On average 35 % of the attention" in text
    assert re.search(r"attention peak lies outside the field of view: 7 of 20", text)
    assert all(f"<td class='l'>{r['ref']}</td>" in text for r in fov["peak_outside"])


def test_inference_heatmaps_share_one_fixed_scale(tmp_path: Path) -> None:
    image = torch.full((2, 3, 32, 32), 0.5)
    cam = torch.stack([_blob(16, 16, 4.0)[:32, :32], _blob(16, 16, 1.0)[:32, :32]])[:, None]
    score = torch.tensor([[0.0, 3.0], [0.0, -2.0]])  # log-odds 3 (p 0.95) and -2 (p 0.12)
    engine = Engine(lambda e, b: b)
    engine.state.batch = {"image_path": [str(tmp_path / "a.png"), str(tmp_path / "b.png")], "frame": torch.zeros(2)}
    engine.state.output = {"image": image, "cam": cam, "pred": score}
    writer = HeatmapWriter(str(tmp_path / "fixed"), num_threads=0, threshold=0.0, cam_scale=4.0)
    writer.start()
    writer(engine)
    peaks = []
    for stem in ("a", "b"):
        png = np.asarray(Image.open(tmp_path / "fixed" / "heatmaps" / f"{stem}_f0.png"))
        assert png.shape[0] > 256 + 2 * 17  # the overlay x8 and two caption lines under it
        peaks.append(png[16 * 8, 16 * 8].astype(int))
    blend = lambda v: np.round(255 * (0.25 + 0.5 * colorize(np.array([[v]]))[0, 0])).astype(int)  # noqa: E731
    np.testing.assert_allclose(peaks[0], blend(1.0), atol=2)  # 4 = the top of the scale
    np.testing.assert_allclose(peaks[1], blend(0.25), atol=2)  # the weaker, healthy frame stays cool, not red
    words = [text for _, text in writer._captions(engine, cam)]
    assert words[0].startswith("p 0.9526 ≥ 0.5 → ILL") and words[1].startswith("p 0.1192 < 0.5 → healthy")
    assert all(w.endswith("one fixed scale for all frames, 0 to 4 (given)") for w in words)
    with pytest.raises(ValueError, match="cam_scale must be a positive number"):
        HeatmapWriter(str(tmp_path), cam_scale=0.0)


def _saved_model(tmp_path: Path, gallery_scale: float | None) -> Path:
    """A model file written by BestModelSaver, with the colour scale of a validation gallery (None: no gallery)."""
    from medgain.handlers.best_checkpoint import BestModelSaver

    gallery = None
    if gallery_scale is not None:
        gallery = SimpleNamespace(display={"scale": gallery_scale, "how": "the gallery's top", "epoch": 1})
    saver = BestModelSaver(str(tmp_path), torch.nn.Linear(2, 2), attention_gallery=gallery)  # type: ignore[arg-type]
    engine = Engine(lambda e, b: b)
    engine.state.epoch = 1
    engine.state.metrics = {"val_tpr_at_fpr_0.001": 0.5, "val_tpr_at_fpr_0.001_threshold": 0.0, "val_auc": 0.9}
    saver(engine)
    return saver.checkpoint_path


def test_inference_heatmaps_use_the_scale_stored_in_the_model_file(tmp_path: Path) -> None:
    from medgain.model_file import load_attention_display

    model = _saved_model(tmp_path / "gallery", 4.0)
    assert load_attention_display(model) == {"scale": 4.0, "how": "the gallery's top"}
    image = torch.full((2, 3, 32, 32), 0.5)
    weak = _blob(24, 24, 1.0)[:32, :32]
    cam = torch.stack([torch.maximum(_blob(8, 8, 4.0)[:32, :32], weak), weak])[:, None]  # maxima 4 and 1
    engine = Engine(lambda e, b: b)
    engine.state.batch = {"image_path": [str(tmp_path / "a.png"), str(tmp_path / "b.png")], "frame": torch.zeros(2)}
    engine.state.output = {"image": image, "cam": cam, "pred": torch.tensor([[0.0, 3.0], [0.0, -2.0]])}
    writer = HeatmapWriter(str(tmp_path / "out"), num_threads=0, checkpoint=str(model))  # heatmap_scale: null
    writer.start()
    writer(engine)
    pngs = [np.asarray(Image.open(tmp_path / "out" / "heatmaps" / f"{s}_f0.png")).astype(int) for s in "ab"]
    np.testing.assert_allclose(pngs[0][24 * 8, 24 * 8], pngs[1][24 * 8, 24 * 8], atol=2)  # same value, same colour
    blend = lambda v: np.round(255 * (0.25 + 0.5 * colorize(np.array([[v]]))[0, 0])).astype(int)  # noqa: E731
    np.testing.assert_allclose(pngs[1][24 * 8, 24 * 8], blend(0.25), atol=2)  # 1 of 4: cool, not the top colour
    words = [text for _, text in writer._captions(engine, cam)]
    assert all(w.endswith("0 to 4 (the model's validation gallery)") for w in words)
    given = HeatmapWriter(str(tmp_path / "given"), num_threads=0, checkpoint=str(model), cam_scale=2.0)
    given.start()
    assert given.cam_scale == 2.0  # an explicit number overrides the stored one
    bare = HeatmapWriter(str(tmp_path / "bare"), num_threads=0, checkpoint=str(_saved_model(tmp_path / "none", None)))
    bare.start()
    assert bare.cam_scale is None
    assert [t for _, t in bare._captions(engine, cam)][1].endswith(
        "scaled to this frame's own maximum (the model file stores no attention scale)"
    )


def test_best_model_stores_no_scale_when_the_gallery_did_not_render_the_round(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from medgain.handlers.best_checkpoint import BestModelSaver

    gallery = SimpleNamespace(display={"scale": 1.0, "how": "x", "epoch": 1})
    net = torch.nn.Linear(2, 2)
    saver = BestModelSaver(str(tmp_path / "late"), net, attention_gallery=gallery)  # type: ignore[arg-type]
    engine = Engine(lambda e, b: b)
    engine.state.epoch = 2
    engine.state.metrics = {"val_tpr_at_fpr_0.001": 0.5, "val_tpr_at_fpr_0.001_threshold": 0.0, "val_auc": 0.9}
    with caplog.at_level("WARNING"):
        saver(engine)  # the gallery's scale is from round 1 (attached after the saver, or nothing to show)
    assert "rendered nothing for validation round 2" in caplog.text
    assert "attention_display" not in torch.load(saver.checkpoint_path, weights_only=True)


def test_heatmap_panel_adds_a_colour_bar_and_caption() -> None:
    overlay = cam_overlay(torch.zeros(3, 16, 16), torch.ones(16, 16))
    panel = heatmap_panel(overlay, "4", "p 0.5 < 0.9 → healthy")
    assert panel.shape[0] >= 256 + 17 and panel.dtype == np.uint8
    bar = panel[:256, 256 + 6 : 256 + 20]  # jet from red (top) to dark blue (bottom)
    assert bar[0, 0, 0] > 100 and bar[0, 0, 2] < 50 and bar[-1, 0, 2] > 100 and bar[-1, 0, 0] < 50


def test_roc_legend_off_the_curve_markers_apart_and_no_operating_point_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medgain.handlers.roc_plot import ROCCurveSaver
    from medgain.metrics import roc_curve

    labels = np.array([0] * 50 + [1] * 10)
    scores = np.concatenate([np.linspace(-3, 1, 50), np.linspace(1.5, 4, 10)])  # separable: both budgets at FPR 0
    fpr, tpr, thresholds = roc_curve(scores, labels)
    monkeypatch.setattr("medgain.model_file.load_operating_point", lambda path: {"threshold": None})
    saver = ROCCurveSaver(str(tmp_path), split="test", per_round=False, checkpoint=str(tmp_path / "model.pt"))
    fig = saver._plot(fpr, tpr, thresholds, 1, 10, 50)
    linear, log = fig.axes
    assert log.get_legend() is None and linear.get_legend() is None and len(fig.legends) == 1  # under the plots
    budgets = [line for line in log.get_lines() if line.get_label().startswith("FPR <=")]
    assert [line.get_xdata()[0] for line in budgets] == [0.0, 0.0]  # the same point ...
    assert len({line.get_markersize() for line in budgets}) == 2 and not any(b.get_clip_on() for b in budgets)
    assert all(line.get_markerfacecolor() == "none" for line in budgets)  # ... drawn as nested hollow rings
    assert "no stored operating point: it takes no decisions" in fig._suptitle.get_text()


def test_loss_terms_switched_off_are_not_logged(tiny_net: Any) -> None:
    from conftest import blob_batch, run_gain_iteration

    from medgain.handlers.gain import GAINHandler, gain_loss_terms

    handler = GAINHandler("features.conv2", am_weight=0.0, ex_weight=1.0, area_weight=0.0)
    terms = gain_loss_terms(run_gain_iteration(tiny_net, blob_batch(8, seed=5), handler))
    assert set(terms) == {"loss", "loss_cl", "loss_ex"} and terms["loss_ex"] > 0


def test_slide_attention_is_stitched_without_tile_edge_stripes() -> None:
    from medgain.wsi.inference import _edge_taper

    n, step = 8, 4  # patches of 8 cells every 4 cells: each overlaps half of its neighbour
    taper = _edge_taper(n)
    assert taper.shape == (n, n) and taper.min() > 0 and taper[n // 2, n // 2] > 10 * taper[0, 0]
    stripe = np.full((n, n), 0.1)
    stripe[0] = 1.0  # Grad-CAM's padding artefact along each patch's top edge
    total, weight, plain, count = (np.zeros((n + 3 * step, n)) for _ in range(4))
    for i in range(4):
        total[i * step : i * step + n] += stripe * taper
        weight[i * step : i * step + n] += taper
        plain[i * step : i * step + n] += stripe
        count[i * step : i * step + n] += 1.0
    stitched = (total / weight)[step:-step].mean(1) - 0.1  # excess over the true 0.1, where patches overlap
    averaged = (plain / count)[step:-step].mean(1) - 0.1
    assert averaged.max() > 0.4 and stitched.max() < 0.1 * averaged.max()  # the stripes fade into the neighbours


def test_unveil_panel_says_why_it_stopped_in_words() -> None:
    from medgain.unveil.loop import UnveilResult
    from medgain.unveil.panel import PanelSample, stop_words, unveil_panel

    nothing = UnveilResult(target=1, initial_score=-1.0, stop_reason="initially_below")
    assert stop_words(nothing).startswith("nothing unveiled: the untouched image is already below")
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[2:5, 2:5] = mask[10:13, 9:12] = True  # one region in two separate blobs
    steps = UnveilResult(target=1, initial_score=3.0, masks=[mask], scores=[2.0], cumulative=mask, stop_reason="steps")
    assert stop_words(steps) == "stopped at the step limit (1 region hidden); p is still above the threshold"
    fig = unveil_panel([PanelSample(torch.rand(3, 16, 16), nothing, "f-1"), PanelSample(torch.rand(3, 16, 16), steps)])
    titles = [ax.get_title() for ax in fig.axes]
    assert not any("stop:" in t for t in titles) and "nothing unveiled" in titles[0]
    assert [t.get_text() for t in fig.axes[2].texts] == ["nothing unveiled\n(see above)"]  # not the image twice
    assert [t.get_text() for t in fig.axes[3].texts] == ["1", "1"]  # each blob carries its step number

"""Glimpse handlers: location statistics, the loss handler on a MONAI trainer, overlays."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.engines import SupervisedTrainer

from medgain.handlers import (
    GlimpseInferer,
    GlimpseLossHandler,
    GlimpseStatistic,
    draw_glimpses,
    glimpse_loss_terms,
    glimpse_records,
    glimpse_statistics,
)
from medgain.losses import GlimpseLoss
from medgain.networks import RecurrentGlimpseNetwork


def test_statistics_of_known_glimpses() -> None:
    centers = torch.tensor(
        [
            [[-1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]],  # steps of 1 and 1 image side
            [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],  # no movement
        ]
    )
    scales = torch.full((2, 3), 0.25)
    logits = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]])
    labels = torch.tensor([1, 0])
    mask = torch.zeros(2, 1, 11, 11)
    mask[0, 0, 10, 10] = 1.0  # the tumour under image 0's last glimpse only
    stats = glimpse_statistics(glimpse_records(centers, scales, logits, labels, mask))
    assert stats["step_distance"] == pytest.approx((1 + 1 + 0 + 0) / 4)
    assert stats["on_tumour"] == pytest.approx(0.5)  # glimpses 1 and 2 of the one tumour image
    assert stats["tumour_area"] == pytest.approx(1 / 121)
    assert stats["mean_scale"] == pytest.approx(0.25)
    # every coordinate differs by half the side between the two images: standard deviation 0.25
    assert stats["center_spread"] == pytest.approx(0.25)
    assert [stats[f"glimpse_{t}_accuracy"] for t in range(3)] == [0.5, 0.5, 1.0]
    no_mask = glimpse_statistics(glimpse_records(centers, scales, logits, labels))
    assert math.isnan(no_mask["on_tumour"]) and math.isnan(no_mask["tumour_area"])
    with pytest.raises(ValueError, match="unknown glimpse statistic"):
        GlimpseStatistic("glimpse_x_accuracy")


def test_loss_handler_trains_the_location_head_through_a_monai_trainer() -> None:
    torch.manual_seed(0)
    net = RecurrentGlimpseNetwork(glimpse_size=8, hidden_size=16, context_size=16, num_glimpses=3)
    mask = torch.zeros(4, 1, 32, 32)
    mask[:2, :, 4:12, 20:28] = 1.0
    batch = {"image": torch.rand(4, 3, 32, 32), "label": torch.tensor([1, 1, 0, 0]), "mask": mask,
             "has_mask": torch.ones(4, dtype=torch.bool)}
    inferer = GlimpseInferer()
    before = net.location_bias.detach().clone()
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, epoch_length=1, train_data_loader=[batch], network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=torch.nn.CrossEntropyLoss(),
        inferer=inferer, train_handlers=[inferer, GlimpseLossHandler(inferer, GlimpseLoss())], decollate=False,
    )
    trainer.run()
    terms = glimpse_loss_terms(trainer.state.output)
    assert terms["loss_location"] > 0 and terms["loss_per_glimpse"] > 0
    expected = terms["loss_classification"] + terms["loss_per_glimpse"] + terms["loss_location"]
    assert terms["loss"] == pytest.approx(expected, rel=1e-5)
    assert trainer.state.output["glimpse_centers"].shape == (4, 3, 2) and "mask" in trainer.state.output
    assert not torch.equal(before, net.location_bias.detach())


def test_draw_glimpses_marks_each_glimpse_in_order() -> None:
    image = torch.zeros(1, 40, 40)
    drawn = np.asarray(draw_glimpses(image, torch.tensor([[-0.5, -0.5], [0.5, 0.5]]), torch.tensor([0.25, 0.25])))
    assert drawn.shape == (40, 40, 3)
    first, last = drawn[5:15, 5:15].reshape(-1, 3), drawn[25:35, 25:35].reshape(-1, 3)
    assert (first == (255, 230, 0)).all(1).any()  # glimpse 0 in yellow
    assert (last == (255, 0, 0)).all(1).any()  # the last glimpse in red
    with pytest.raises(ValueError, match="image must be"):
        draw_glimpses(torch.zeros(2, 8, 8), torch.zeros(1, 2), torch.ones(1))


def test_prediction_writer_refuses_non_finite_scores_and_logs_pseudonyms(tmp_path, monkeypatch) -> None:
    from types import SimpleNamespace

    from medgain.handlers import glimpse_predictions
    from medgain.handlers.glimpse_predictions import GlimpsePredictionWriter

    logged: list[str] = []
    monkeypatch.setattr(glimpse_predictions, "log_artifact", lambda handler, path, folder: logged.append(path.read_text()))
    out = tmp_path / "out"
    writer = GlimpsePredictionWriter(str(out), threshold=0.0, coordinates="input", mlflow_handler=object())
    paths = [str(tmp_path / "DOE^JANE" / "good.png"), str(tmp_path / "DOE^JANE" / "nan.png")]
    batch = {"image_path": paths, "frame": torch.tensor([0, 0]), "label": torch.tensor([1, 0])}
    output = {
        "pred": torch.tensor([[0.0, 2.0], [float("nan"), 0.0]]),
        "image": torch.rand(2, 3, 8, 8),
        "glimpse_centers": torch.zeros(2, 2, 2),
        "glimpse_scales": torch.full((2, 2), 0.5),
    }
    engine = SimpleNamespace(state=SimpleNamespace(batch=batch, output=output))
    writer.start(engine)
    writer(engine)
    writer.write(engine)
    rows = (out / "predictions.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith(paths[0]) and ",1,1," in rows[1]  # decision 1, label 1
    errors = (out / "errors.csv").read_text()
    assert paths[1] in errors and "not finite" in errors and "good.png" not in errors
    assert sorted(p.name for p in (out / "glimpses").iterdir()) == ["good_f0.png", "nan_f0.png"]
    assert len(logged) == 1 and "DOE" not in logged[0] and "good" not in logged[0] and logged[0].startswith("ref,")

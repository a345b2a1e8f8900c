"""The dermoscopy shortcut study end to end: one method trained for an epoch on clean and on inked data (validation
and test clean through the data set's own fold table), and the ink-reliance probe on the inked twins of the test
images, checked against the evaluation's own scores and against a network that reads the ink."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import medgain.study.probe as probe_module
from medgain.cli import main
from medgain.model_file import load_model_spec
from medgain.study import RunKey, load_study
from medgain.study.probe import PROBE_FILE, run_twin_probe

STUDY_FILE = Path(__file__).parents[1] / "pipelines" / "study" / "dermoscopy_ink.yaml"


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = yaml.safe_load(STUDY_FILE.read_text())
    spec.update(
        bundle=str((STUDY_FILE.parent / spec["bundle"]).resolve()), output_dir="out", seeds=[0], data_seeds=[0],
        configs={"plain": spec["configs"]["plain"]},
    )
    spec["data"]["args"].update(n_images=48, images_per_patient=2, min_size=48, max_size=64, prevalence=0.3)
    spec["train"].update(image_size=32, max_epochs=1, patience=1)
    path = tmp_path_factory.mktemp("dermoscopy_study") / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["study", "run", str(path)]) == 0
    return path


def test_the_study_file_trains_every_method_on_clean_and_inked_data_validated_clean() -> None:
    spec = load_study(STUDY_FILE)
    assert list(spec.variants) == ["clean", "ink"] and spec.marker_probe
    args = spec.synth_args("plain@ink")
    assert args["shortcut_folds"] == [1, 2] and args["ink_probe"] and spec.train["fold"] == 0
    assert spec.train["folds_source"] == "$os.path.join(@dataset_dir, 'folds.csv')" and spec.train["tta_views"] == 1
    assert spec.checkpoint == "models/fold0/model.pt" and spec.reference == "plain"


def test_probe_scores_are_the_evaluations_and_the_report_shows_clean_validation(study: Path) -> None:
    assert main(["study", "report", str(study)]) == 0
    spec = load_study(study)
    for config in spec.configs:
        folder = spec.run_dir(RunKey(config, 0, 0))
        probe = json.loads((folder / PROBE_FILE).read_text())
        with open(folder / spec.evaluation_outputs / "predictions.csv", newline="") as f:
            rows = {Path(r["file"]).name: float(r["score"]) for r in csv.DictReader(f)}
        names = [i.split("/")[-1].split("#")[0] for i in probe["ids"]]
        assert sorted(names) == sorted(rows) and all(i.startswith("images/") for i in probe["ids"])
        assert np.allclose(probe["score_clean"], [rows[n] for n in names], atol=1e-4)  # one view, as evaluated
        assert 0 < probe["marker_area"] < 0.2
    report = (spec.output_dir / "report" / "study.md").read_text()
    inked = next(line for line in report.splitlines() if line.startswith("| `ink` | 0 |"))
    training, validation, test = (cell.strip() for cell in inked.split("|")[3:6])
    assert not training.startswith("0 /") and validation.startswith("0 /") and test.startswith("0 /")
    assert "The ink markings of the shortcut" in report and "| `plain` | `ink` |" in report


class _ReadsInk(nn.Module):
    """Scores the violet of the ink (blue above green), with the cam layer named as the shipped model's."""

    def __init__(self, layer: str) -> None:
        super().__init__()
        self.layer = layer
        parent: nn.Module = self
        *path, last = layer.split(".")
        for name in path:
            parent.add_module(name, nn.Module())
            parent = getattr(parent, name)
        conv = nn.Conv2d(3, 1, 1)
        with torch.no_grad():
            conv.weight.copy_(torch.tensor([0.0, -1.0, 1.0]).reshape(1, 3, 1, 1))
            conv.bias.zero_()
        parent.add_module(last, conv)

    def forward(self, image: torch.Tensor, *metadata: torch.Tensor) -> torch.Tensor:
        violet = torch.relu(self.get_submodule(self.layer)(image)).mean(dim=(1, 2, 3)) * 100
        return torch.stack([-violet, violet], dim=1)


def test_probe_measures_a_network_that_reads_the_ink(study: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_study(study)
    key = RunKey("plain@clean", 0, 0)
    folder = spec.run_dir(key)
    layer = load_model_spec(folder / spec.checkpoint).target_layer
    monkeypatch.setattr(probe_module, "load_model", lambda path: _ReadsInk(layer).eval())
    (folder / PROBE_FILE).unlink(missing_ok=True)
    probe = run_twin_probe(folder, spec.bundle, spec.evaluate_configs, spec.evaluation_overrides(key),
                           spec.dataset_dir(0, key.config), spec.checkpoint)
    delta = np.subtract(probe["score_marked"], probe["score_clean"])
    assert (delta > 0).all()  # the ink raises every image's score
    assert np.mean(probe["marker_attention"]) > 5 * probe["marker_area"]  # and the attention sits on it
    (folder / PROBE_FILE).unlink()

"""The study runner (`medgain study run|report`): two 1-epoch capsule runs side by side (a configuration each, one
on a data set of its own), skip on re-run, report figures equal to the runs' own, and the bootstrap CI against
hand computations."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from medgain.cli import main
from medgain.demo import CAPSULE_BUNDLE
from medgain.study import (
    MetricDef,
    RunData,
    RunKey,
    bootstrap_gap_closed,
    bootstrap_mean,
    bootstrap_paired_difference,
    load_study,
    metric_value,
    study_metrics,
)


def _study_file(folder: Path, **extra: object) -> Path:
    spec = {
        "name": "tiny",
        "bundle": str(CAPSULE_BUNDLE),
        "output_dir": "out",
        "data": {"synth": "capsule", "args": {"n_frames": 60, "size": 48, "prevalence": 0.3,
                                              "frames_per_study": 5}},
        "seeds": [0, 1],
        "train": {"network": "small_cnn", "image_size": 32, "batch_size": 8, "num_workers": 0, "max_epochs": 1},
        "evaluate": {"num_workers": 0},
        "configs": {"no_gain": {"am_weight": 0, "ex_weight": 0, "masks_fraction": 1.0},
                    # a data set of its own: the marker on its training positives, the same clean test split
                    "ex": {"am_weight": 0, "masks_fraction": 0.5,
                           "data": {"shortcut_rate": 1.0, "shortcut_splits": ["training", "validation"]}}},
        "reference": "no_gain",
        "x_axis": "masks_fraction",
        "workers": 2,
        **extra,
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = _study_file(tmp_path_factory.mktemp("study"), seeds=[0])  # 2 runs: a configuration each
    assert main(["study", "run", str(path)]) == 0
    return path


def test_runs_finish_in_parallel_and_are_children_of_the_study_run(study: Path) -> None:
    spec = load_study(study)
    results = {k: json.loads((spec.run_dir(k) / "result.json").read_text()) for k in spec.runs()}
    assert len(results) == 2
    client = mlflow.MlflowClient(spec.tracking_uri)
    parent = json.loads((spec.output_dir / "study.json").read_text())["parent_run_id"]
    assert client.get_run(parent).info.status == "FINISHED"
    assert client.get_run(parent).info.artifact_uri.startswith((spec.output_dir / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("tiny")
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_name for r in children) == sorted(
        k.run_name(stage) for k in spec.runs() for stage in ("train", "evaluate"))
    for key, result in results.items():
        run = client.get_run(result["evaluate_run_id"])
        assert run.data.tags["study.config"] == key.config and run.data.tags["study.seed"] == str(key.seed)
        assert run.data.metrics["test_auc"] == pytest.approx(result["metrics"]["test_auc"])
    # "ex" trained on a data set of its own, whose test split is byte for byte the reference's
    own, shared = spec.dataset_dir(0, "ex"), spec.dataset_dir(0, "no_gain")
    assert own != shared and json.loads((own / "dataset.json").read_text())["splits"]["training"]["shortcuts"] > 0
    test_files = [i["image"] for i in json.loads((shared / "datalist.json").read_text())["test"]]
    assert test_files and all((own / f).read_bytes() == (shared / f).read_bytes() for f in test_files)
    # two workers ran side by side: some run started before another had finished
    spans = sorted((r.info.start_time, r.info.end_time) for r in children if r.info.run_name.endswith(".train"))
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))


def test_rerun_skips_finished_runs_and_redoes_a_killed_one(study: Path, capsys: pytest.CaptureFixture) -> None:
    spec = load_study(study)
    killed = RunKey("ex", 0, 0)
    result = spec.run_dir(killed) / "result.json"
    before = {k: (spec.run_dir(k) / "result.json").stat().st_mtime_ns for k in spec.runs() if k != killed}
    result.unlink()  # as if killed before its evaluation finished
    client = mlflow.MlflowClient(spec.tracking_uri)
    experiment = client.get_experiment_by_name("tiny")
    stale = client.create_run(experiment.experiment_id, run_name=killed.run_name("train"))  # left RUNNING
    capsys.readouterr()
    assert main(["study", "run", str(study)]) == 0
    assert "1 run(s) done, 1 finished earlier (skipped), 0 failed" in capsys.readouterr().out
    assert result.is_file()
    assert {k: (spec.run_dir(k) / "result.json").stat().st_mtime_ns for k in before} == before
    assert client.get_run(stale.info.run_id).info.status == "KILLED"


def test_report_equals_the_runs_own_metrics(study: Path, tmp_path: Path) -> None:
    spec = load_study(study)
    assert main(["study", "report", str(study), "--out", str(tmp_path), "--n-bootstrap", "200"]) == 0
    with open(tmp_path / "runs.csv") as f:
        per_run = {(r["config"], int(r["seed"])): r for r in csv.DictReader(f)}
    with open(tmp_path / "summary.csv") as f:
        summary = {(r["config"], r["metric"]): r for r in csv.DictReader(f)}
    for key in spec.runs():
        metrics = json.loads((spec.run_dir(key) / "result.json").read_text())["metrics"]
        row = per_run[(key.config, key.seed)]
        assert float(row["auc"]) == pytest.approx(metrics["test_auc"], abs=1e-9)
        if metrics["test_sensitivity"] is None:  # no operating point after one epoch: no sensitivity either
            assert math.isnan(float(row["sensitivity"]))
        else:
            assert float(row["sensitivity"]) == pytest.approx(metrics["test_sensitivity"], abs=1e-9)
        assert float(row["iou"]) == pytest.approx(metrics["test_iou"], abs=1e-6)
    for config in spec.configs:
        aucs = [json.loads((spec.run_dir(k) / "result.json").read_text())["metrics"]["test_auc"]
                for k in spec.runs() if k.config == config]
        row = summary[(config, "auc")]
        assert float(row["mean"]) == pytest.approx(np.mean(aucs), abs=1e-9)
        assert float(row["ci_low"]) <= float(row["mean"]) <= float(row["ci_high"])
        # a 12-frame test split cannot measure 0.05 % false alarms: said, not reported
        assert summary[(config, "tpr_at_fpr_0.0005")]["mean"] == "nan"
        assert "negatives" in summary[(config, "tpr_at_fpr_0.0005")]["note"]
    markdown = (tmp_path / "study.md").read_text()
    assert "| `ex` | 1 |" in markdown and "Paired differences against `no_gain`" in markdown
    assert (tmp_path / "auc.png").is_file() and (tmp_path / "auc_vs_masks_fraction.png").is_file()
    parent = json.loads((spec.output_dir / "study.json").read_text())["parent_run_id"]
    logged = {a.path for a in mlflow.MlflowClient(spec.tracking_uri).list_artifacts(parent, "report")}
    assert "report/study.md" in logged and "report/summary.csv" in logged


def _run(values: list[float], labels: list[int], seed: int, metrics: dict[str, float] | None = None) -> RunData:
    n = len(values)
    return RunData(RunKey("c", 0, seed), [str(i) for i in range(n)], np.array(values, dtype=np.float64),
                   np.array(labels, dtype=np.float64), np.zeros(n), metrics or {})


def test_bootstrap_matches_hand_computations() -> None:
    iou = next(m for m in study_metrics() if m.name == "iou")
    # two runs with IoU a and b, resampled with replacement: means a, (a+b)/2, b with probabilities 1/4, 1/2, 1/4
    runs = [_run([0.0, 1.0], [0, 1], 0, {"test_iou": 0.2}), _run([0.0, 1.0], [0, 1], 1, {"test_iou": 0.6})]
    mean, low, high = bootstrap_mean(runs, iou, n_bootstrap=4000, seed=3)
    assert mean == pytest.approx(0.4) and low == pytest.approx(0.2) and high == pytest.approx(0.6)
    rng = np.random.default_rng(3)
    draws = [np.mean([[0.2, 0.6][i] for i in rng.integers(0, 2, 2)]) for _ in range(4000)]
    assert np.mean(np.isclose(draws, 0.4)) == pytest.approx(0.5, abs=0.03)
    # one run, AUC over samples: a perfectly separated run keeps AUC 1 in every resample holding both classes
    auc = next(m for m in study_metrics() if m.name == "auc")
    assert bootstrap_mean([_run([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], 0)], auc, n_bootstrap=300) == (1.0, 1.0, 1.0)
    # the weighted AUC equals the AUC of the expanded sample: weights (2, 1, 1, 1) = the first sample twice
    run = _run([0.3, 0.5, 0.4, 0.9], [1, 0, 0, 1], 0)
    expanded = _run([0.3, 0.3, 0.5, 0.4, 0.9], [1, 1, 0, 0, 1], 0)
    assert auc.value(run, np.array([2.0, 1, 1, 1])) == pytest.approx(metric_value(auc, expanded))
    assert metric_value(auc, expanded) == pytest.approx(2 / 6)  # pairs won: 0.9 beats both negatives, of 3 × 2
    # TPR at FPR on ties: a tie between the top negative and a positive is one threshold
    tpr = next(m for m in study_metrics() if m.name == "tpr_at_fpr_0.001")
    assert metric_value(tpr, _run([5.0, 5.0, 4.0, 1.0], [1, 0, 1, 0], 0)) == 0.0
    assert metric_value(tpr, _run([6.0, 5.0, 4.0, 1.0], [1, 0, 1, 0], 0)) == 0.5


def test_paired_difference_uses_the_same_samples() -> None:
    auc = next(m for m in study_metrics() if m.name == "auc")
    a = _run([0.1, 0.9, 0.2, 0.8], [0, 1, 0, 1], 0)
    # the reference holds the same samples in another order, with one pair swapped: AUC 0.75 vs 1.0
    b = RunData(RunKey("r", 0, 0), ["3", "2", "1", "0"], np.array([0.8, 0.85, 0.9, 0.1]),
                np.array([1.0, 0.0, 1.0, 0.0]), np.zeros(4), {})
    diff, low, high, pairs = bootstrap_paired_difference([a], [b], auc, n_bootstrap=500)
    assert pairs == 1 and diff == pytest.approx(0.25)
    assert 0.0 <= low <= diff <= high <= 1.0
    other = RunData(RunKey("r", 0, 0), ["9", "2", "1", "0"], b.scores, b.labels, b.decisions, {})
    with pytest.raises(ValueError, match="different samples"):
        bootstrap_paired_difference([a], [other], auc)
    assert isinstance(auc, MetricDef)


def test_gap_closed_against_a_hand_computation() -> None:
    iou = next(m for m in study_metrics() if m.name == "iou")
    plain = [_run([0.0, 1.0], [0, 1], s, {"test_iou": v}) for s, v in ((0, 0.1), (1, 0.3))]
    clean = [_run([0.0, 1.0], [0, 1], s, {"test_iou": v}) for s, v in ((0, 0.5), (1, 0.7))]
    gain = [_run([0.0, 1.0], [0, 1], s, {"test_iou": v}) for s, v in ((0, 0.2), (1, 0.6))]
    # means 0.2 (plain), 0.6 (clean), 0.4 (gain): half the gap closed; one-seed resamples give 1/4 and 3/4
    fraction, low, high, n = bootstrap_gap_closed(gain, plain, clean, iou, n_bootstrap=2000, seed=1)
    assert n == 2 and fraction == pytest.approx(0.5)
    assert low == pytest.approx(0.25) and high == pytest.approx(0.75)
    auc = next(m for m in study_metrics() if m.name == "auc")
    # per test sample: the same draw for all three runs; a run as good as "clean" closes the whole gap
    flipped = [_run([1.0, 0.0, 0.2, 0.9], [0, 1, 0, 1], 0)]
    perfect = [_run([0.0, 1.0, 0.2, 0.9], [0, 1, 0, 1], 0)]
    assert bootstrap_gap_closed(perfect, flipped, perfect, auc, n_bootstrap=200)[:3] == (1.0, 1.0, 1.0)


def test_bad_study_files_are_named(tmp_path: Path) -> None:
    bad = _study_file(tmp_path, configs={"x": {"seed": 3}})
    with pytest.raises(ValueError, match=r"study.yaml: configuration 'x' sets \['seed'\]"):
        load_study(bad)
    bad = _study_file(tmp_path, configs={"x": {"data": [1]}})
    with pytest.raises(ValueError, match="configuration 'x': 'data' must be a mapping"):
        load_study(bad)
    bad = _study_file(tmp_path, gap=["no_gain", "nope"])
    with pytest.raises(ValueError, match="'gap' must name two different configurations"):
        load_study(bad)
    bad = _study_file(tmp_path, reference="nope")
    with pytest.raises(ValueError, match="'reference' 'nope'"):
        load_study(bad)
    bad = _study_file(tmp_path, bundle=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a MONAI bundle"):
        load_study(bad)
    assert math.isnan(metric_value(study_metrics()[1], RunData(
        RunKey("c", 0, 0), ["a", "b"], np.array([0.0, 1.0]), np.array([0.0, 1.0]), np.array([math.nan] * 2), {})))


def test_study_file_refuses_repeated_keys_and_unknown_names(tmp_path: Path) -> None:
    path = _study_file(tmp_path)
    text = path.read_text()
    path.write_text(text + "seeds: [7]\n")  # a second 'seeds' replaced the first one silently
    with pytest.raises(ValueError, match=r"study.yaml: duplicate key 'seeds' at line \d+ \(first at line \d+\)"):
        load_study(path)
    bad = _study_file(tmp_path, data={"synth": "capsule", "arg": {"n_frames": 60}})
    with pytest.raises(ValueError, match=r"study.yaml: unknown fields \['arg'\] in 'data'"):
        load_study(bad)
    bad = _study_file(tmp_path, train={"max_epoch": 1})
    with pytest.raises(ValueError, match=r"study.yaml: 'train' sets \['max_epoch'\], which the bundle "
                                         r"capsule_endoscopy_gain does not define"):
        load_study(bad)
    bad = _study_file(tmp_path, configs={"x": {"am_wieght": 1}}, reference="x")
    with pytest.raises(ValueError, match=r"configuration 'x' sets \['am_wieght'\]"):
        load_study(bad)


def test_data_variants_cross_every_method_with_every_data_set(tmp_path: Path) -> None:
    path = _study_file(tmp_path, data_variants={"clean": {"shortcut_rate": 0.0}, "confounded": {"shortcut_rate": 0.8}},
                       gap=["no_gain@confounded", "no_gain@clean"], marker_probe=True)
    spec = load_study(path)
    # in the order of the file
    assert spec.methods == ["ex", "no_gain"] and list(spec.variants) == ["clean", "confounded"]
    assert list(spec.configs) == ["ex@clean", "ex@confounded", "no_gain@clean", "no_gain@confounded"]
    assert len(spec.runs()) == 8 and spec.marker_probe and spec.checkpoint == "models/model.pt"
    assert spec.split_config("ex@confounded") == ("ex", "confounded")
    assert spec.reference_of("ex@confounded") == "no_gain@confounded"
    assert spec.training_overrides(RunKey("ex@clean", 0, 1))["masks_fraction"] == 0.5
    # the variant's options on top of the study's, and a configuration's own data options on top of both
    assert spec.synth_args("no_gain@confounded")["shortcut_rate"] == 0.8
    assert spec.synth_args("ex@clean")["shortcut_rate"] == 1.0
    assert spec.synth_args("no_gain@clean")["shortcut_rate"] == 0.0
    # one data set per distinct set of options: the two methods share the clean and the confounded one
    sets = {spec.dataset_dir(0, c) for c in spec.configs}
    assert len(sets) == 3 and spec.dataset_dir(0, "no_gain@clean") != spec.dataset_dir(0, "no_gain@confounded")


@pytest.mark.parametrize(("extra", "message"), [
    ({"data_variants": {"clean": {}}}, "'data_variants' must map two or more variant names"),
    ({"data_variants": {"clean": {}, "bad name": {}}}, "data variant name 'bad name'"),
    ({"data_variants": {"clean": {}, "confounded": [1]}}, "data variant 'confounded' must be a mapping"),
    ({"data_variants": {"clean": {}, "confounded": {}}, "data": {"dataset_dir": "."}}, "'data_variants' needs"),
    ({"marker_probe": "yes"}, "'marker_probe' must be true or false"),
    ({"marker_probe": True, "data": {"synth": "wsi"}}, "'marker_probe' needs 'data: {synth: capsule}'"),
    ({"marker_probe": True, "data": {"synth": "dermoscopy"}}, "'marker_probe' on dermoscopy data needs 'ink_probe"),
    ({"checkpoint": "/abs/model.pt"}, "'checkpoint' must be a model file path relative"),
    ({"data_variants": {"clean": {}, "confounded": {}}, "gap": ["no_gain", "ex"]}, "'gap' must name two"),
])
def test_bad_variants_and_probe_options_are_named(tmp_path: Path, extra: dict, message: str) -> None:
    with pytest.raises(ValueError, match=r"study.yaml: " + message.replace("(", r"\(").replace("{", r"\{")):
        load_study(_study_file(tmp_path, **extra))


def test_the_shortcut_study_file_is_the_redone_design() -> None:
    spec = load_study(Path(__file__).parents[1] / "pipelines" / "study" / "capsule_shortcut.yaml")
    assert list(spec.variants) == ["clean", "confounded"] and spec.marker_probe
    assert len(spec.seeds) >= 3 and len(spec.data_seeds) >= 3
    for config in spec.configs:  # validation and test are clean in both variants
        assert spec.synth_args(config)["shortcut_splits"] == ["training"]
    settings = {m: spec.configs[f"{m}@clean"] for m in spec.methods}
    ex_only = [s for s in settings.values() if s["ex_weight"] and not s["am_weight"]]
    assert {s["masks_fraction"] for s in ex_only} == {0.1, 0.3, 1.0}
    am_only = [s for s in settings.values() if s["am_weight"] and not s["ex_weight"]]
    assert {(s["grad_magnitude"], "area_bounds" in s) for s in am_only} == {
        (1.0, False), (math.inf, False), (1.0, True), (math.inf, True)}


def test_a_seed_subset_runs_part_of_the_grid_and_refuses_unknown_seeds(tmp_path: Path) -> None:
    spec = load_study(_study_file(tmp_path, seeds=[0, 1, 2], data_seeds=[0, 1]))
    part = spec.subset(seeds=[1], data_seeds=[0])
    assert part.runs() == [RunKey("ex", 0, 1), RunKey("no_gain", 0, 1)]
    assert set(part.runs()) < set(spec.runs()) and part.output_dir == spec.output_dir
    assert spec.subset().runs() == spec.runs()
    with pytest.raises(ValueError, match=r"study.yaml: seeds \[3\] must be some of the study's \[0, 1, 2\]"):
        spec.subset(seeds=[3])
    with pytest.raises(ValueError, match=r"data_seeds \[\] must be some"):
        spec.subset(data_seeds=[])
    assert spec.subset(seeds=[0], data_seeds=[0], methods=["ex"]).runs() == [RunKey("ex", 0, 0)]
    with pytest.raises(ValueError, match=r"methods \['am'\] must be some of the study's \['ex', 'no_gain'\]"):
        spec.subset(methods=["am"])
    crossed = load_study(_study_file(tmp_path, data_variants={"clean": {}, "confounded": {"shortcut_rate": 0.8}}))
    assert [k.config for k in crossed.subset(seeds=[0], methods=["ex"]).runs()] == ["ex@clean", "ex@confounded"]

"""Small things a newcomer trips on (issue 23 §3): absolute one-process `mlflow ui` commands from every demo,
registration log and docs that agree, the real reason a model has no operating point, and nothing written into
the checkout (no ``build/``, no ``./mlruns`` artifact location)."""

from __future__ import annotations

import logging
import re
import subprocess
from pathlib import Path
from typing import Any

import mlflow
import pytest

from medgain.model_file import decision_threshold
from medgain.registry import package
from medgain.tracking import delivery, prepare_store, register_model_version

ROOT = Path(__file__).resolve().parents[1]
DEMOS = ("demo-glimpse", "demo-wsi", "demo-dermoscopy")


@pytest.mark.parametrize("target", DEMOS)
def test_every_make_demo_prints_an_absolute_one_process_ui_command(target: str, tmp_path: Path) -> None:
    # run from another folder: the printed command must not depend on where make was started
    out = subprocess.run(["make", "-s", "-n", "-C", str(ROOT), target], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout
    echoed = re.search(r'echo "  (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \S+ ui [^"]+)"', out)
    assert echoed, out[-2000:]
    command = echoed.group(1).split()
    assert Path(command[1]).is_absolute() and command[1].endswith(".venv/bin/mlflow")
    uri = command[command.index("--backend-store-uri") + 1]
    assert uri.startswith("sqlite:////") and uri.endswith("/mlflow.db")
    assert command[-2:] == ["--workers", "1"]


def test_registration_log_says_what_the_bundle_docs_say(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    prepare_store(uri)
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x", (tmp_path / "mlruns").as_uri())).info.run_id
    with caplog.at_level(logging.INFO, logger=delivery.logger.name):
        version = register_model_version(client, run_id, "capsule_endoscopy_gain", "candidate", {"epoch": "3"}, "d")
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("registered ")]
    assert logged == [f"registered capsule_endoscopy_gain version {version} (alias 'candidate') from epoch 3 "
                      f"of run {run_id}"]
    documented = (ROOT / "bundles" / "capsule_endoscopy_gain" / "docs" / "README.md").read_text()
    pattern = re.escape("registered capsule_endoscopy_gain version V (alias 'candidate') from epoch N of run RUN_ID")
    assert re.search(pattern, documented)


def test_no_operating_point_says_the_real_reason() -> None:
    both = {"threshold": None, "max_fpr": 0.001, "negatives": 60, "positives": 15,
            "reason": "no finite threshold reaches TPR > 0 at FPR <= 0.001 on validation (TPR 0)"}
    with pytest.raises(ValueError) as raised:
        decision_threshold(both, "fold1/model.pt")
    message = str(raised.value)
    assert "both classes" not in message  # the split held both: that was not the problem
    assert "No threshold reaches FPR <= 0.001 with TPR > 0 on 60 validation negatives" in message
    single = {"threshold": None, "reason": "the validation round had a single class"}
    with pytest.raises(ValueError, match="validation split holding both classes"):
        decision_threshold(single, "fold2/model.pt")


def test_new_store_keeps_default_artifacts_beside_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # MLflow's default: ./mlruns of the working folder
    uri = f"sqlite:///{tmp_path / 'run' / 'outputs' / 'mlflow.db'}"

    class Journal:  # what delivery reads of a run journal
        meta: dict[str, Any] = {"tracking_uri": uri}

    client = delivery._client(Journal())  # the store is created where the bundles' runs are delivered
    default = client.get_experiment("0")
    assert default.name == "Default"
    assert default.artifact_location == (tmp_path / "run" / "outputs" / "mlruns").resolve().as_uri() + "/0"
    assert not (tmp_path / "elsewhere" / "mlruns").exists()


def test_wheel_is_built_outside_the_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built_from = []

    def fake_run(cmd: list[str], **_: Any) -> subprocess.CompletedProcess:
        source = Path(cmd[-1])
        built_from.append(source)
        assert (source / "pyproject.toml").is_file() and (source / "medgain" / "errors.py").is_file()
        (Path(cmd[cmd.index("-w") + 1]) / "medgain-0.1.0-py3-none-any.whl").write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(package.subprocess, "run", fake_run)
    wheel = package._build_wheel(tmp_path)
    assert wheel == tmp_path / "medgain-0.1.0-py3-none-any.whl"
    assert not built_from[0].is_relative_to(ROOT)  # setuptools writes build/ into the folder it builds


def test_mlruns_is_ignored() -> None:
    assert "mlruns/" in (ROOT / ".gitignore").read_text().splitlines()


@pytest.mark.parametrize(
    ("argv", "label", "total"),
    [
        (["capsule", "--n-frames", "20", "--size", "32"], "synthetic capsule frames", 20),
        (["patterns", "--kind", "pattern2", "--rgb", "--size", "32", "--n-images", "20"],
         "synthetic pattern2 images", 20),
        (["dermoscopy", "--n-images", "10", "--min-size", "32", "--max-size", "40"], "synthetic dermoscopy images", 10),
    ],
)
def test_data_generation_shows_progress(
    argv: list[str], label: str, total: int, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # issue 23 §1: `make demo` sat silent while it generated its data; every generator the demos call reports
    # each tenth of the work on stderr, and its standard output stays as it was
    from medgain.cli import main

    assert main(["synth", *argv, "--seed", "0", "--out", str(tmp_path / "data")]) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith(f"{label}: ")]
    done = [int(re.match(rf"{label}: (\d+) / {total} \((\d+) %\), \d+ s$", line).group(1)) for line in lines]
    assert done == [total * k // 10 for k in range(1, 11)]
    assert label not in captured.out


def test_print_progress_prints_each_step_once() -> None:
    import io

    from medgain.synth.progress import print_progress

    stream = io.StringIO()
    progress = print_progress("frames", steps=4, stream=stream)
    for done in range(1, 8):
        progress(done, 7)
    assert [line.split(" (")[0] for line in stream.getvalue().splitlines()] == [
        "frames: 2 / 7", "frames: 4 / 7", "frames: 6 / 7", "frames: 7 / 7"
    ]
    with pytest.raises(ValueError, match="steps must be >= 1"):
        print_progress("frames", steps=0)


def test_demo_settings_are_the_documented_ones() -> None:
    # issue 23 §1: the README quotes what `make demo` runs and how long it takes; the CLI, the library and the
    # docs must not drift apart when the settings are tuned
    import inspect

    from medgain.cli import build_parser
    from medgain.demo import run_capsule_demo

    cli = vars(build_parser().parse_args(["demo"]))
    library = {k: p.default for k, p in inspect.signature(run_capsule_demo).parameters.items() if k != "out"}
    assert {k: cli[k] for k in library} == library
    readme = (ROOT / "README.md").read_text()
    quoted = (f"{library['n_frames']} synthetic frames of {library['frame_size']}²",
              f"`{library['network']}` at {library['image_size']}², {library['max_epochs']} epochs")
    for text in quoted:
        assert text in readme, text
    makefile = (ROOT / "Makefile").read_text()
    glimpse_doc = (ROOT / "bundles" / "glimpse_attention" / "docs" / "README.md").read_text()
    size = re.search(r"synth patterns .*--size (\d+) --n-images (\d+)", makefile)
    epochs = re.search(r"\$\(GLIMPSE_RUN\) --run_id training .*--max_epochs (\d+)", makefile)
    assert f"pattern2, {size.group(1)}², 3-channel, {size.group(2)} images" in glimpse_doc
    assert f"{epochs.group(1)} epochs of training" in glimpse_doc


def test_glimpse_training_batches_are_plain_tensors(tmp_path: Path) -> None:
    # issue 23 §1: MONAI's random flips made MetaTensors, whose bookkeeping cost about a quarter of a training step
    # and, on every small op of the recurrent glimpse model, a third more; no process-wide switch either
    import monai
    import torch
    from monai.bundle import ConfigParser
    from monai.data import MetaTensor

    from medgain.synth.patterns import make_pattern_dataset

    make_pattern_dataset(tmp_path / "data", "pattern2", 3, seed=0, size=32, rgb=True)
    configs = ROOT / "bundles" / "glimpse_attention" / "configs"
    parser = ConfigParser()
    parser.read_config(str(configs / "train.yaml"))
    parser.read_meta(str(configs / "metadata.json"))
    parser.update({"bundle_root": str(tmp_path / "run"), "dataset_dir": str(tmp_path / "data"), "image_size": 32})
    dataset = parser.get_parsed_content("train#dataset")
    for i in range(len(dataset)):
        item = dataset[i]
        for key in ("image", "mask"):
            assert isinstance(item[key], torch.Tensor) and not isinstance(item[key], MetaTensor), key
    assert monai.data.get_track_meta()  # the caller's setting is untouched

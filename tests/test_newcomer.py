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

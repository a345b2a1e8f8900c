"""medgain's own input errors end in a short report whose last line names the file or value and what is wrong
(issue 23 §2); bugs keep their traceback; ``MEDGAIN_TRACEBACK=1`` shows the full traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import medgain
from medgain.cli import main
from medgain.errors import TRACEBACK_ENV, MedgainError, own_error, short_report
from medgain.model_file import ModelSpec, build_network, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CAPSULE = ROOT / "bundles" / "capsule_endoscopy_gain"
MAX_LINES = 15  # the bound on the output from the error onwards


def _raise_in_medgain(path: Path) -> None:
    from medgain.data.datalist import load_datalist

    load_datalist(path, "training")


def _wrapped(inner: BaseException) -> RuntimeError:
    """``inner`` wrapped the way MONAI's ConfigExpression wraps it."""
    try:
        try:
            raise inner
        except BaseException as err:
            raise RuntimeError("Failed to evaluate ConfigExpression: $medgain.data.prepare_items(...)") from err
    except RuntimeError as outer:
        return outer


def _caught(fn) -> BaseException:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the test inspects whatever was raised
        return err
    raise AssertionError("no exception raised")


def test_own_error_is_found_behind_the_config_wrapper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    missing = tmp_path / "nowhere" / "datalist.json"
    inner = _caught(lambda: _raise_in_medgain(missing))
    outer = _wrapped(inner)
    assert own_error(outer) is inner
    report = short_report(outer)
    assert report is not None
    lines = report.splitlines()
    assert lines[-1] == f"FileNotFoundError: {missing}: datalist file not found"
    assert "ConfigExpression" in lines[0] and TRACEBACK_ENV in report and len(lines) <= 3


def test_bugs_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    type_error = _caught(lambda: torch.zeros(2) + "x")
    assert own_error(_wrapped(type_error)) is None and short_report(type_error) is None
    third_party_value_error = _caught(lambda: torch.zeros(2).view(3))  # raised inside torch, not medgain
    assert short_report(_wrapped(third_party_value_error)) is None
    # a medgain error raised while a bug was being handled is not shortened either: the bug must be seen
    def convert() -> None:
        try:
            {}["missing"]
        except KeyError as err:
            raise MedgainError("bad value") from err

    assert short_report(_caught(convert)) is None


def test_full_traceback_switch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    inner = _caught(lambda: _raise_in_medgain(tmp_path / "datalist.json"))
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    assert short_report(inner) is None
    monkeypatch.setenv(TRACEBACK_ENV, "0")
    assert short_report(inner) is not None


def test_import_installs_the_hook_once() -> None:
    assert getattr(sys.excepthook, "__medgain__", False)
    hook = sys.excepthook
    medgain.errors.install_excepthook()
    assert sys.excepthook is hook


def test_cli_error_is_one_actionable_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    labels = tmp_path / "labels.csv"
    assert main(["wsi", "patches", "--labels", str(labels), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("medgain: error: ") and str(labels) in err[-1] and "No such file" in err[-1]
    assert len(err) <= 2 and "Traceback" not in "\n".join(err)
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    assert main(["wsi", "patches", "--labels", str(labels), "--out", str(tmp_path / "out")]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_cli_bug_shows_its_traceback(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                     tmp_path: Path) -> None:
    from medgain.cli import wsi

    def broken(args) -> int:
        return int(torch.zeros(2).view(3).sum())  # a ValueError raised inside torch: a bug, not bad input

    monkeypatch.setattr(wsi, "_run_wsi_patches", broken)
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    assert main(["wsi", "patches", "--labels", str(tmp_path / "l.csv"), "--out", str(tmp_path / "o")]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def _bundle_run(workflow: str, configs: list[str], *args: str, cwd: Path) -> list[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop(TRACEBACK_ENV, None)
    config = configs[0] if len(configs) == 1 else str(configs)
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", workflow, "--bundle_root", str(cwd / "root"),
         "--meta_file", str(CAPSULE / "configs" / "metadata.json"), "--config_file", config,
         "--logging_file", str(CAPSULE / "configs" / "logging.conf"), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.rstrip().splitlines()
    tail = lines[next(i for i, line in enumerate(lines) if line.startswith(("while:", "error raised at"))):]
    assert len(tail) <= MAX_LINES and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert TRACEBACK_ENV in "\n".join(tail)
    return lines


def test_bundle_training_with_a_mistyped_dataset_dir(tmp_path: Path) -> None:
    lines = _bundle_run("training", [str(CAPSULE / "configs" / "train.yaml")], "--dataset_dir", "data/capsul",
                        cwd=tmp_path)
    assert lines[-1] == "FileNotFoundError: data/capsul/datalist.json: datalist file not found"


def test_bundle_inference_without_input_dir(tmp_path: Path) -> None:
    spec = ModelSpec("small_cnn", 2, (32, 32), bundle="capsule_endoscopy_gain", class_names=["normal", "lesion"])
    (tmp_path / "root" / "models").mkdir(parents=True)
    save_checkpoint(tmp_path / "root" / "models" / "model.pt",
                    {"model": build_network(spec).state_dict(), "model_spec": spec.as_dict()})
    lines = _bundle_run("inference", [str(CAPSULE / "configs" / "inference.yaml")], cwd=tmp_path)
    assert lines[-1] == f"NotADirectoryError: {tmp_path / 'root' / 'input'}: input folder not found"


@pytest.mark.parametrize("bundle", ["capsule_endoscopy_gain", "dermoscopy_gain", "glimpse_attention",
                                    "wsi_patch_gain"])
def test_every_bundle_reports_a_mistyped_dataset_dir_in_one_line(bundle: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from monai.bundle import run

    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    configs = ROOT / "bundles" / bundle / "configs"
    missing = tmp_path / "data" / "capsul"
    with pytest.raises(Exception) as raised:
        run("training", bundle_root=str(tmp_path / "root"), meta_file=str(configs / "metadata.json"),
            config_file=str(configs / "train.yaml"), logging_file=str(configs / "logging.conf"),
            dataset_dir=str(missing), num_workers=0)
    report = short_report(raised.value)
    assert report is not None, raised.value
    lines = report.splitlines()
    assert len(lines) <= MAX_LINES and str(missing) in lines[-1] and "not found" in lines[-1], report


WORKER_SCRIPT = """
import sys
import numpy as np
from monai.data import DataLoader, Dataset
from PIL import Image
from tqdm import tqdm
import medgain
from medgain.transforms import LoadFramed

folder = sys.argv[1]
rng = np.random.default_rng(0)
for name in ("a.png", "b.png", "c.png"):
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(f"{folder}/{name}")
data = open(f"{folder}/c.png", "rb").read()
open(f"{folder}/c.png", "wb").write(data[: data.index(b"IDAT") + 30])  # header reads, pixels do not
items = [{"image": f"{folder}/{name}"} for name in ("a.png", "b.png", "c.png", "a.png")]
bar = tqdm(total=len(items))  # still open when the error comes, as ignite's ProgressBar leaves it
for batch in DataLoader(Dataset(items, LoadFramed()), batch_size=1, num_workers=2):
    bar.update()
"""


def _worker_error(tmp_path: Path, transform) -> BaseException:
    """What a DataLoader with two workers raises in the main process when ``transform`` fails on an item."""
    from monai.data import DataLoader, Dataset

    items = [{"image": str(tmp_path / name)} for name in ("a.png", "b.png", "c.png")]
    return _caught(lambda: [b for b in DataLoader(Dataset(items, transform), batch_size=1, num_workers=2)])


def _corrupt_png(path: Path) -> Path:
    from PIL import Image

    Image.fromarray(torch.randint(0, 255, (40, 40, 3), dtype=torch.uint8).numpy()).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"IDAT") + 30])
    return path


def test_error_raised_in_a_dataloader_worker_ends_in_one_line(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from monai.transforms import Compose

    from medgain.transforms import LoadFramed

    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    for name in ("a.png", "b.png", "c.png"):
        _corrupt_png(tmp_path / name)
    raised = _worker_error(tmp_path, Compose([LoadFramed()]))
    assert "in DataLoader worker process" in str(raised)  # torch's re-raise, the whole worker traceback inside
    for error in (raised, _wrapped(raised)):
        report = short_report(error)
        assert report is not None, error
        lines = report.splitlines()
        assert lines[-1] == f"ValueError: {tmp_path / 'a.png'}: cannot decode image (image file is truncated)"
        assert "medgain/transforms/io.py" in report and "in DataLoader worker process" in report
        assert len(lines) <= MAX_LINES and "Traceback" not in report
    rebuilt = own_error(raised)
    assert type(rebuilt) is ValueError and str(rebuilt) == lines[-1].removeprefix("ValueError: ")
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    assert short_report(raised) is None


def test_bug_raised_in_a_dataloader_worker_keeps_its_traceback(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)

    def broken(item: dict) -> dict:
        return {"image": torch.zeros(2).view(3)}  # a ValueError raised inside torch: a bug, not bad input

    assert short_report(_worker_error(tmp_path, broken)) is None


def test_worker_error_reaches_the_excepthook_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(TRACEBACK_ENV, None)
    proc = subprocess.run([sys.executable, "-c", WORKER_SCRIPT, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=120)
    lines = proc.stderr.rstrip().splitlines()
    assert proc.returncode == 1 and len(lines) <= MAX_LINES and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1] == f"ValueError: {tmp_path / 'c.png'}: cannot decode image (image file is truncated)"
    env[TRACEBACK_ENV] = "1"
    full = subprocess.run([sys.executable, "-c", WORKER_SCRIPT, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert "Caught RuntimeError in DataLoader worker process" in full.stderr

"""Fault suite: tracking server outages, kill -9 and resume, bad checkpoints, a full disk, NaN losses, a failing
rank. Tiny: a 6-batch task of 12x12 images (tests/reliability_child.py), real processes where a fault needs one."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.utils import CommonKeys

from medgain.cli import main as medgain_main
from medgain.handlers import (
    BufferedMLFlowHandler,
    NonFiniteLossError,
    NonFiniteLossHandler,
    ResumeFromCheckpoint,
    TrainingCheckpointSaver,
    TrainingFailureHandler,
)
from medgain.model_file import load_training_checkpoint
from medgain.tracking import RunJournal, buffered, find_journals

sys.path.insert(0, str(Path(__file__).parent))
from reliability_child import batches, network, train  # noqa: E402

CHILD = Path(__file__).parent / "reliability_child.py"
SERVE = """
import os, sys
root = sys.argv[2]
os.environ.update({"_MLFLOW_SERVER_FILE_STORE": f"sqlite:///{root}/mlflow.db",
                   "_MLFLOW_SERVER_REGISTRY_STORE": f"sqlite:///{root}/mlflow.db",
                   "_MLFLOW_SERVER_SERVE_ARTIFACTS": "true", "_MLFLOW_SERVER_ARTIFACT_ROOT": "mlflow-artifacts:/",
                   "_MLFLOW_SERVER_ARTIFACT_DESTINATION": f"{root}/artifacts"})
from werkzeug.serving import make_server
from mlflow.server import app
make_server("127.0.0.1", int(sys.argv[1]), app, threaded=True).serve_forever()
"""
EPOCHS, ITERS = 6, 6


class Server:
    """MLflow's tracking server app on 127.0.0.1 in its own process: killed with SIGKILL, restarted on its port."""

    def __init__(self, root: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.root = root
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVE, str(self.port), str(self.root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def wait(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"the MLflow server on {self.uri} did not start in {timeout} s")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("mlflow_server"))
    server.start()
    server.wait()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.kill()


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite tracking store for the tests that need no server (each uses its own experiment)."""
    return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'mlflow.db'}"


def _trainer(ckpt: Path, uri: str, offline_timeout: float, hooks: dict[int, Callable[[], None]] | None = None,
             sleep: float = 0.04, before_close: Callable[[SupervisedTrainer], None] | None = None,
             ) -> tuple[SupervisedTrainer, BufferedMLFlowHandler, dict[str, float]]:
    """The child's training in this process, with ``hooks[epoch]`` run after that epoch and ``before_close`` at
    completion before the run closes; times in the dict."""
    net = network()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=EPOCHS, train_data_loader=batches(ITERS),
                                network=net, optimizer=optimizer, loss_function=torch.nn.CrossEntropyLoss(),
                                decollate=False)
    tracking = BufferedMLFlowHandler(
        buffer_dir=ckpt / "tracking", tracking_uri=uri, experiment_name="outage", run_name="outage",
        output_transform=lambda out: out[CommonKeys.LOSS].item(), close_on_complete=True,
        offline_timeout=offline_timeout,
    )
    TrainingFailureHandler(tracking, ckpt, {"model": net, "optimizer": optimizer, "tracking": tracking}).attach(trainer)
    if before_close is not None:
        trainer.add_event_handler(Events.COMPLETED, before_close)
    tracking.attach(trainer)
    times: dict[str, float] = {}
    trainer.add_event_handler(Events.STARTED, lambda e: times.setdefault("start", time.monotonic()))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: time.sleep(sleep))

    def after_epoch(engine: SupervisedTrainer) -> None:
        figure = ckpt / f"figure_{engine.state.epoch}.txt"
        figure.write_text(f"epoch {engine.state.epoch}")
        tracking.client.log_artifact(tracking.cur_run.info.run_id, str(figure), "figures")
        times["trained"] = time.monotonic() - times["start"]
        (hooks or {}).get(engine.state.epoch, lambda: None)()

    trainer.add_event_handler(Events.EPOCH_COMPLETED, after_epoch)
    return trainer, tracking, times


def _server_run(uri: str, experiment: str = "outage") -> tuple[mlflow.MlflowClient, mlflow.entities.Run]:
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, run


def _assert_complete_once(client: mlflow.MlflowClient, run: mlflow.entities.Run, epochs: int = EPOCHS) -> None:
    steps = list(range(1, epochs * ITERS + 1))
    for key in ("Loss", "lr_group_0"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == steps, key
    assert run.data.params == {"max_epochs": str(epochs), "epoch_length": str(ITERS)}
    figures = sorted(a.path for a in client.list_artifacts(run.info.run_id, "figures"))
    assert figures == [f"figures/figure_{e}.txt" for e in range(1, epochs + 1)]


def test_tracking_server_killed_mid_run_and_restarted(server: Server, tmp_path: Path) -> None:
    """Undisturbed run, then a run whose server is SIGKILLed after epoch 2 and restarted after epoch 4."""
    reference, _, undisturbed = _trainer(tmp_path / "undisturbed", server.uri, 10.0)
    reference.run()
    trainer, tracking, disturbed = _trainer(
        tmp_path / "disturbed", server.uri, 120.0, {2: server.kill, 4: server.start}
    )
    trainer.run()  # close() waits (up to offline_timeout) until the restarted server has everything
    assert disturbed["trained"] < undisturbed["trained"] + 3.0, (disturbed, undisturbed)
    client = mlflow.MlflowClient(server.uri)
    runs = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        _assert_complete_once(client, run)
    (journal,) = find_journals(tmp_path / "disturbed")
    assert RunJournal(journal).pending() == []


def test_server_down_for_the_whole_run_then_sync(server: Server, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    server.kill()
    tracking: BufferedMLFlowHandler | None = None

    def register(engine: SupervisedTrainer) -> None:  # as ModelRegistration does, before the run closes
        model = tmp_path / "model"
        model.mkdir()
        (model / "MLmodel").write_text("flavors: {}\n")
        run_id = tracking.cur_run.info.run_id
        tracking.client.log_artifacts(run_id, str(model), "model")
        tracking.client.register_model(run_id, "outage_model", "candidate", {"epoch": "6"}, "tiny", None)

    trainer, tracking, times = _trainer(tmp_path / "ckpt", server.uri, 0.5, before_close=register)
    started = time.monotonic()
    trainer.run()
    assert time.monotonic() - started < times["trained"] + 5.0  # the close gave up after offline_timeout
    (journal,) = find_journals(tmp_path / "ckpt")
    assert len(RunJournal(journal).pending()) > EPOCHS
    server.start()
    server.wait()
    assert medgain_main(["sync", str(tmp_path / "ckpt")]) == 0
    assert "delivered" in capsys.readouterr().out
    assert medgain_main(["sync", str(tmp_path / "ckpt" / "tracking")]) == 0  # again: nothing is sent twice
    client = mlflow.MlflowClient(server.uri)
    runs = client.search_runs([client.get_experiment_by_name("outage").experiment_id],
                              f"tags.`medgain.journal` = '{journal.name}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    _assert_complete_once(client, runs[0])
    (version,) = client.search_model_versions("name='outage_model'")
    assert version.run_id == runs[0].info.run_id and version.source.endswith("/model")
    assert client.get_registered_model("outage_model").aliases == {"candidate": version.version}


def _child(tmp: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(CHILD), "--ckpt", str(tmp / "ckpt"), "--uri", f"sqlite:///{tmp / 'mlflow.db'}",
         "--out", str(tmp / "final.pt"), "--resume", "auto", "--epochs", "4", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _wait_for(process: subprocess.Popen, line: str) -> None:
    for out in process.stdout:
        if out.strip() == line:
            return
    raise AssertionError(f"the child ended before printing {line!r}: {process.stderr.read()[-3000:]}")


def test_kill_9_mid_epoch_and_mid_save_then_resume_auto(tmp_path: Path) -> None:
    """Killed at a random point of epoch 2, then killed halfway through writing epoch 3's checkpoint, then resumed:
    the final model equals an uninterrupted run's, and MLflow holds one run with every step once."""
    train(["--ckpt", str(tmp_path / "ref"), "--uri", f"sqlite:///{tmp_path / 'ref.db'}", "--epochs", "4",
           "--out", str(tmp_path / "reference.pt")])
    first = _child(tmp_path, "--sleep", "0.05")
    _wait_for(first, "EPOCH 1")
    time.sleep(random.Random().uniform(0.0, 0.3))  # 6 iterations of >= 0.05 s: somewhere in epoch 2
    first.kill()
    first.communicate()
    second = _child(tmp_path, "--slow-save", "3")
    _wait_for(second, "SAVING")
    second.kill()
    second.communicate()
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert any(n.startswith(".checkpoint_epoch=3.pt") for n in names)  # the half-written file, never picked
    assert "checkpoint_epoch=2.pt" in names and "checkpoint_epoch=3.pt" not in names
    third = _child(tmp_path)
    out, err = third.communicate(timeout=300)
    assert third.returncode == 0, err[-3000:]
    assert out.split().count("EPOCH") == 2  # epochs 3 and 4 only: resumed from epoch 2's checkpoint
    final, reference = torch.load(tmp_path / "final.pt"), torch.load(tmp_path / "reference.pt")
    assert all(torch.equal(final[k], reference[k]) for k in reference)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("reliability").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "Loss")] == list(range(1, 25))
    checkpoint = load_training_checkpoint(tmp_path / "ckpt" / "checkpoint_last.pt", ["model", "trainer"])
    assert checkpoint["tracking"]["run_id"] == run.info.run_id


def _dead_run(ckpt: Path, uri: str) -> None:
    """A run whose process "died" after logging one metric: delivered, lock freed, never closed."""
    trainer, tracking, _ = _trainer(ckpt, uri, 5.0, sleep=0.0)
    trainer.state.max_epochs = 1
    tracking.start(trainer)
    tracking.client.log_metric(tracking.cur_run.info.run_id, "loss", 1.0, step=1)
    tracking.client.run.sender.finish(5.0)
    tracking.client.run.journal.release()
    buffered._ACTIVE.pop(tracking.client.run.buffer_dir)  # what this process knew of it dies with it


def test_killed_run_is_marked_killed_by_doctor_or_the_next_start(tmp_path: Path, sqlite_uri: str) -> None:
    client = mlflow.MlflowClient(sqlite_uri)
    _dead_run(tmp_path / "a", sqlite_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
    assert run.info.status == "RUNNING"
    assert medgain_main(["runs", "doctor", str(tmp_path / "a")]) == 0
    run = client.get_run(run.info.run_id)
    assert run.info.status == "KILLED" and "killed" in run.data.tags["end_reason"]
    _dead_run(tmp_path / "b", sqlite_uri)  # never resumed: the next training in the same folder retires it
    trainer, tracking, _ = _trainer(tmp_path / "b", sqlite_uri, 5.0, sleep=0.0)
    trainer.state.max_epochs = 1
    tracking.start(trainer)
    tracking.close()
    runs = client.search_runs([client.get_experiment_by_name("outage").experiment_id], order_by=["start_time ASC"])
    assert [r.info.status for r in runs] == ["KILLED", "KILLED", "FINISHED"]


def _saver_setup(ckpt: Path) -> tuple[SupervisedTrainer, dict[str, object]]:
    net = network()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=2, train_data_loader=batches(2),
                                network=net, optimizer=optimizer, loss_function=torch.nn.CrossEntropyLoss(),
                                decollate=False)
    saves = {"model": net, "optimizer": optimizer}
    TrainingCheckpointSaver(ckpt, saves).attach(trainer)
    return trainer, {**saves, "trainer": trainer}


def test_truncated_and_foreign_checkpoints(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = tmp_path / "ckpt"
    trainer, load_dict = _saver_setup(ckpt)
    trainer.run()
    good = ckpt / "checkpoint_epoch=2.pt"
    truncated = ckpt / "checkpoint_epoch=9.pt"  # the newest by name and iteration count, but cut short
    truncated.write_bytes(good.read_bytes()[:300])
    (ckpt / "checkpoint_last.pt").unlink()
    foreign = ckpt / "checkpoint_foreign.pt"
    torch.save({"model": network().state_dict(), "model_spec": {}, "operating_point": {}}, foreign)
    _, fresh = _saver_setup(tmp_path / "other")
    with pytest.raises(ValueError, match=r"checkpoint_epoch=9\.pt: not a readable training checkpoint"):
        ResumeFromCheckpoint(truncated, fresh).attach(fresh["trainer"])
    with pytest.raises(ValueError, match=r"checkpoint_foreign\.pt: not a training checkpoint.*model file"):
        ResumeFromCheckpoint(foreign, fresh).attach(fresh["trainer"])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=r"junk\.pt: not a readable training checkpoint"):
        ResumeFromCheckpoint(tmp_path / "junk.pt", fresh).attach(fresh["trainer"])
    wrong = tmp_path / "wrong_network.pt"
    torch.save({**torch.load(good), "model": {"weight": torch.zeros(3)}}, wrong)
    with pytest.raises(ValueError, match=r"wrong_network\.pt: the 'model' state does not fit this run"):
        ResumeFromCheckpoint(wrong, fresh).attach(fresh["trainer"])
    with caplog.at_level("INFO"):
        resume = ResumeFromCheckpoint("auto", fresh, save_dir=ckpt)
        assert resume.resolve() == good
    assert "passed over" in caplog.text and "checkpoint_epoch=9.pt" in caplog.text
    assert ResumeFromCheckpoint("auto", fresh, save_dir=tmp_path / "empty").resolve() is None


@contextlib.contextmanager
def _full_folder(tmp_path: Path) -> Iterator[Path | None]:
    """A 256 KiB tmpfs when this process may mount one, else None (the write error is then simulated)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True
    ).returncode == 0
    try:
        yield folder if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tmp_path / "ckpt"
    trainer, _ = _saver_setup(ckpt)
    trainer.state.max_epochs = 1
    trainer.run()
    saver = TrainingCheckpointSaver(ckpt, {"model": trainer.network, "optimizer": trainer.optimizer})
    previous = (ckpt / "checkpoint_epoch=1.pt").read_bytes()
    with _full_folder(tmp_path) as folder:
        if folder is not None:  # a real full disk: fill the tmpfs, then save into it
            saver.save_dir = folder
            (folder / "checkpoint_epoch=1.pt").write_bytes(previous)
            # the filler itself may hit the full disk, which is the state wanted
            with contextlib.suppress(OSError), open(folder / "filler", "wb") as f:
                f.write(b"\0" * (256 * 1024 - len(previous)))
        else:
            def no_space(obj: object, f: object) -> None:
                f.write(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(torch, "save", no_space)
        target = saver.save_dir
        refused = r"checkpoint_epoch=2\.pt: cannot save the checkpoint .*kept: checkpoint_epoch=1\.pt"
        with pytest.raises(OSError, match=refused):
            trainer.state.epoch = 2
            saver(trainer)
        assert (target / "checkpoint_epoch=1.pt").read_bytes() == previous  # intact, and still the newest
        assert not (target / "checkpoint_epoch=2.pt").exists()
        assert not [p for p in target.iterdir() if p.name.endswith(".tmp")]


def test_nan_loss_stops_with_the_batch_files_and_keeps_the_last_good_state(tmp_path: Path, sqlite_uri: str) -> None:
    ckpt, uri = tmp_path / "ckpt", sqlite_uri
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, iteration 9; batch: batch2_img0.png, batch2_img1.png"):
        train(["--ckpt", str(ckpt), "--uri", uri, "--nan-at", "9", "--out", str(tmp_path / "final.pt")])
    saved = load_training_checkpoint(ckpt / "checkpoint_last.pt", ["model", "optimizer", "trainer"])
    assert all(torch.isfinite(v).all() for v in saved["model"].values())
    assert saved["trainer"]["iteration"] == 9  # state before the NaN batch's optimizer step
    _, run = _server_run(uri, "reliability")
    assert run.info.status == "FAILED"
    assert "NonFiniteLossError: non-finite loss (nan) at epoch 2" in run.data.tags["error"]
    # resuming from that state continues the same run (back to RUNNING, then FINISHED) after the failed step 9
    train(["--ckpt", str(ckpt), "--uri", uri, "--resume", "auto", "--out", str(tmp_path / "final.pt")])
    client, run = _server_run(uri, "reliability")
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "Loss")]
    assert steps == [*range(1, 9), *range(10, 25)]


def test_nan_loss_skipped_up_to_a_limit(caplog: pytest.LogCaptureFixture) -> None:
    net = network()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    data = batches(2)
    data[0]["image"] = data[0]["image"] * float("nan")
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=data[:1], network=net,
                                optimizer=torch.optim.Adam(net.parameters(), lr=0.01),
                                loss_function=torch.nn.CrossEntropyLoss(), decollate=False)
    NonFiniteLossHandler(max_skipped=1).attach(trainer)
    trainer.run()
    assert "batch skipped (1 of at most 1)" in caplog.text and "batch0_img3.png" in caplog.text
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the NaN batch changed nothing


def test_a_rank_that_raises_ends_every_rank(tmp_path: Path) -> None:
    """torchrun, 2 CPU processes on gloo: rank 1 raises at iteration 3; rank 0 must not hang in a collective."""
    torchrun = Path(sys.executable).with_name("torchrun")
    started = time.monotonic()
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nnodes=1", "--nproc_per_node=2", str(CHILD), "--ckpt", str(tmp_path),
         "--uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--out", str(tmp_path / "final.pt"), "--raise-rank", "1"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode != 0
    assert "rank 1 failed on purpose" in result.stderr
    assert time.monotonic() - started < 240


def test_torn_journal_line_and_a_refused_record(
    tmp_path: Path, sqlite_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A kill mid-append leaves a torn last line: ignored and cut off. A record the server refuses for good is
    kept as rejected and the records after it are still delivered."""
    uri = sqlite_uri
    journal = RunJournal.create(tmp_path / "tracking", uri, "journal", "torn", (tmp_path / "artifacts").as_uri())
    journal.acquire()
    journal.append("start")
    journal.append("log", metrics=[["ok", 1.0, 1000, 1]], params=[], tags=[])
    journal.append("log", metrics=[["bad:name?", 1.0, 1000, 1]], params=[], tags=[])
    journal.append("log", metrics=[["ok", 2.0, 2000, 2]], params=[], tags=[])
    journal.release()
    with open(journal.path / "journal.jsonl", "a") as f:
        f.write('{"seq": 4, "op": "log", "metr')
    assert medgain_main(["sync", str(tmp_path / "tracking")]) == 0
    assert "cut off by a kill" in caplog.text and "refused record 2" in caplog.text
    reopened = RunJournal(journal.path)
    assert len(reopened.records) == 4 and [r["seq"] for r in reopened.state["rejected"]] == [2]
    client, run = _server_run(uri, "journal")
    assert [m.value for m in client.get_metric_history(run.info.run_id, "ok")] == [1.0, 2.0]

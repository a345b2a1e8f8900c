"""Training against a real ``mlflow server`` that is down: does tracking slow the training loop?

Part 1 (always): a tiny in-process training loop (iteration loss and learning rate logged every iteration) with
``BufferedMLFlowHandler`` with the server up and with the server killed, MONAI's plain ``MLFlowHandler`` with the
server up, and one plain ``MlflowClient.log_metric`` call (MLflow's default retries) with the server down; then
``medgain sync`` after the restart. Part 2 (``--bundle``): capsule-bundle training with the server killed after
epoch 2 and restarted after epoch 4, and down for the whole run (then ``medgain sync``), against an undisturbed
run, and what the server holds afterwards.

    .venv/bin/python benchmarks/tracking_outage.py [--iterations 300] [--bundle --epochs 6 --frames 200]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.handlers import MLFlowHandler
from monai.utils import CommonKeys

from medgain.handlers import BufferedMLFlowHandler
from medgain.tracking import sync

from medgain.synth.capsule import make_capsule_dataset

BIN = Path(sys.executable).parent


class TrackingServer:
    """``mlflow server`` on 127.0.0.1 (its own process group, killed with SIGKILL)."""

    def __init__(self, root: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.root = root
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1", "--port",
             str(self.port), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )

    def wait(self) -> float:
        started = time.monotonic()
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1)
                return time.monotonic() - started
            except OSError:
                time.sleep(0.2)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def train(
    root: Path, data: Path, uri: str, epochs: int, on_epoch: dict[int, object], **extra: object
) -> tuple[float, float]:
    """Seconds until the last epoch's checkpoint exists and until the process ends (the run closed, its
    tracking delivered or left for sync); ``on_epoch[n]()`` runs once checkpoint_epoch=n.pt exists."""
    command_started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys, json; from medgain.demo import bundle_run; "
         "bundle_run('training', ['train.yaml'], bundle_root=sys.argv[1], **json.loads(sys.argv[2]))",
         str(root), json.dumps({
             "dataset_dir": str(data), "max_epochs": epochs, "image_size": 64, "batch_size": 16, "num_workers": 0,
             "network": "small_cnn", "tracking_uri": uri, "experiment_name": "outage", **extra})],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    pending = dict(on_epoch)
    trained = None
    last = root / "models" / f"checkpoint_epoch={epochs}.pt"
    while process.poll() is None:
        for epoch in sorted(pending):
            if (root / "models" / f"checkpoint_epoch={epoch}.pt").exists():
                pending.pop(epoch)()
        if trained is None and last.exists():
            trained = time.monotonic() - command_started
        time.sleep(0.05)
    if process.returncode != 0:
        raise RuntimeError(f"training in {root} failed")
    return trained or math.nan, time.monotonic() - command_started


def held(uri: str, run_name_prefix: str = "train-") -> list[str]:
    """One line per training run on the server: status, metric points per key (duplicates counted), artifacts."""
    client = mlflow.MlflowClient(uri)
    lines = []
    experiment = client.get_experiment_by_name("outage")
    for run in client.search_runs([experiment.experiment_id]):
        steps = {key: [m.step for m in client.get_metric_history(run.info.run_id, key)] for key in run.data.metrics}
        duplicates = sum(len(v) - len(set(v)) for v in steps.values())
        artifacts = []
        stack = [None]
        while stack:
            for entry in client.list_artifacts(run.info.run_id, stack.pop()):
                (stack.append(entry.path) if entry.is_dir else artifacts.append(entry.path))
        versions = client.search_model_versions(f"run_id='{run.info.run_id}'")
        lines.append(
            f"{run.info.run_name}: {run.info.status}, {len(run.data.params)} params, "
            f"{sum(map(len, steps.values()))} metric points ({duplicates} duplicated), {len(artifacts)} artifacts, "
            f"{len(versions)} model version(s)"
        )
    return lines


def loop(handler: MLFlowHandler, iterations: int) -> float:
    """Seconds of a tiny training loop of ``iterations`` steps with ``handler`` attached (its close excluded)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    data = [{"image": torch.rand(4, 3, 8, 8), "label": torch.tensor([0, 1, 0, 1])} for _ in range(iterations)]
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=data, network=net,
                                optimizer=torch.optim.SGD(net.parameters(), lr=0.01),
                                loss_function=torch.nn.CrossEntropyLoss(), decollate=False)
    handler.attach(trainer)
    times = {}
    trainer.add_event_handler(Events.ITERATION_STARTED(once=1), lambda e: times.setdefault("start", time.monotonic()))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: times.setdefault("end", time.monotonic()))
    trainer.run()
    return times["end"] - times["start"]


def in_process(tmp: Path, iterations: int) -> None:
    """Part 1 (see the module docstring)."""
    server = TrackingServer(tmp / "server_loop")
    server.start()
    print(f"mlflow server start-up: {server.wait():.1f} s")
    kwargs = {"tracking_uri": server.uri, "experiment_name": "loop", "close_on_complete": True,
              "output_transform": lambda out: out[CommonKeys.LOSS].item()}
    plain = loop(MLFlowHandler(run_name="plain", **kwargs), iterations)
    up = loop(BufferedMLFlowHandler(tmp / "up", run_name="buffered-up", **kwargs), iterations)
    server.kill()
    down = loop(BufferedMLFlowHandler(tmp / "down", run_name="buffered-down", offline_timeout=1.0, **kwargs),
                iterations)
    print(f"{iterations} iterations, 2 metrics logged per iteration:")
    print(f"  MLFlowHandler, server up:          {plain:6.2f} s ({1000 * plain / iterations:.2f} ms / iteration)")
    print(f"  BufferedMLFlowHandler, server up:   {up:6.2f} s ({1000 * up / iterations:.2f} ms / iteration)")
    print(f"  BufferedMLFlowHandler, server down: {down:6.2f} s ({1000 * down / iterations:.2f} ms / iteration)")
    probe = subprocess.Popen(
        [sys.executable, "-c", "import mlflow, sys; mlflow.MlflowClient(sys.argv[1]).log_metric('0' * 32, 'x', 1.0)",
         server.uri], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST")},
    )
    started = time.monotonic()
    try:
        probe.wait(timeout=60)
        print(f"  one plain log_metric, server down:  returned after {time.monotonic() - started:.1f} s")
    except subprocess.TimeoutExpired:
        probe.kill()
        print("  one plain log_metric, server down:  still blocked in MLflow's retries after 60 s")
    server.start()
    server.wait()
    started = time.monotonic()
    results = sync(tmp / "down")
    print(f"  medgain sync after the restart: {time.monotonic() - started:.1f} s, {results[0]['records']} records, "
          f"{results[0]['status']}")
    client = mlflow.MlflowClient(server.uri)
    for run in client.search_runs([client.get_experiment_by_name("loop").experiment_id]):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "Loss")]
        print(f"  {run.info.run_name}: {run.info.status}, Loss steps {len(steps)} ({len(steps) - len(set(steps))} "
              "duplicated)")
    server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--bundle", action="store_true", help="also part 2: the capsule bundle (minutes)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--frames", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        in_process(tmp, args.iterations)
        if args.bundle:
            bundle(tmp, args.epochs, args.frames)


def bundle(tmp: Path, epochs: int, frames: int) -> None:
    """Part 2 (see the module docstring)."""
    data = make_capsule_dataset(tmp / "data", frames, seed=0, size=64, prevalence=0.3).parent
    for case in ("undisturbed", "killed after epoch 2, restarted after epoch 4", "down for the whole run"):
        server = TrackingServer(tmp / f"server_{len(case)}")
        server.start()
        startup = server.wait()
        root = tmp / f"run_{len(case)}"
        if case.startswith("undisturbed"):
            trained, wall = train(root, data, server.uri, epochs, {})
        elif case.startswith("killed"):
            trained, wall = train(root, data, server.uri, epochs, {2: server.kill, 4: server.start},
                                  tracking_offline_timeout=120)
        else:
            server.kill()
            trained, wall = train(root, data, server.uri, epochs, {}, tracking_offline_timeout=2)
            server.start()
            server.wait()
            synced = time.monotonic()
            subprocess.run([str(BIN / "medgain"), "sync", str(root / "models")], check=True, stdout=subprocess.DEVNULL)
            print(f"  medgain sync took {time.monotonic() - synced:.1f} s")
        print(f"{case}: last epoch done after {trained:.1f} s, process ended after {wall:.1f} s "
              f"(server start-up {startup:.1f} s)")
        for line in held(server.uri):
            print(f"  {line}")
        server.kill()


if __name__ == "__main__":
    main()

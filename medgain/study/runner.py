"""Runs a study's grid through ``python -m monai.bundle run``: data per data seed, then train + evaluate per run,
in parallel, skipping runs that finished; one MLflow parent run with a child per training and evaluation run."""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medgain.demo import bundle_run
from medgain.model_file import atomic_write
from medgain.study.spec import RunKey, StudySpec

__all__ = ["RESULT_FILE", "RunOutcome", "default_workers", "prepare_data", "run_study", "study_parent_run"]

logger = logging.getLogger(__name__)

#: written into a run's folder when its evaluation finished: what the report reads, and the skip marker
RESULT_FILE = "result.json"
_STATE_FILE = "study.json"


@dataclass
class RunOutcome:
    """What happened to one run of :func:`run_study`."""

    key: RunKey
    status: str  # "done" (this call), "skipped" (finished before), "failed"
    log: Path
    message: str = ""


def default_workers() -> int:
    """Parallel runs when the study does not say: one per visible GPU, else one."""
    import torch

    return max(1, torch.cuda.device_count())


def prepare_data(spec: StudySpec) -> None:
    """Generate each data set of the grid (per data seed, and per configuration with its own data options) once (written to a temporary folder, then renamed).

    Raises:
        FileNotFoundError: when a fixed ``dataset_dir`` does not exist.
        RuntimeError: naming the log file when ``medgain synth`` fails.
    """
    if "dataset_dir" in spec.data:
        if not Path(spec.data["dataset_dir"]).is_dir():
            raise FileNotFoundError(f"study {spec.path}: dataset_dir does not exist: {spec.data['dataset_dir']}")
        return
    for target, (data_seed, args) in spec.data_sets().items():
        if target.is_dir():
            continue
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "medgain.cli", "synth", str(spec.data["synth"]), "--out", str(partial),
                   "--seed", str(data_seed)]
        for name, value in args.items():
            flag = f"--{str(name).replace('_', '-')}"
            if value is True:
                command.append(flag)
            elif value is not False and value is not None:
                command += [flag, *map(str, value if isinstance(value, list) else [value])]
        log = target.with_name(target.name + ".log")
        logger.info("study %s: generating data seed %d -> %s", spec.name, data_seed, target)
        with open(log, "w") as out:
            result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"study {spec.path}: `medgain synth {spec.data['synth']}` failed for data seed "
                               f"{data_seed}; see {log}")
        partial.rename(target)


def _client(spec: StudySpec) -> Any:
    import mlflow

    from medgain.tracking.store import prepare_store

    prepare_store(spec.tracking_uri)  # the "Default" experiment's artifacts beside the store too
    return mlflow.MlflowClient(spec.tracking_uri)


def _experiment_id(client: Any, name: str, tracking_uri: str) -> str:
    """The study's experiment; created with its artifacts in ``mlruns/`` beside a SQLite store (as the bundles'
    MLflow handlers do), never in the current folder."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlruns").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def study_parent_run(spec: StudySpec) -> str:
    """The study's MLflow parent run id, created on the first call and kept in ``<output_dir>/study.json``."""
    state_path = spec.output_dir / _STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    client = _client(spec)
    experiment_id = _experiment_id(client, spec.name, spec.tracking_uri)
    run_id = state.get("parent_run_id")
    if run_id is None:
        run = client.create_run(experiment_id, run_name=spec.name, tags={"medgain.study": spec.name})
        run_id = run.info.run_id
        client.log_param(run_id, "bundle", spec.bundle.name)
        client.log_param(run_id, "configs", ",".join(spec.configs))
        client.log_param(run_id, "seeds", ",".join(map(str, spec.seeds)))
        client.log_param(run_id, "data_seeds", ",".join(map(str, spec.data_seeds)))
        client.log_param(run_id, "reference", spec.reference)
        state["parent_run_id"] = run_id
        spec.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(state_path, lambda f: f.write(json.dumps(state, indent=2).encode()))
    else:
        client.update_run(run_id, status="RUNNING")
    return run_id


def _runs_named(client: Any, experiment_id: str, run_name: str) -> list[Any]:
    return client.search_runs([experiment_id], filter_string=f"attributes.run_name = '{run_name}'")


def _close_stale_runs(client: Any, experiment_id: str, key: RunKey) -> None:
    """An earlier attempt of this run that was killed leaves MLflow runs in RUNNING: mark them KILLED."""
    for stage in ("train", "evaluate"):
        for run in _runs_named(client, experiment_id, key.run_name(stage)):
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, status="KILLED")


def _adopt(client: Any, experiment_id: str, parent: str, key: RunKey, stage: str, spec: StudySpec) -> str | None:
    """Make the finished MLflow run of a stage a child of the study's run; its id, or None when not found."""
    runs = [r for r in _runs_named(client, experiment_id, key.run_name(stage)) if r.info.status == "FINISHED"]
    if not runs:
        return None
    run = max(runs, key=lambda r: r.info.start_time)
    tags = {"mlflow.parentRunId": parent, "medgain.study": spec.name, "study.config": key.config,
            "study.seed": str(key.seed), "study.data_seed": str(key.data_seed), "study.stage": stage}
    for name, value in tags.items():
        client.set_tag(run.info.run_id, name, value)
    return run.info.run_id


def _run_one(spec: StudySpec, key: RunKey, env: dict[str, str], parent: str, experiment_id: str) -> RunOutcome:
    folder = spec.run_dir(key)
    log = folder.with_name(folder.name + ".log")
    if (folder / RESULT_FILE).is_file():
        return RunOutcome(key, "skipped", log)
    client = _client(spec)
    _close_stale_runs(client, experiment_id, key)
    shutil.rmtree(folder, ignore_errors=True)  # a killed attempt restarts cleanly
    folder.mkdir(parents=True)
    log.write_text("")
    started = time.perf_counter()
    for stage, configs, overrides in (
        ("train", spec.train_configs, spec.training_overrides(key)),
        ("evaluate", spec.evaluate_configs, spec.evaluation_overrides(key)),
    ):
        run_id = "training" if stage == "train" else "evaluate"
        result = bundle_run(run_id, configs, bundle=spec.bundle, bundle_root=folder, check=False, env=env,
                            log_path=log, **overrides)
        if result.returncode != 0:
            return RunOutcome(key, "failed", log, f"{stage} exited with {result.returncode}; see {log}")
    metrics_path = folder / spec.evaluation_outputs / "metrics.json"
    predictions = folder / spec.evaluation_outputs / "predictions.csv"
    if not metrics_path.is_file() or not predictions.is_file():
        return RunOutcome(key, "failed", log, f"evaluation wrote no metrics.json / predictions.csv under "
                                              f"{folder / spec.evaluation_outputs}; see {log}")
    record = {
        "config": key.config, "data_seed": key.data_seed, "seed": key.seed,
        "metrics": json.loads(metrics_path.read_text()),
        "predictions": str(predictions.relative_to(folder)),
        "train_run_id": _adopt(client, experiment_id, parent, key, "train", spec),
        "evaluate_run_id": _adopt(client, experiment_id, parent, key, "evaluate", spec),
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    atomic_write(folder / RESULT_FILE, lambda f: f.write(json.dumps(record, indent=2).encode()))
    return RunOutcome(key, "done", log)


def run_study(spec: StudySpec, workers: int | None = None) -> list[RunOutcome]:
    """Run every unfinished run of the grid; finished runs (with ``result.json``) are skipped.

    Each worker slot runs one training + evaluation at a time; on a GPU machine slot ``i`` sees GPU ``i``
    (``CUDA_VISIBLE_DEVICES``), on CPU the cores are shared out (``OMP_NUM_THREADS``). A failed run does not stop
    the others; its outcome names its log.

    Args:
        spec: the study.
        workers: parallel runs; default: the study's ``workers``, else :func:`default_workers`.
    """
    import torch

    workers = workers or spec.workers or default_workers()
    prepare_data(spec)
    parent = study_parent_run(spec)
    client = _client(spec)
    experiment_id = _experiment_id(client, spec.name, spec.tracking_uri)
    gpus = torch.cuda.device_count()
    threads = max(1, (os.cpu_count() or 1) // workers)
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(workers):
        slots.put(slot)

    def work(key: RunKey) -> RunOutcome:
        slot = slots.get()
        try:
            env = {"OMP_NUM_THREADS": str(threads)}
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
            outcome = _run_one(spec, key, env, parent, experiment_id)
            logger.info("study %s: %s %s%s", spec.name, key.folder, outcome.status,
                        f" ({outcome.message})" if outcome.message else "")
            return outcome
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = list(pool.map(work, spec.runs()))
    failed = any(o.status == "failed" for o in outcomes)
    client.set_terminated(parent, status="FAILED" if failed else "FINISHED")
    return outcomes

"""A study: named configurations of one bundle × training seeds × data seeds, read from a YAML file."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from medgain.bundle_variables import bundle_variables, unknown_variables
from medgain.config_yaml import load_yaml

__all__ = ["VARIANT_SEPARATOR", "RunKey", "StudySpec", "load_study"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_KEYS = {
    "name", "bundle", "output_dir", "tracking_uri", "data", "seeds", "data_seeds", "train", "evaluate", "configs",
    "reference", "gap", "x_axis", "run_metrics", "train_configs", "evaluate_configs", "workers", "split", "evaluation_outputs",
    "data_variants", "marker_probe", "checkpoint",
}
#: joins a configuration and a data variant into the name of a grid column (``plain@confounded``)
VARIANT_SEPARATOR = "@"


@dataclass(frozen=True, order=True)
class RunKey:
    """One run of a study: a configuration trained with one seed on the data set of one data seed."""

    config: str
    data_seed: int
    seed: int

    @property
    def folder(self) -> str:
        """The run's folder under ``<output_dir>/runs``."""
        return f"{self.config}/d{self.data_seed}_s{self.seed}"

    def run_name(self, stage: str) -> str:
        """The MLflow run name of a stage ("train", "evaluate") of this run."""
        return f"{self.config}.d{self.data_seed}.s{self.seed}.{stage}"


@dataclass
class StudySpec:
    """A study read by :func:`load_study`.

    Args:
        name: the study's name (MLflow experiment and parent run).
        path: the YAML file it was read from.
        bundle: the MONAI bundle folder every run goes through.
        output_dir: where data, runs and the report go.
        tracking_uri: MLflow tracking URI of the parent and child runs.
        data: ``{"synth": kind, "args": {...}}`` (``medgain synth <kind>`` per data seed) or
            ``{"dataset_dir": path}`` (one data set, data seed 0).
        seeds: training seeds.
        data_seeds: data-generation seeds.
        train: overrides of every training run.
        evaluate: overrides of every evaluation run.
        configs: configuration name → its overrides of the training run.
        config_data: configuration name → options of ``medgain synth`` that differ from ``data.args`` for it
            (e.g. a model trained on unconfounded data); such a configuration gets a data set of its own per data
            seed. Its runs are still paired with the others by test sample (file names relative to the data set).
        reference: the configuration the others are compared with.
        gap: ``(start, end)``: two configurations (e.g. a model trained on confounded data and one trained on clean
            data); the report gives the fraction of the gap between them each other configuration closes.
        run_metrics: further per-run figures of the evaluation's ``metrics.json`` to report, named without the
            split prefix (e.g. ``[froc, slide_auc]`` for the whole-slide bundle); their CI is over runs.
        x_axis: an override plotted on the x axis (e.g. ``masks_fraction``), or None.
        train_configs: bundle config files of training.
        evaluate_configs: bundle config files of evaluation (merged in order).
        workers: parallel runs (None: one per GPU, else one).
        split: the held-out split evaluated.
        evaluation_outputs: the folder, under a run's bundle root, where evaluation writes ``metrics.json`` and
            ``predictions.csv``.
        variants: data variant name → its ``medgain synth`` options (e.g. ``clean: {shortcut_rate: 0}`` and
            ``confounded: {shortcut_rate: 0.8}``); every method is trained on each, as configuration
            ``<method>@<variant>`` (``configs`` holds these crossed names). The first variant is the baseline of the
            report's per-method penalty table. Empty: no variants, ``configs`` are the methods.
        methods: the configurations as the study file names them (the methods crossed with the variants).
        marker_probe: report the marker-reliance probe (:mod:`medgain.study.probe`; synthetic capsule data).
        checkpoint: the shipped model file of a run, relative to its bundle root (its epoch is reported).
    """

    name: str
    path: Path
    bundle: Path
    output_dir: Path
    tracking_uri: str
    data: dict[str, Any]
    seeds: list[int]
    data_seeds: list[int]
    configs: dict[str, dict[str, Any]]
    reference: str
    train: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)
    x_axis: str | None = None
    train_configs: list[str] = field(default_factory=lambda: ["train.yaml"])
    evaluate_configs: list[str] = field(default_factory=lambda: ["train.yaml", "evaluate.yaml"])
    workers: int | None = None
    split: str = "test"
    evaluation_outputs: str = "outputs/evaluation"
    config_data: dict[str, dict[str, Any]] = field(default_factory=dict)
    gap: tuple[str, str] | None = None
    run_metrics: list[str] = field(default_factory=list)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    methods: list[str] = field(default_factory=list)
    marker_probe: bool = False
    checkpoint: str = "models/model.pt"

    def split_config(self, config: str) -> tuple[str, str | None]:
        """``(method, variant)`` of a configuration (variant None in a study without variants)."""
        if self.variants:
            method, variant = config.rsplit(VARIANT_SEPARATOR, 1)
            return method, variant
        return config, None

    def reference_of(self, config: str) -> str:
        """The configuration a configuration is compared with: the reference method on the same data variant."""
        _, variant = self.split_config(config)
        return self.reference if variant is None else f"{self.reference}{VARIANT_SEPARATOR}{variant}"

    def subset(self, seeds: list[int] | None = None, data_seeds: list[int] | None = None,
               methods: list[str] | None = None) -> StudySpec:
        """The same study on some of its seeds and methods (a session-sized part of the grid; the rest runs later,
        as the runner skips finished runs). A method keeps all its data variants.

        Raises:
            ValueError: naming the study file, when a seed or a method is not one of the study's.
        """
        for name, chosen, known in (("seeds", seeds, self.seeds), ("data_seeds", data_seeds, self.data_seeds),
                                    ("methods", methods, self.methods)):
            if chosen is not None and (not chosen or not set(chosen) <= set(known)):
                raise ValueError(f"study file {self.path}: {name} {chosen} must be some of the study's {known}")
        return replace(self, seeds=list(seeds if seeds is not None else self.seeds),
                       data_seeds=list(data_seeds if data_seeds is not None else self.data_seeds),
                       configs={c: o for c, o in self.configs.items()
                                if methods is None or self.split_config(c)[0] in methods})

    def runs(self) -> list[RunKey]:
        """Every run of the grid, configuration by configuration."""
        return [RunKey(c, d, s) for c in self.configs for d in self.data_seeds for s in self.seeds]

    def synth_args(self, config: str | None = None) -> dict[str, Any]:
        """The ``medgain synth`` options of a configuration's data set (the study's, then the configuration's)."""
        return {**(self.data.get("args") or {}), **self.config_data.get(config or "", {})}

    def dataset_dir(self, data_seed: int, config: str | None = None) -> Path:
        """The data set of a data seed (for ``config``: its own when it changes the data options)."""
        if "dataset_dir" in self.data:
            return Path(self.data["dataset_dir"])
        own = self.config_data.get(config or "")
        if not own:
            return self.output_dir / "data" / f"d{data_seed}"
        digest = hashlib.sha256(json.dumps(self.synth_args(config), sort_keys=True).encode()).hexdigest()[:8]
        return self.output_dir / "data" / f"d{data_seed}_{digest}"

    def data_sets(self) -> dict[Path, tuple[int, dict[str, Any]]]:
        """Every data set the grid needs: its folder → (data seed, ``medgain synth`` options)."""
        return {self.dataset_dir(k.data_seed, k.config): (k.data_seed, self.synth_args(k.config))
                for k in self.runs()}

    def run_dir(self, key: RunKey) -> Path:
        """The bundle root of a run."""
        return self.output_dir / "runs" / key.folder

    def training_overrides(self, key: RunKey) -> dict[str, Any]:
        """The variables a run's training is given (common, then the configuration's, then seed and data)."""
        return {
            **self.train,
            **self.configs[key.config],
            "seed": key.seed,
            "dataset_dir": str(self.dataset_dir(key.data_seed, key.config)),
            "tracking_uri": self.tracking_uri,
            "experiment_name": self.name,
            "run_name": key.run_name("train"),
        }

    def evaluation_overrides(self, key: RunKey) -> dict[str, Any]:
        """The variables a run's evaluation is given (its training's, the evaluation's, the split)."""
        return {
            **self.training_overrides(key),
            **self.evaluate,
            "split": self.split,
            "run_name": key.run_name("evaluate"),
        }


def _fail(path: Path, message: str) -> None:
    raise ValueError(f"study file {path}: {message}")


def _seeds(path: Path, raw: dict[str, Any], name: str, default: list[int]) -> list[int]:
    seeds = raw.get(name, default)
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        _fail(path, f"{name!r} must be a non-empty list of non-negative integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        _fail(path, f"{name!r} repeats a seed: {seeds}")
    return seeds


def _mapping(path: Path, raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name) or {}
    if not isinstance(value, dict):
        _fail(path, f"{name!r} must be a mapping of config variables, got {type(value).__name__}")
    return value


def load_study(path: str | os.PathLike) -> StudySpec:
    """Read and check a study file. Relative paths in it are relative to the file's folder.

    Raises:
        FileNotFoundError: when the file or the bundle is missing.
        ValueError: naming the file and the field, for anything malformed: a repeated key, an unknown field (also
            in ``data``), an override naming a variable that the bundle's config files do not define.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"study file not found: {path}")
    raw = load_yaml(path.read_bytes(), f"study file {path}")
    if not isinstance(raw, dict):
        _fail(path, "must be a mapping")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        _fail(path, f"unknown fields {unknown}; known: {sorted(_KEYS)}")
    for required in ("name", "bundle", "data", "configs"):
        if required not in raw:
            _fail(path, f"missing field {required!r}")
    name = str(raw["name"])
    if not _NAME.match(name):
        _fail(path, f"'name' must be letters, digits, '_', '.', '-', got {name!r}")
    here = path.parent
    bundle = (here / raw["bundle"]).resolve()
    if not (bundle / "configs" / "metadata.json").is_file():
        raise FileNotFoundError(f"study file {path}: 'bundle' is not a MONAI bundle (no configs/metadata.json): {bundle}")
    output_dir = (here / raw.get("output_dir", f"studies/{name}")).resolve()
    data = _mapping(path, raw, "data")
    unknown = sorted(set(data) - {"synth", "args", "dataset_dir"})
    if unknown:
        _fail(path, f"unknown fields {unknown} in 'data'; known: ['args', 'dataset_dir', 'synth']")
    if ("synth" in data) == ("dataset_dir" in data):
        _fail(path, "'data' needs exactly one of 'synth' (a `medgain synth` data set) or 'dataset_dir'")
    if "dataset_dir" in data:
        data = {"dataset_dir": str((here / data["dataset_dir"]).resolve())}
        if raw.get("data_seeds", [0]) != [0]:
            _fail(path, "'data_seeds' needs 'data: {synth: ...}'; a fixed 'dataset_dir' is one data set")
    elif not isinstance(data.get("args", {}), dict):
        _fail(path, "'data.args' must be a mapping of `medgain synth` options")
    configs = _mapping(path, raw, "configs")
    if not configs:
        _fail(path, "'configs' names no configuration")
    variants = _variants(path, raw, data)
    for config, overrides in configs.items():
        if not _NAME.match(str(config)):
            _fail(path, f"configuration name {config!r} must be letters, digits, '_', '.', '-'")
        if not isinstance(overrides or {}, dict):
            _fail(path, f"configuration {config!r} must be a mapping of config variables")
        reserved = {"seed", "dataset_dir", "tracking_uri", "experiment_name", "run_name"} & set(overrides or {})
        if reserved:
            _fail(path, f"configuration {config!r} sets {sorted(reserved)}, which the study sets per run")
        own_data = (overrides or {}).get("data")
        if own_data is not None and (not isinstance(own_data, dict) or "synth" not in data):
            _fail(path, f"configuration {config!r}: 'data' must be a mapping of `medgain synth` options, and needs "
                        "the study's 'data: {synth: ...}'")
    reference = str(raw.get("reference", next(iter(configs))))
    if reference not in configs:
        _fail(path, f"'reference' {reference!r} is not one of the configurations {list(configs)}")
    crossed = {(f"{c}{VARIANT_SEPARATOR}{v}" if variants else str(c)): (c, v)
               for c in configs for v in variants or [None]}
    gap = raw.get("gap")
    if gap is not None and (not isinstance(gap, list) or len(gap) != 2 or len(set(gap)) != 2
                            or not set(gap) <= set(crossed)):
        _fail(path, f"'gap' must name two different configurations of {list(crossed)}, got {gap!r}")
    marker_probe = raw.get("marker_probe", False)
    if not isinstance(marker_probe, bool):
        _fail(path, f"'marker_probe' must be true or false, got {marker_probe!r}")
    if marker_probe and data.get("synth") not in ("capsule", "dermoscopy"):
        _fail(path, "'marker_probe' needs 'data: {synth: capsule}' (it burns the capsule generator's marker) or "
                    "'data: {synth: dermoscopy}' (it scores the inked twins of the test images)")
    if marker_probe and data.get("synth") == "dermoscopy" and not (data.get("args") or {}).get("ink_probe"):
        _fail(path, "'marker_probe' on dermoscopy data needs 'ink_probe: true' in 'data.args' (the inked twins)")
    checkpoint = raw.get("checkpoint", "models/model.pt")
    if not isinstance(checkpoint, str) or not checkpoint or Path(checkpoint).is_absolute():
        _fail(path, f"'checkpoint' must be a model file path relative to a run's folder, got {checkpoint!r}")
    run_metrics = raw.get("run_metrics", [])
    if not isinstance(run_metrics, list) or not all(isinstance(m, str) and _NAME.match(m) for m in run_metrics):
        _fail(path, f"'run_metrics' must be a list of metric names (without the split prefix), got {run_metrics!r}")
    workers = raw.get("workers")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        _fail(path, f"'workers' must be a positive integer, got {workers!r}")
    train_configs = list(raw.get("train_configs", ["train.yaml"]))
    evaluate_configs = list(raw.get("evaluate_configs", ["train.yaml", "evaluate.yaml"]))
    train_variables = bundle_variables(bundle, train_configs)
    for where, overrides, known in (
        ("'train'", _mapping(path, raw, "train"), train_variables),
        ("'evaluate'", _mapping(path, raw, "evaluate"), bundle_variables(bundle, evaluate_configs)),
        *((f"configuration {c!r}", {k: v for k, v in (o or {}).items() if k != "data"}, train_variables)
          for c, o in configs.items()),
    ):
        unknown = unknown_variables(overrides, known)
        if unknown:
            _fail(path, f"{where} sets {unknown}, which the bundle {bundle.name} does not define")
    tracking_uri = raw.get("tracking_uri") or f"sqlite:///{output_dir / 'mlflow.db'}"
    return StudySpec(
        name=name,
        path=path,
        bundle=bundle,
        output_dir=output_dir,
        tracking_uri=str(tracking_uri),
        data=data,
        seeds=_seeds(path, raw, "seeds", [0]),
        data_seeds=_seeds(path, raw, "data_seeds", [0]),
        configs={name: {k: v for k, v in (configs[c] or {}).items() if k != "data"}
                 for name, (c, _) in crossed.items()},
        config_data={name: own for name, (c, v) in crossed.items()
                     if (own := {**variants.get(v, {}), **((configs[c] or {}).get("data") or {})})},
        reference=reference,
        train=_mapping(path, raw, "train"),
        evaluate=_mapping(path, raw, "evaluate"),
        x_axis=raw.get("x_axis"),
        gap=(str(gap[0]), str(gap[1])) if gap else None,
        run_metrics=list(run_metrics),
        train_configs=train_configs,
        evaluate_configs=evaluate_configs,
        workers=workers,
        split=str(raw.get("split", "test")),
        evaluation_outputs=str(raw.get("evaluation_outputs", "outputs/evaluation")),
        variants=variants,
        methods=[str(c) for c in configs],
        marker_probe=marker_probe,
        checkpoint=checkpoint,
    )


def _variants(path: Path, raw: dict[str, Any], data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``data_variants`` of a study file: name → ``medgain synth`` options; at least two, names as configs'."""
    variants = raw.get("data_variants")
    if variants is None:
        return {}
    if not isinstance(variants, dict) or len(variants) < 2:
        _fail(path, f"'data_variants' must map two or more variant names to `medgain synth` options, got {variants!r}")
    if "synth" not in data:
        _fail(path, "'data_variants' needs the study's 'data: {synth: ...}'")
    for name, options in variants.items():
        if not _NAME.match(str(name)):
            _fail(path, f"data variant name {name!r} must be letters, digits, '_', '.', '-'")
        if not isinstance(options or {}, dict):
            _fail(path, f"data variant {name!r} must be a mapping of `medgain synth` options")
    return {str(name): dict(options or {}) for name, options in variants.items()}

"""The model file: a checkpoint that carries everything needed to run the model it holds.

A medgain checkpoint (written by :class:`medgain.handlers.BestModelSaver`) is a dict readable with
``torch.load(weights_only=True)``::

    {"model": state dict,
     "model_spec": {"network", "num_classes", "in_channels", "image_size", "target_layer", "normalization",
                    "class_names", "bundle", "modality", ... (see ModelSpec)},
     "operating_point": {"threshold", "probability", "max_fpr", "metric", "value"} (or "reason" instead of a
                         threshold), with what it is worth: "negatives", "positives", "false_alarms" (validation
                         counts at the threshold), "fpr_upper" (one-sided 95 % Clopper-Pearson upper bound of the
                         false-alarm rate), "confidence", "unit" and "statement" (the same in words),
     "epoch": int, "metrics": {name: float}, "provenance": {"run_id", "model_name", "model_version"},
     "attention_display": {"scale": float, "how": str} (optional: the top of the validation attention gallery's
                          colour scale, which inference heatmaps share; see load_attention_display)}

The threshold is on the log-odds of being ill (:func:`medgain.metrics.positive_score`); it is ``None`` when
validation gave no finite operating point (then no decision may be taken with the model). Model files written
before the counts were stored lack them; their statement says that the bound is unknown.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from medgain.metrics.confidence import operating_point_words
from medgain.networks import TARGET_LAYERS
from medgain.networks.architectures import ARCHITECTURES

__all__ = [
    "ARCHITECTURES",
    "ModelSpec",
    "atomic_write",
    "build_network",
    "decision_threshold",
    "find_training_checkpoint",
    "load_attention_display",
    "load_checkpoint",
    "load_model",
    "load_model_spec",
    "load_model_weights",
    "load_operating_point",
    "load_training_checkpoint",
    "save_checkpoint",
    "spec_from_config",
    "unwrap",
]

logger = logging.getLogger(__name__)

_DDP_PREFIX = "module."
@dataclass(frozen=True)
class ModelSpec:
    """What a checkpoint's network is and how its input must look.

    Args:
        network: registry name (see :data:`medgain.networks.TARGET_LAYERS`).
        num_classes: output logits.
        image_size: (height, width) of the network input.
        in_channels: input channels.
        target_layer: Grad-CAM layer; default: the registry's layer of ``network``.
        normalization: ``{"mean": [...], "std": [...]}`` applied inside the network, or None (inputs in [0, 1]).
        class_names: one name per class index (class 0 = healthy).
        architecture: "classifier" (the registered network alone), "fusion"
            (:class:`medgain.networks.FusionClassifier`: ``network`` on the image + an MLP on the encoded metadata)
            "chipnet" (:class:`medgain.networks.ChipNet` with ``network`` as chip encoder) or "glimpse"
            (:class:`medgain.networks.RecurrentGlimpseNetwork` with ``network`` as glimpse encoder).
        metadata_encoder: for "fusion": :meth:`medgain.data.MetadataEncoder.state` of the encoder fitted on the
            training items (columns, categories, normalisation), so that inference encodes metadata as training did.
        chip_size: for "chipnet": side of a chip in pixels.
        level: for whole-slide patch models: the pyramid level the patches are read at (its magnification is part
            of what the network learned), or None.
        glimpse: for "glimpse": the keyword arguments of :class:`~medgain.networks.RecurrentGlimpseNetwork`
            besides the encoder, classes and channels (glimpses, sizes, scales, ...).
        bundle: the bundle (task) that trained the model, e.g. "capsule_endoscopy_gain"; evaluation and
            inference of another bundle refuse it (:func:`load_model_spec`). "" in model files written before
            it was recorded.
        modality: the imaging modality of that task (the ``modality`` of the bundle's ``metadata.json``).
        mpp: for whole-slide patch models: microns per pixel of the patches the model was trained on (the
            slides' resolution at ``level``), or None when unknown.

    The fields after ``class_names`` are left out of :meth:`as_dict` at their defaults, so plain classifiers'
    specs keep their original form.
    """

    network: str
    num_classes: int
    image_size: tuple[int, int]
    in_channels: int = 3
    target_layer: str = ""
    normalization: dict[str, list[float]] | None = None
    class_names: list[str] = field(default_factory=list)
    architecture: str = "classifier"
    metadata_encoder: dict[str, Any] | None = None
    chip_size: int = 0
    level: int | None = None
    glimpse: dict[str, Any] | None = None
    bundle: str = ""
    modality: str = ""
    mpp: float | None = None

    def __post_init__(self) -> None:
        if self.network not in TARGET_LAYERS:
            raise ValueError(f"unknown network {self.network!r}; registered: {sorted(TARGET_LAYERS)}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; one of {sorted(ARCHITECTURES)}")
        lacking = ARCHITECTURES[self.architecture].check(self)
        if lacking is not None:
            raise ValueError(f"a {self.architecture!r} model spec needs {lacking}")
        if self.level is not None and not (isinstance(self.level, int) and self.level >= 0):
            raise ValueError(f"level must be a non-negative pyramid level or None, got {self.level!r}")
        if not isinstance(self.bundle, str) or not isinstance(self.modality, str):
            raise ValueError(f"bundle and modality must be strings, got {self.bundle!r} and {self.modality!r}")
        if self.mpp is not None:
            if isinstance(self.mpp, bool) or not isinstance(self.mpp, (int, float)) or not 0 < self.mpp < math.inf:
                raise ValueError(f"mpp must be positive microns per pixel or None, got {self.mpp!r}")
            object.__setattr__(self, "mpp", float(self.mpp))
        size = (self.image_size, self.image_size) if isinstance(self.image_size, int) else tuple(self.image_size)
        if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
            raise ValueError(f"image_size must be one or two positive integers, got {self.image_size!r}")
        object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))
        default_layer = ARCHITECTURES[self.architecture].layer_prefix + TARGET_LAYERS[self.network]
        object.__setattr__(self, "target_layer", self.target_layer or default_layer)
        names = list(self.class_names) or [f"class_{i}" for i in range(max(self.num_classes, 2))]
        object.__setattr__(self, "class_names", names)
        if self.normalization is not None:
            norm = {k: [float(v) for v in self.normalization[k]] for k in ("mean", "std")}
            object.__setattr__(self, "normalization", norm)

    def as_dict(self) -> dict[str, Any]:
        """Plain types only (stored in checkpoints, logged as MLflow params)."""
        out = asdict(self)
        out["image_size"] = list(self.image_size)
        defaults = (
            ("architecture", "classifier"), ("metadata_encoder", None), ("chip_size", 0), ("level", None),
            ("glimpse", None), ("bundle", ""), ("modality", ""), ("mpp", None),
        )
        for name, default in defaults:
            if out[name] == default:
                del out[name]
        return out


def build_network(
    spec: ModelSpec | Mapping[str, Any], pretrained_path: str | os.PathLike | None = None, logits_only: bool = False
) -> nn.Module:
    """The network a spec (or its dict) describes, with its input normalisation, freshly initialised (or from
    ``pretrained_path``). ``logits_only``: a glimpse model as :class:`~medgain.networks.GlimpseLogitsNetwork`
    (forward returns the logits tensor, as MONAI's bundle tools and TorchScript users expect; same weights)."""
    spec = spec if isinstance(spec, ModelSpec) else ModelSpec(**spec)
    return ARCHITECTURES[spec.architecture].build(spec, pretrained_path, logits_only)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through a temporary file in the same folder and ``os.replace``: readers never see a half
    file, and a failed write leaves the previous file intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU with errors naming the file.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when it is not a PyTorch file readable with ``weights_only=True``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises KeyError, RuntimeError, UnpicklingError... for foreign files
        raise ValueError(f"{path}: not a PyTorch checkpoint readable with weights_only=True ({err!r})") from err


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """``torch.save`` through :func:`atomic_write`: a kill never leaves a half file under ``path``.

    Raises:
        OSError: naming the file when it cannot be written (e.g. a full disk); the previous file is intact.
    """
    path = Path(path)
    try:
        atomic_write(path, lambda f: torch.save(dict(state), f))
    except OSError as err:
        kept = "; the previous version of this file is intact" if path.is_file() else ""
        raise OSError(err.errno, f"{path}: cannot save the checkpoint ({err.strerror or err}){kept}") from err


def load_training_checkpoint(path: str | os.PathLike, keys: Sequence[str]) -> dict[str, Any]:
    """A training checkpoint (``CheckpointSaver`` / :class:`medgain.handlers.TrainingCheckpointSaver` format),
    checked: readable, complete and holding a state for each of ``keys``.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: naming the file when it is truncated or corrupt, foreign (e.g. a model file or another
            program's file), or lacks one of ``keys``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle...
        raise ValueError(
            f"{path}: not a readable training checkpoint (truncated, corrupt or not written by PyTorch: {err!r})"
        ) from err
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path}: not a training checkpoint (a {type(checkpoint).__name__}, not a dict of states)")
    missing = [key for key in keys if not isinstance(checkpoint.get(key), Mapping)]
    if missing:
        hint = " (it is a model file; resume from a training checkpoint)" if "model_spec" in checkpoint else ""
        raise ValueError(
            f"{path}: not a training checkpoint of this run: no state for {missing} (it holds {sorted(checkpoint)})"
            + hint
        )
    return dict(checkpoint)


def find_training_checkpoint(
    save_dir: str | os.PathLike, keys: Sequence[str], pattern: str = "*.pt"
) -> tuple[Path | None, list[str]]:
    """The newest valid training checkpoint in ``save_dir`` (most trainer iterations, then newest file).

    Returns:
        The path (None when no valid one) and one line per file that was passed over, with the reason.
    """
    found, skipped = [], []
    for path in Path(save_dir).glob(pattern):
        if path.name.startswith("."):
            continue
        try:
            checkpoint = load_training_checkpoint(path, keys)
        except ValueError as err:
            skipped.append(str(err))
            continue
        trainer = checkpoint.get("trainer", {})
        found.append((int(trainer.get("iteration", 0)), path.stat().st_mtime, path))
    return (max(found)[2] if found else None), skipped


def load_model_spec(path: str | os.PathLike, bundle: str | None = None, **expected: Any) -> ModelSpec:
    """The :class:`ModelSpec` stored in a checkpoint, checked against values a config or command line gives.

    Args:
        path: checkpoint written by :class:`medgain.handlers.BestModelSaver`.
        bundle: the bundle about to run the model (its evaluation or inference); a model trained by another
            bundle is refused. A model file that does not record its bundle (written before medgain recorded it)
            is accepted with a warning naming the file. None: no check.
        expected: spec fields given by the user (e.g. ``image_size=64``, ``network="resnet18"``); None means "not
            given". A given value that differs from the checkpoint's is refused: the model must run as trained.

    Raises:
        ValueError: when the checkpoint holds no spec, was trained by another bundle than ``bundle``, or an
            expected value disagrees with it.
    """
    checkpoint = load_checkpoint(path)
    raw = checkpoint.get("model_spec") if isinstance(checkpoint, Mapping) else None
    if not isinstance(raw, Mapping):
        raise ValueError(
            f"{path}: holds no model_spec (network, input size, normalisation, classes); it was not written by "
            "medgain's BestModelSaver"
        )
    spec = ModelSpec(**raw)
    if bundle is not None:
        _check_bundle(spec, path, bundle)
    stored = spec.as_dict()
    for name, value in expected.items():
        if value is None:
            continue
        if name not in stored:
            raise ValueError(f"load_model_spec: unknown field {name!r}; fields: {sorted(stored)}")
        given = ModelSpec(**{**raw, name: value}).as_dict()[name]
        if given != stored[name]:
            raise ValueError(
                f"{path}: the model was trained with {name}={stored[name]!r} but {value!r} was given; remove the "
                f"override (the checkpoint's value is used) or use a model trained with {name}={value!r}"
            )
    return spec


def _check_bundle(spec: ModelSpec, path: str | os.PathLike, bundle: str) -> None:
    """Refuse a model trained by another bundle than ``bundle``; warn for a file that does not say."""
    if not spec.bundle:
        logger.warning(
            "%s: the model file does not record the bundle it was trained by (written before medgain recorded "
            "it); running it as a %s model without that check",
            path,
            bundle,
        )
    elif spec.bundle != bundle:
        modality = f" ({spec.modality})" if spec.modality else ""
        raise ValueError(
            f"{path}: the model was trained by {spec.bundle}{modality}; this is {bundle}, which runs only models "
            f"trained by {bundle}. Use {spec.bundle}'s evaluation / inference for it, or a model trained by {bundle}"
        )


def load_operating_point(path: str | os.PathLike) -> dict[str, Any]:
    """The operating point stored by :class:`medgain.handlers.BestModelSaver`.

    Returns:
        ``{"threshold": float | None, "max_fpr", "metric", "value", "statement", ...}``; the threshold is on the
        log-odds of being ill and None when the model has no operating point; ``statement`` says in words what its
        false-alarm rate is known to be (:func:`medgain.metrics.confidence.operating_point_words`; "unknown" for
        a model file written before the validation counts were stored).

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when it is not a checkpoint or holds no operating point (e.g. a plain state dict).
    """
    checkpoint = load_checkpoint(path)
    point = checkpoint.get("operating_point") if isinstance(checkpoint, Mapping) else None
    if not isinstance(point, Mapping) or "threshold" not in point:
        raise ValueError(f"{path}: holds no operating point (not written by BestModelSaver, e.g. a plain state dict)")
    return {**point, "statement": point.get("statement") or operating_point_words(point)}


def load_attention_display(path: str | os.PathLike) -> dict[str, Any] | None:
    """The attention colour scale stored by :class:`medgain.handlers.BestModelSaver`: the Grad-CAM value at the
    top of the validation attention gallery's common scale, so that inference heatmaps use the same one.

    Returns:
        ``{"scale": float > 0, "how": str}``, or None when the model file stores none (written before it was
        stored, or trained without a gallery).

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when the stored entry is malformed (no positive finite ``scale``).
    """
    checkpoint = load_checkpoint(path)
    display = checkpoint.get("attention_display") if isinstance(checkpoint, Mapping) else None
    if display is None:
        return None
    scale = display.get("scale") if isinstance(display, Mapping) else None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{path}: attention_display must hold a positive finite 'scale', got {display!r}")
    return {"scale": float(scale), "how": str(display.get("how", ""))}


def decision_threshold(point: Mapping[str, Any], source: str | os.PathLike) -> float:
    """The finite decision threshold of an operating point.

    Raises:
        ValueError: naming ``source`` when the model has no operating point (threshold None or not finite).
    """
    threshold = point.get("threshold")
    if threshold is None or not torch.isfinite(torch.tensor(float(threshold))):
        reason = point.get("reason") or "validation gave no finite threshold"
        if point.get("positives") and point.get("negatives"):  # both classes were there: the budget was out of reach
            advice = (
                f"No threshold reaches FPR <= {point.get('max_fpr')} with TPR > 0 on {point['negatives']} validation "
                "negatives: validate on more negatives, allow a larger max_fpr, or give an explicit threshold."
            )
        else:
            advice = "Retrain with a validation split holding both classes, or give an explicit threshold."
        raise ValueError(f"{source}: this model has no operating point ({reason}); it cannot take ill / healthy "
                         f"decisions. {advice}")
    return float(threshold)


def _is_state_dict(obj: Mapping[Any, Any]) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def load_model_weights(network: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load the weights of a medgain checkpoint or of a plain state dict into ``network``.

    A state dict saved from a ``DistributedDataParallel`` model (every key prefixed ``module.``) is accepted;
    a wrapped ``network`` is loaded through its ``.module``.

    Args:
        network: the model to fill; its keys and shapes must match the stored ones exactly.
        path: checkpoint file.

    Returns:
        The checkpoint dict (``model``, and for a BestModelSaver file ``operating_point``, ``model_spec``, …).

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when it is not a checkpoint, or its weights do not match ``network``.
    """
    checkpoint = load_checkpoint(path)
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("model"), Mapping):
        checkpoint = dict(checkpoint)
    elif isinstance(checkpoint, Mapping) and _is_state_dict(checkpoint):
        checkpoint = {"model": checkpoint}
    else:
        raise ValueError(f"{path}: neither a BestModelSaver checkpoint (a dict with 'model') nor a state dict")
    state = OrderedDict(checkpoint["model"])
    if all(key.startswith(_DDP_PREFIX) for key in state):
        state = OrderedDict((key[len(_DDP_PREFIX) :], value) for key, value in state.items())
    target = unwrap(network)
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not match {type(target).__name__}: {err}") from err
    return checkpoint


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", **expected: Any) -> nn.Module:
    """The network of a checkpoint, built from its spec and loaded with its weights, in eval mode on ``device``.

    Args:
        path: checkpoint written by :class:`medgain.handlers.BestModelSaver`.
        device: where to put the model.
        expected: spec values the caller was given (see :func:`load_model_spec`).
    """
    network = build_network(load_model_spec(path, **expected))
    load_model_weights(network, path)
    return network.to(device).eval()


def unwrap(network: nn.Module) -> nn.Module:
    """The model inside ``DistributedDataParallel`` / ``DataParallel``, or ``network`` itself."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return network.module if isinstance(network, wrappers) else network


def spec_from_config(
    network: str,
    num_classes: int,
    image_size: int | Sequence[int],
    normalization: Mapping[str, Sequence[float]] | None = None,
    class_names: Sequence[str] = (),
    target_layer: str | None = None,
    in_channels: int = 3,
    architecture: str = "classifier",
    metadata_encoder: Mapping[str, Any] | None = None,
    chip_size: int = 0,
    level: int | None = None,
    glimpse: Mapping[str, Any] | None = None,
    bundle: str = "",
    modality: str = "",
    mpp: float | None = None,
) -> dict[str, Any]:
    """A validated model spec as a plain dict, for a bundle config (``BestModelSaver(model_spec=...)``); see
    :class:`ModelSpec` for the fields."""
    return ModelSpec(
        network=network,
        num_classes=int(num_classes),
        image_size=image_size,  # type: ignore[arg-type]
        in_channels=int(in_channels),
        target_layer=target_layer or "",
        normalization=None if normalization is None else dict(normalization),  # type: ignore[arg-type]
        class_names=list(class_names),
        architecture=architecture,
        metadata_encoder=None if metadata_encoder is None else dict(metadata_encoder),
        chip_size=int(chip_size),
        level=None if level is None else int(level),
        glimpse=None if glimpse is None else dict(glimpse),
        bundle=bundle,
        modality=modality,
        mpp=mpp,
    ).as_dict()

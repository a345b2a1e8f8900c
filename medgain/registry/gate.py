"""``medgain promote``: the promotion gate. A version's review figures are checked against the rules of a gate
file; on pass the registry alias moves to the version, and the decision is recorded as model-version tags.

Gate file (YAML, each key at most once)::

    rules:                              # "<figure> <op> <number>", figures from the version's review.json
      - test_tpr_at_fpr_0.001 >= 0.60
      - test_iou >= 0.30
      - operating_point_fpr_upper <= 0.002
    not_worse_than: champion            # optional: no figure below this alias's by more than its CI

Nothing is promoted without a review of that exact version (the review's checkpoint hash must match the model
file of the version's run), nor when that model file has no finite operating threshold; with ``not_worse_than``
the review must have compared against the version that holds that alias now. ``not_worse_than`` names a known
alias (:data:`KNOWN_ALIASES` or one the registered model holds); when no version holds it yet, the promotion
must say that it makes the first one (``first_champion``).
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from medgain.config_yaml import load_yaml
from medgain.data.phi import pseudonymise_text
from medgain.model_file import load_checkpoint
from medgain.registry.review import (
    REVIEW_ARTIFACTS,
    fetch_checkpoint,
    registry_client,
    resolve_version,
    sha256_file,
)

__all__ = [
    "KNOWN_ALIASES",
    "GateRule",
    "PromotionRefused",
    "check_alias",
    "check_gate",
    "comparison_version",
    "load_gate",
    "load_review",
    "promote",
    "require_threshold",
]

#: aliases a gate may compare against before any version holds them (others must be held by a version)
KNOWN_ALIASES = ("champion", "candidate", "production")
_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq}
_RULE = re.compile(r"^\s*([A-Za-z0-9_.]+)\s*(>=|<=|==|>|<)\s*(\S+)\s*$")
_NUMBER = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")


class PromotionRefused(ValueError):
    """The gate refused the promotion; the message lists the failing rules."""


@dataclass(frozen=True)
class GateRule:
    """``figure op value``, e.g. ``test_iou >= 0.30``."""

    figure: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.figure} {self.op} {self.value:g}"


def load_gate(path: str | os.PathLike) -> tuple[list[GateRule], str | None, str]:
    """The rules, the ``not_worse_than`` alias and the sha256 of a gate file.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: naming the file and the entry for anything malformed: a repeated key, an unknown key, a rule
            that is not ``<figure> <op> <number>`` or whose bound is not a finite number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: gate file not found")
    raw = path.read_bytes()
    content = load_yaml(raw, path)
    if not isinstance(content, dict) or not isinstance(content.get("rules", []), list):
        raise ValueError(f"{path}: expected a mapping with a 'rules' list")
    unknown = set(content) - {"rules", "not_worse_than"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(map(str, unknown))} (allowed: rules, not_worse_than)")
    rules = []
    for index, text in enumerate(content.get("rules") or []):
        match = _RULE.match(text) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"{path}: rule {index} {text!r} is not '<figure> <op> <number>' (op one of {list(_OPS)})")
        bound = match.group(3)
        if not _NUMBER.match(bound):
            raise ValueError(f"{path}: rule {index} {text!r}: the bound {bound!r} is not a number (e.g. 0.6, 1e-3)")
        value = float(bound)
        if not math.isfinite(value):
            raise ValueError(f"{path}: rule {index} {text!r}: the bound must be finite")
        rules.append(GateRule(match.group(1), match.group(2), value))
    against = content.get("not_worse_than")
    if against is not None and not (isinstance(against, str) and against.strip()):
        raise ValueError(f"{path}: not_worse_than must be an alias name, got {against!r}")
    if not rules and against is None:
        raise ValueError(f"{path}: a gate needs at least one rule or not_worse_than")
    return rules, against, hashlib.sha256(raw).hexdigest()


def _reviewed(client: MlflowClient, name: str, version: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The review of exactly this version and the operating point stored in the version's model file."""
    mv = resolve_version(client, name, version)
    folder = REVIEW_ARTIFACTS.format(version=mv.version)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(mv.run_id, f"{folder}/review.json", tmp)
        except (MlflowException, OSError):
            raise PromotionRefused(
                f"{name} version {version} has no review report: run `medgain review --model {name} --version "
                f"{version} ...` first"
            ) from None
        digest = sha256_file(local)
        review = json.loads(Path(local).read_text())
        model_file = fetch_checkpoint(client, mv, tmp)
        checkpoint = sha256_file(model_file)
        stored = load_checkpoint(model_file)
    if mv.tags.get("review.sha256") != digest:
        raise PromotionRefused(f"{name} version {version}: review.json differs from the review recorded on the version")
    if str(review.get("version")) != str(mv.version) or review.get("checkpoint_sha256") != checkpoint:
        raise PromotionRefused(f"{name} version {version}: the review on record is not of this version's model file")
    point = stored.get("operating_point") if isinstance(stored, Mapping) else None
    return review, dict(point) if isinstance(point, Mapping) else {}


def load_review(client: MlflowClient, name: str, version: str) -> dict[str, Any]:
    """The review of exactly this version, checked against the version's model file and tags.

    Raises:
        PromotionRefused: when the version has no review, or the review is not of this version's model file.
    """
    return _reviewed(client, name, version)[0]


def require_threshold(point: Mapping[str, Any], name: str, version: str) -> float:
    """The finite decision threshold of a version's operating point.

    Raises:
        PromotionRefused: naming the version and the reason stored with the operating point when the threshold
            is missing or not finite (such a model takes no ill / healthy decisions and cannot be packaged).
    """
    threshold = point.get("threshold")
    try:
        value = float(threshold) if threshold is not None else math.nan
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        reason = point.get("reason") or "no reason stored"
        raise PromotionRefused(
            f"{name} version {version}: its model file has no finite operating threshold ({reason}); a model that "
            "takes no decisions is not promoted (--override does not apply). Train until validation sets one."
        )
    return value


def comparison_version(
    client: MlflowClient, name: str, version: str, against: str, first_champion: bool, gate: str | os.PathLike
) -> str | None:
    """The version ``not_worse_than: against`` compares with: None when ``version`` itself holds the alias, or
    no version holds it yet and ``first_champion`` says this promotion makes the first one.

    Raises:
        ValueError: when ``against`` is not a known alias (:data:`KNOWN_ALIASES` or one ``name`` holds), when no
            version holds it and ``first_champion`` is not set, or when ``first_champion`` is set but a version
            holds it.
    """
    try:
        held = client.get_registered_model(name).aliases
    except MlflowException as err:
        raise ValueError(f"registered model {name!r} not found ({err.message})") from err
    known = sorted({*KNOWN_ALIASES, *held})
    if against not in known:
        raise ValueError(f"{gate}: not_worse_than: {against!r} is not a known alias (known: {', '.join(known)})")
    holder = held.get(against)
    if holder is None:
        if not first_champion:
            raise ValueError(
                f"{gate}: not_worse_than: no version of {name!r} holds {against!r} yet; if this promotion makes "
                "the first one, say so with --first-champion"
            )
        return None
    if first_champion:
        raise ValueError(f"--first-champion: version {holder} of {name!r} already holds {against!r}")
    return None if str(holder) == str(version) else str(holder)


def check_alias(client: MlflowClient, name: str, alias: str, new_alias: bool) -> None:
    """Check the alias a promotion moves: a known one (:data:`KNOWN_ALIASES` or one a version of ``name`` holds),
    or, with ``new_alias``, one that is not.

    Raises:
        ValueError: for an unknown alias without ``new_alias``, a known one with it, or a model not found.
    """
    try:
        held = client.get_registered_model(name).aliases
    except MlflowException as err:
        raise ValueError(f"registered model {name!r} not found ({err.message})") from err
    known = sorted({*KNOWN_ALIASES, *held})
    if new_alias and alias in known:
        raise ValueError(f"--new-alias: {alias!r} is a known alias of {name!r}; drop --new-alias to move it")
    if not new_alias and alias not in known:
        raise ValueError(
            f"--alias {alias!r} is not a known alias of {name!r} (known: {', '.join(known)}); to create a new "
            "alias, say so with --new-alias"
        )


def check_gate(
    review: Mapping[str, Any], rules: list[GateRule], against_version: str | None, against_alias: str | None
) -> list[dict[str, Any]]:
    """One verdict per rule: ``{"rule", "value", "passed", "why"}``; with ``against_alias``, one per compared
    figure (failing when the whole CI of candidate - champion lies below 0)."""
    verdicts = []
    values = review.get("gate_values", {})
    for rule in rules:
        value = values.get(rule.figure)
        if value is None or not math.isfinite(float(value)):
            verdicts.append({"rule": str(rule), "value": value, "passed": False,
                             "why": f"the review has no finite {rule.figure} (available: {sorted(values)})"})
            continue
        passed = bool(_OPS[rule.op](float(value), rule.value))
        verdicts.append({"rule": str(rule), "value": float(value), "passed": passed, "why": ""})
    if against_alias is not None:
        comparison = review.get("comparison")
        if against_version is None:
            verdicts.append({"rule": f"not worse than {against_alias}", "value": None, "passed": True,
                             "why": f"no other version holds {against_alias!r} (first promotion, or held already)"})
        elif not comparison or str(comparison.get("version")) != str(against_version):
            reviewed = comparison.get("version") if comparison else None
            verdicts.append({"rule": f"not worse than {against_alias}", "value": None, "passed": False,
                             "why": f"the review compared with version {reviewed}, but {against_alias} is version "
                             f"{against_version}: review again with --against {against_alias}"})
        else:
            split = review["split"]
            for figure, diff in comparison["figures"].items():
                high = diff.get("high")
                worse = high is not None and math.isfinite(high) and high < 0
                verdicts.append({"rule": f"{split}_{figure} not below {against_alias} by more than its CI",
                                 "value": diff["value"], "passed": not worse,
                                 "why": f"difference {diff['value']:.4f}, CI [{diff['low']:.4f}, {high:.4f}]"
                                 if worse else ""})
    return verdicts


def promote(
    name: str,
    version: str,
    alias: str,
    gate: str | os.PathLike,
    reviewer: str,
    override: bool = False,
    reason: str | None = None,
    tracking_uri: str | None = None,
    first_champion: bool = False,
    new_alias: bool = False,
) -> dict[str, Any]:
    """Check the gate and move ``alias`` to the version; record the decision as ``promotion.<alias>.*`` tags.

    Args:
        first_champion: this promotion makes the first holder of the gate's ``not_worse_than`` alias (refused
            when a version holds it already).
        new_alias: ``alias`` is a new one, neither in :data:`KNOWN_ALIASES` nor held by a version of ``name``
            (without it such an alias, e.g. the typo ``champoin``, is refused; with it a known alias is refused).

    Returns:
        ``{"decision": "promoted" | "overridden", "verdicts": [...]}``.

    Raises:
        PromotionRefused: when a rule fails and ``override`` is not set (the refusal is recorded too), the
            version has no review of its own model file, or its model file has no finite operating threshold.
        ValueError: for a malformed gate file, an unknown ``not_worse_than`` alias, an unknown ``alias`` without
            ``new_alias`` (or a known one with it), a first promotion not said (or said wrongly), an override
            without a reason, or an empty reviewer.
    """
    if not reviewer.strip():
        raise ValueError("promote: --reviewer must name who decides")
    if override and not (reason and reason.strip()):
        raise ValueError("promote: --override needs --reason")
    client = registry_client(tracking_uri)
    rules, against_alias, gate_hash = load_gate(gate)
    resolve_version(client, name, version)
    check_alias(client, name, alias, new_alias)
    against_version = None
    if against_alias is not None:
        against_version = comparison_version(client, name, version, against_alias, first_champion, gate)
    elif first_champion:
        raise ValueError(f"--first-champion: {gate} has no not_worse_than alias to make the first holder of")
    review, point = _reviewed(client, name, version)
    require_threshold(point, name, version)
    verdicts = check_gate(review, rules, against_version, against_alias)
    failing = [v for v in verdicts if not v["passed"]]
    decision = "promoted" if not failing else ("overridden" if override else "refused")
    tags = {
        "reviewer": reviewer,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "gate_sha256": gate_hash,
        "decision": decision,
        "review_sha256": resolve_version(client, name, version).tags.get("review.sha256", ""),
    }
    if decision == "overridden":
        tags["override_reason"] = str(reason)
    if first_champion:
        tags["first_holder_of"] = str(against_alias)
    if new_alias:
        tags["new_alias"] = "true"
    for index, verdict in enumerate(verdicts):
        value = "n/a" if verdict["value"] is None else f"{float(verdict['value']):.6g}"
        outcome = "pass" if verdict["passed"] else "FAIL"
        tags[f"rule.{index}"] = f"{verdict['rule']}: {value} -> {outcome}" + (f" ({verdict['why']})" if verdict["why"] else "")
    for key, value in tags.items():  # free text (reviewer, reason) leaves with paths and names pseudonymised
        client.set_model_version_tag(name, version, f"promotion.{alias}.{key}", pseudonymise_text(str(value))[:5000])
    if decision == "refused":
        lines = "\n".join(f"  {v['rule']}: {v['value']} ({v['why'] or 'failed'})" for v in failing)
        raise PromotionRefused(f"{name} version {version} not promoted to {alias!r}; failing rules:\n{lines}")
    client.set_registered_model_alias(name, alias, str(version))
    return {"decision": decision, "verdicts": verdicts}

"""``medgain promote``: the promotion gate. A version's review figures are checked against the rules of a gate
file; on pass the registry alias moves to the version, and the decision is recorded as model-version tags.

Gate file (YAML)::

    rules:                              # "<figure> <op> <number>", figures from the version's review.json
      - test_tpr_at_fpr_0.001 >= 0.60
      - test_iou >= 0.30
    not_worse_than: champion            # optional: no figure below this alias's by more than its CI

Nothing is promoted without a review of that exact version (the review's checkpoint hash must match the model
file of the version's run); with ``not_worse_than`` the review must have compared against the version that
holds that alias now.
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

import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from medgain.registry.review import (
    REVIEW_ARTIFACTS,
    fetch_checkpoint,
    registry_client,
    resolve_version,
    sha256_file,
)

__all__ = ["GateRule", "PromotionRefused", "check_gate", "load_gate", "load_review", "promote"]

_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq}
_RULE = re.compile(r"^\s*([A-Za-z0-9_.]+)\s*(>=|<=|==|>|<)\s*([-+0-9.eE]+)\s*$")


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
        ValueError: naming the file and the entry for anything malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: gate file not found")
    raw = path.read_bytes()
    try:
        content = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(content, dict) or not isinstance(content.get("rules", []), list):
        raise ValueError(f"{path}: expected a mapping with a 'rules' list")
    unknown = set(content) - {"rules", "not_worse_than"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)} (allowed: rules, not_worse_than)")
    rules = []
    for index, text in enumerate(content.get("rules") or []):
        match = _RULE.match(str(text))
        if match is None:
            raise ValueError(f"{path}: rule {index} {text!r} is not '<figure> <op> <number>' (op one of {list(_OPS)})")
        value = float(match.group(3))
        if not math.isfinite(value):
            raise ValueError(f"{path}: rule {index} {text!r}: the bound must be finite")
        rules.append(GateRule(match.group(1), match.group(2), value))
    against = content.get("not_worse_than")
    if against is not None and not isinstance(against, str):
        raise ValueError(f"{path}: not_worse_than must be an alias name, got {against!r}")
    if not rules and against is None:
        raise ValueError(f"{path}: a gate needs at least one rule or not_worse_than")
    return rules, against, hashlib.sha256(raw).hexdigest()


def load_review(client: MlflowClient, name: str, version: str) -> dict[str, Any]:
    """The review of exactly this version, checked against the version's model file and tags.

    Raises:
        PromotionRefused: when the version has no review, or the review is not of this version's model file.
    """
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
        checkpoint = sha256_file(fetch_checkpoint(client, mv, tmp))
    if mv.tags.get("review.sha256") != digest:
        raise PromotionRefused(f"{name} version {version}: review.json differs from the review recorded on the version")
    if str(review.get("version")) != str(mv.version) or review.get("checkpoint_sha256") != checkpoint:
        raise PromotionRefused(f"{name} version {version}: the review on record is not of this version's model file")
    return review


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
                             "why": f"no version holds {against_alias!r} yet"})
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
) -> dict[str, Any]:
    """Check the gate and move ``alias`` to the version; record the decision as ``promotion.<alias>.*`` tags.

    Returns:
        ``{"decision": "promoted" | "overridden", "verdicts": [...]}``.

    Raises:
        PromotionRefused: when a rule fails and ``override`` is not set (the refusal is recorded too), or the
            version has no review of its own model file.
        ValueError: for an override without a reason, or an empty reviewer.
    """
    if not reviewer.strip():
        raise ValueError("promote: --reviewer must name who decides")
    if override and not (reason and reason.strip()):
        raise ValueError("promote: --override needs --reason")
    client = registry_client(tracking_uri)
    rules, against_alias, gate_hash = load_gate(gate)
    review = load_review(client, name, version)
    against_version = None
    if against_alias is not None:
        try:
            holder = resolve_version(client, name, alias=against_alias)
            against_version = None if str(holder.version) == str(version) else str(holder.version)
        except ValueError:
            against_version = None
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
    for index, verdict in enumerate(verdicts):
        value = "n/a" if verdict["value"] is None else f"{float(verdict['value']):.6g}"
        outcome = "pass" if verdict["passed"] else "FAIL"
        tags[f"rule.{index}"] = f"{verdict['rule']}: {value} -> {outcome}" + (f" ({verdict['why']})" if verdict["why"] else "")
    for key, value in tags.items():
        client.set_model_version_tag(name, version, f"promotion.{alias}.{key}", str(value)[:5000])
    if decision == "refused":
        lines = "\n".join(f"  {v['rule']}: {v['value']} ({v['why'] or 'failed'})" for v in failing)
        raise PromotionRefused(f"{name} version {version} not promoted to {alias!r}; failing rules:\n{lines}")
    client.set_registered_model_alias(name, alias, str(version))
    return {"decision": decision, "verdicts": verdicts}

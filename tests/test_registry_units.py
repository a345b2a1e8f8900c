"""Registry building blocks without a model: review figures against scikit-learn, the gate file and its
verdicts, pseudonyms, the PHI scanner and package verification of a hand-made package folder."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medgain.data.phi import frame_ref, study_ref
from medgain.registry import (
    PackageVerificationError,
    RecordArrays,
    bootstrap_figures,
    check_gate,
    compare_figures,
    load_gate,
    operating_table,
    point_figures,
    scan_for_identifiers,
    verify_package,
)


def _records(seed: int, n: int = 120, shift: float = 1.5) -> list[dict]:
    rng = np.random.default_rng(seed)
    label = (rng.random(n) < 0.3).astype(int)
    score = rng.normal(size=n) + shift * label
    return [{"ref": f"f{i}", "label": int(y), "score": float(s), "iou": 0.5 if y else None,
             "attention_in_mask": 0.25 if y else None, "group": f"s{i // 4}"} for i, (y, s) in enumerate(zip(label, score))]


def test_figures_match_scikit_learn_and_intervals_cover_the_value() -> None:
    rows = _records(0)
    a = RecordArrays(rows)
    figures = point_figures(a, threshold=0.5)
    y, s = a.label, a.score
    assert figures["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert figures["sensitivity"] == pytest.approx(((s >= 0.5) & (y == 1)).sum() / (y == 1).sum())
    assert figures["iou"] == 0.5 and figures["attention_in_mask"] == 0.25
    neg = np.sort(s[y == 0])[::-1]
    assert figures["tpr_at_fpr_0.001"] == pytest.approx((s[y == 1] > neg[0]).mean())  # no false alarm allowed
    ci = bootstrap_figures(a, 0.5, n_bootstrap=200, seed=1)
    for name, f in ci.items():
        assert f["low"] <= f["value"] <= f["high"], name
    assert ci["auc"]["high"] - ci["auc"]["low"] > 0.01
    assert ci == bootstrap_figures(a, 0.5, n_bootstrap=200, seed=1)  # deterministic given the seed


def test_paired_comparison_and_operating_table() -> None:
    good, bad = _records(0, shift=3.0), _records(0, shift=0.0)
    diff = compare_figures(RecordArrays(good), RecordArrays(bad[::-1]), (0.5, 0.5), n_bootstrap=200)
    assert diff["auc"]["value"] > 0 and diff["auc"]["low"] > 0  # clearly better, on the same (reordered) frames
    with pytest.raises(ValueError, match="same frames"):
        compare_figures(RecordArrays(good), RecordArrays(bad[:-1]), (0.5, 0.5))
    table = operating_table(RecordArrays(good), 0.5, frames_per_study=3.0)
    assert table[-1]["budget"].startswith("stored") and table[-1]["threshold"] == 0.5
    assert all(r["false_alarms_per_study"] == pytest.approx(3.0 * (1 - r["specificity"])) for r in table)
    assert "needs >= 2000 negatives" in table[0]["note"]


def test_gate_file_and_verdicts(tmp_path: Path) -> None:
    gate = tmp_path / "gate.yaml"
    gate.write_text("rules:\n  - test_tpr_at_fpr_0.001 >= 0.60\n  - test_iou >= 0.30\nnot_worse_than: champion\n")
    rules, alias, digest = load_gate(gate)
    assert [str(r) for r in rules] == ["test_tpr_at_fpr_0.001 >= 0.6", "test_iou >= 0.3"] and alias == "champion"
    assert digest == hashlib.sha256(gate.read_bytes()).hexdigest()
    review = {"split": "test", "gate_values": {"test_tpr_at_fpr_0.001": 0.7, "test_iou": math.nan},
              "comparison": {"version": "3", "figures": {"auc": {"value": -0.1, "low": -0.2, "high": -0.05}}}}
    verdicts = check_gate(review, rules, "3", "champion")
    assert [v["passed"] for v in verdicts] == [True, False, False]
    assert "no finite test_iou" in verdicts[1]["why"] and "CI [-0.2000, -0.0500]" in verdicts[2]["why"]
    stale = check_gate(review, rules, "4", "champion")[2]
    assert not stale["passed"] and "review again" in stale["why"]
    for bad, message in [("rules: [test_auc >> 1]\n", "is not"), ("rules: []\n", "at least one"),
                         ("rules: [test_auc >= 1]\nextra: 1\n", "unknown keys")]:
        gate.write_text(bad)
        with pytest.raises(ValueError, match=message):
            load_gate(gate)


def test_pseudonyms_depend_on_the_salt_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEDGAIN_PHI_SALT", "a")
    first = frame_ref("/data/DOE_JOHN/x.dcm", 2)
    assert first == frame_ref("/data/DOE_JOHN/../DOE_JOHN/x.dcm", 2) and first != frame_ref("/data/DOE_JOHN/x.dcm", 1)
    assert "DOE" not in first and study_ref("MRN1").startswith("s-")
    monkeypatch.setenv("MEDGAIN_PHI_SALT", "b")
    assert frame_ref("/data/DOE_JOHN/x.dcm", 2) != first
    monkeypatch.delenv("MEDGAIN_PHI_SALT")
    monkeypatch.setenv("MEDGAIN_PHI_SALT_FILE", str(tmp_path / "salt"))
    created = frame_ref("/data/x.dcm")
    assert (tmp_path / "salt").stat().st_mode & 0o777 == 0o600 and frame_ref("/data/x.dcm") == created


def test_scanner_and_folder_verification(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    for name in ("configs/inference.yaml", "configs/metadata.json", "models/model.pt", "configs/a.yaml"):
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text("x: 1\n")
    (package / "notes.txt").write_text("patient Quirksby in utf-16".encode("utf-16-le").decode("latin-1"))
    files = {p.relative_to(package).as_posix(): {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                                                  "size": p.stat().st_size} for p in package.rglob("*") if p.is_file()}
    manifest = {"format": "medgain-partner-package/2", "files": files, "model": "m", "version": "1"}
    (package / "manifest.json").write_text(json.dumps(manifest))
    assert verify_package(package, allow_unsigned=True)["model"] == "m"
    assert scan_for_identifiers([package], {"QUIRKSBY", "absent"}) == [(str(package / "notes.txt"), "QUIRKSBY")]
    (package / "outputs.csv").write_text("written beside the package\n")  # a folder holds the package only
    with pytest.raises(PackageVerificationError, match="outputs.csv is not listed in the manifest"):
        verify_package(package, allow_unsigned=True)
    (package / "outputs.csv").unlink()
    (package / "configs" / "a.yaml").write_text("x: 2\n")
    with pytest.raises(PackageVerificationError, match="configs/a.yaml differs"):
        verify_package(package, allow_unsigned=True)
    (package / "configs" / "a.yaml").unlink()
    with pytest.raises(PackageVerificationError, match="configs/a.yaml is missing"):
        verify_package(package, allow_unsigned=True)
    (package / "configs" / "a.yaml").write_text("x: 1\n")
    with pytest.raises(ValueError, match="a signature is required"):
        verify_package(package)

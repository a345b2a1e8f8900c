"""The promotion gate cannot be weakened by a typo: repeated keys, unknown aliases, malformed bounds and models
without an operating threshold are refused, and a refusal exits with its own code. Versions here are registry
records over a small model file and a review.json, in a throw-away SQLite store (no training)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import mlflow
import pytest

from medgain.cli import main
from medgain.config_yaml import load_yaml, load_yaml_file
from medgain.model_file import save_checkpoint
from medgain.registry import PromotionRefused, check_gate, load_gate, promote, sha256_file

NAME = "gate_test_model"
STRICT = "rules:\n  - test_auc >= 0.95\n"


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """An empty registered model in a SQLite store under ``tmp_path``."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    client.create_experiment("gate", artifact_location=(tmp_path / "artifacts").as_uri())
    client.create_registered_model(NAME)
    return {"uri": uri, "client": client, "root": tmp_path}


def _version(store: dict[str, Any], auc: float, threshold: float | None, reason: str = "") -> str:
    """A registered version whose run holds ``checkpoint/model.pt`` (with this operating point) and its review."""
    client, root = store["client"], store["root"]
    run = client.create_run(client.get_experiment_by_name("gate").experiment_id)
    work = root / run.info.run_id
    work.mkdir()
    model = work / "model.pt"
    point: dict[str, Any] = {"threshold": threshold, "max_fpr": 0.001}
    if reason:
        point["reason"] = reason
    save_checkpoint(model, {"operating_point": point})
    client.log_artifact(run.info.run_id, str(model), "checkpoint")
    mv = client.create_model_version(NAME, f"{run.info.artifact_uri}/checkpoint", run_id=run.info.run_id)
    review = work / "review.json"
    review.write_text(json.dumps({
        "version": mv.version, "checkpoint_sha256": sha256_file(model), "split": "test",
        "gate_values": {"test_auc": auc, "operating_point_fpr_upper": 0.0015},
    }))
    client.log_artifact(run.info.run_id, str(review), f"review/v{mv.version}")
    client.set_model_version_tag(NAME, mv.version, "review.sha256", sha256_file(review))
    return str(mv.version)


def _gate(store: dict[str, Any], text: str) -> Path:
    path = store["root"] / "gate.yaml"
    path.write_text(text)
    return path


def test_yaml_loader_refuses_repeated_keys(tmp_path: Path) -> None:
    assert load_yaml("a: 1\nb: {c: [1, 2]}\n", "x.yaml") == {"a": 1, "b": {"c": [1, 2]}}
    merged = load_yaml("base: &b {x: 1, y: 2}\nd:\n  <<: *b\n  x: 3\n", "x.yaml")  # a merge key may be overridden
    assert merged["d"] == {"x": 3, "y": 2}
    with pytest.raises(ValueError, match=r"^x.yaml: duplicate key 'c' at line 3 \(first at line 2\)"):
        load_yaml("a:\n  c: 1\n  c: 2\n", "x.yaml")
    with pytest.raises(ValueError, match=r"^x.yaml: not valid YAML \(.*\)$"):
        load_yaml("a: [1\n", "x.yaml")
    with pytest.raises(FileNotFoundError, match="missing.yaml: file not found"):
        load_yaml_file(tmp_path / "missing.yaml")


def test_gate_file_errors_name_the_file_and_the_entry(tmp_path: Path) -> None:
    gate = tmp_path / "gate.yaml"
    # the attack: the strict rules, then `rules:` again with a rule everything passes ("last wins" before)
    gate.write_text(STRICT + "rules: [test_auc >= 0.0]\n")
    with pytest.raises(ValueError, match=rf"^{gate}: duplicate key 'rules' at line 3 \(first at line 1\)"):
        load_gate(gate)
    for text, message in [
        ("rules: [test_auc >= 1e]\n", r"rule 0 'test_auc >= 1e': the bound '1e' is not a number"),
        ("rules: [test_auc >= 0.9, test_iou >= .3.]\n", r"rule 1 'test_iou >= .3.': the bound '.3.' is not"),
        ("rules: [test_auc >= inf]\n", r"rule 0 'test_auc >= inf': the bound 'inf' is not a number"),
        ("rules: [test_auc >= 1e999]\n", r"rule 0 'test_auc >= 1e999': the bound must be finite"),
        ("rules: [{test_auc: 1}]\n", r"rule 0 \{'test_auc': 1\} is not '<figure> <op> <number>'"),
        ("rules: [test_auc >= 1]\nnot_worse_than: 3\n", "not_worse_than must be an alias name"),
    ]:
        gate.write_text(text)
        with pytest.raises(ValueError, match=rf"^{gate}: {message}"):
            load_gate(gate)
    gate.write_text("rules: [test_auc >= 1e-3, operating_point_fpr_upper <= 2E-3, test_iou > -.5]\n")
    rules, against, _ = load_gate(gate)
    assert [(r.figure, r.op, r.value) for r in rules] == [
        ("test_auc", ">=", 1e-3), ("operating_point_fpr_upper", "<=", 2e-3), ("test_iou", ">", -0.5)
    ] and against is None
    # the upper confidence bound of the false-positive rate is gated from above
    passed = check_gate({"gate_values": {"operating_point_fpr_upper": 0.0015}}, rules[1:2], None, None)
    failed = check_gate({"gate_values": {"operating_point_fpr_upper": 0.0031}}, rules[1:2], None, None)
    assert passed[0]["passed"] and not failed[0]["passed"]


def test_not_worse_than_needs_a_known_alias_and_an_explicit_first_champion(store: dict[str, Any]) -> None:
    uri, client = store["uri"], store["client"]
    first = _version(store, 0.97, 0.4)
    typo = _gate(store, STRICT + "not_worse_than: champoin\n")
    with pytest.raises(ValueError, match=r"not_worse_than: 'champoin' is not a known alias \(known: candidate, "
                                         r"champion, production\)"):
        promote(NAME, first, "champion", typo, "dr-a", tracking_uri=uri)
    gate = _gate(store, STRICT + "not_worse_than: champion\n")
    with pytest.raises(ValueError, match="no version of 'gate_test_model' holds 'champion' yet.*--first-champion"):
        promote(NAME, first, "champion", gate, "dr-a", tracking_uri=uri)
    assert "champion" not in client.get_registered_model(NAME).aliases
    result = promote(NAME, first, "champion", gate, "dr-a", tracking_uri=uri, first_champion=True)
    assert result["decision"] == "promoted"
    assert client.get_model_version(NAME, first).tags["promotion.champion.first_holder_of"] == "champion"
    second = _version(store, 0.98, 0.5)
    with pytest.raises(ValueError, match=f"--first-champion: version {first} of .* already holds 'champion'"):
        promote(NAME, second, "champion", gate, "dr-a", tracking_uri=uri, first_champion=True)
    # an alias the registry holds is known too; the review must have compared against its holder
    client.set_registered_model_alias(NAME, "pilot_site", first)
    pilot = _gate(store, STRICT + "not_worse_than: pilot_site\n")
    with pytest.raises(PromotionRefused, match="review again with --against pilot_site"):
        promote(NAME, second, "champion", pilot, "dr-a", tracking_uri=uri)


def test_a_version_without_an_operating_threshold_is_refused(store: dict[str, Any]) -> None:
    uri, client = store["uri"], store["client"]
    version = _version(store, 0.99, None, reason="no threshold reaches TPR > 0 at FPR <= 0.001 on 40 negatives")
    gate = _gate(store, STRICT)
    message = (rf"{NAME} version {version}: its model file has no finite operating threshold \(no threshold reaches "
               r"TPR > 0 at FPR <= 0.001 on 40 negatives\)")
    with pytest.raises(PromotionRefused, match=message):
        promote(NAME, version, "champion", gate, "dr-a", tracking_uri=uri)
    with pytest.raises(PromotionRefused, match=message):
        promote(NAME, version, "champion", gate, "dr-a", override=True, reason="pilot", tracking_uri=uri)
    nan = _version(store, 0.99, math.nan)
    with pytest.raises(PromotionRefused, match=rf"version {nan}: .* \(no reason stored\)"):
        promote(NAME, nan, "champion", gate, "dr-a", tracking_uri=uri)
    assert client.get_registered_model(NAME).aliases == {}


def test_exit_codes_tell_refused_from_called_wrongly(store: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    uri = store["uri"]
    weak = _version(store, 0.80, 0.4)
    args = ["promote", "--model", NAME, "--version", weak, "--reviewer", "dr-a", "--tracking-uri", uri, "--gate"]
    assert main([*args, str(_gate(store, STRICT))]) == 3
    assert "refused" in capsys.readouterr().err
    assert main([*args, str(_gate(store, STRICT + "rules: [test_auc >= 0.0]\n"))]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "duplicate key 'rules'" in err and "gate.yaml" in err
    assert main([*args, str(_gate(store, "rules: [test_auc >= 1e]\n"))]) == 2
    assert "'1e' is not a number" in capsys.readouterr().err
    assert main([*args, str(store["root"] / "missing.yaml")]) == 2
    assert store["client"].get_registered_model(NAME).aliases == {}
    assert main([*args, str(_gate(store, "rules: [test_auc >= 0.7]\n"))]) == 0
    assert str(store["client"].get_registered_model(NAME).aliases["champion"]) == weak
    with pytest.raises(SystemExit) as usage:
        main(["promote", "--model", NAME])
    assert usage.value.code == 2
    main_help = capsys.readouterr()
    assert "required" in main_help.err
    with pytest.raises(SystemExit):
        main(["promote", "--help"])
    assert "3  refused" in capsys.readouterr().out


def test_a_misspelt_alias_is_refused_unless_said_new(store: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    uri, client = store["uri"], store["client"]
    version = _version(store, 0.97, 0.4)
    gate = _gate(store, STRICT)
    with pytest.raises(ValueError, match=r"--alias 'champoin' is not a known alias of 'gate_test_model' \(known: "
                                         r"candidate, champion, production\); .* --new-alias"):
        promote(NAME, version, "champoin", gate, "dr-a", tracking_uri=uri)
    args = ["promote", "--model", NAME, "--version", version, "--reviewer", "dr-a", "--tracking-uri", uri,
            "--gate", str(gate), "--alias"]
    assert main([*args, "champoin"]) == 2
    assert "--alias 'champoin' is not a known alias" in capsys.readouterr().err
    assert client.get_registered_model(NAME).aliases == {}
    assert not any(k.startswith("promotion.") for k in client.get_model_version(NAME, version).tags)  # nothing half-done
    with pytest.raises(ValueError, match="--new-alias: 'champion' is a known alias"):
        promote(NAME, version, "champion", gate, "dr-a", tracking_uri=uri, new_alias=True)
    assert main([*args, "pilot_site", "--new-alias"]) == 0
    aliases = client.get_registered_model(NAME).aliases
    assert {k: str(v) for k, v in aliases.items()} == {"pilot_site": version}
    assert client.get_model_version(NAME, version).tags["promotion.pilot_site.new_alias"] == "true"
    assert promote(NAME, version, "pilot_site", gate, "dr-a", tracking_uri=uri)["decision"] == "promoted"  # held now

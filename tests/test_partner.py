"""The partner's path, ``medgain infer``, against the attacks of issue 19 §1: a package cannot switch its own
verification off. One tiny capsule model is trained, reviewed and packaged (unpromoted, then as champion); each
attack is one test; ``medgain infer`` end to end gives the in-repo inference's predictions; the registered MLflow
model loads without unpickling code; ``--pseudonymise-outputs`` writes a shareable copy naming no file."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import shutil
import time
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
import yaml
from monai.bundle import run as monai_run
from registry_helpers import CONFIGS, PATIENT_FOLDER, make_keys, make_store, phi_dataset, registry_env, train

from medgain.cli import main
from medgain.data.phi import frame_ref
from medgain.partner import UNSIGNED_NOTICE, run_partner_inference
from medgain.registry import (
    PackageVerificationError,
    build_package,
    promote,
    review_model,
    scan_for_identifiers,
    verify_package,
)
from medgain.registry.verify import parse_manifest

NAME = "capsule_endoscopy_gain"
MODEL = "models/model.pt"


@pytest.fixture(scope="module")
def partner(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One trained and reviewed version, packaged unpromoted (unsigned), then promoted and packaged signed; a few
    test frames whose names carry a planted patient folder name."""
    with registry_env("partner-test-salt"):
        root = tmp_path_factory.mktemp("partner")
        datalist = phi_dataset(root / "data")
        uri = f"sqlite:///{root / 'mlflow.db'}"
        make_store(uri, root / "artifacts")
        train(root / "run", datalist, uri, seed=0)
        review_model(NAME, "1", datalist, root / "review", tracking_uri=uri, n_bootstrap=20, gallery_size=0)
        private, public = make_keys(root, "signer")
        state: dict[str, Any] = {"root": root, "uri": uri, "private": private, "public": public}
        with pytest.raises(ValueError, match="version 1 holds no promoted alias .* give --unpromoted"):
            build_package(f"{NAME}@1", root / "refused.zip", tracking_uri=uri, include_wheel=False)
        state["unsigned"] = root / "unpromoted_unsigned.zip"
        state["unpromoted"] = build_package(f"{NAME}@1", state["unsigned"], tracking_uri=uri, include_wheel=False,
                                            unpromoted=True)
        gate = root / "gate.yaml"
        gate.write_text(yaml.safe_dump({"rules": ["test_auc >= 0.0"]}))
        promote(NAME, "1", "champion", gate, "dr-a", tracking_uri=uri)
        state["zip"] = root / "partner_bundle.zip"
        state["manifest"] = build_package(f"{NAME}@champion", state["zip"], tracking_uri=uri, sign_key=private,
                                          include_wheel=False)
        state["frames"] = root / "frames"
        state["frames"].mkdir()
        for i, item in enumerate(json.loads(datalist.read_text())["test"][:3]):
            shutil.copy(datalist.parent / item["image"], state["frames"] / f"{PATIENT_FOLDER}_{i}.dcm")
        yield state


def _infer(package: Path, out: Path, partner: Any, *extra: str, key: bool = True) -> int:
    signer = ["--public-key", str(partner["public"])] if key else ["--allow-unsigned"]
    return main(["infer", str(package), *signer, "--input", str(partner["frames"]), "--output", str(out),
                 "--num-workers", "0", *extra])


def _members(package: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(package) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def _write_zip(path: Path, entries: list[tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return path


def _refused(capsys: pytest.CaptureFixture[str], out: Path, *needles: str) -> None:
    """The last command said why it refused (naming ``needles``) and wrote no output folder."""
    err = capsys.readouterr().err
    assert "REFUSED" in err and all(n in err for n in needles), err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.partial-*"))


def test_unpromoted_version_needs_the_flag_and_says_so(partner: Any) -> None:
    assert partner["unpromoted"]["promoted"] is False and partner["manifest"]["promoted"] is True
    card = _members(partner["unsigned"])["docs/model_card.md"].decode()
    assert "**promotion**: NOT PROMOTED" in card and "--unpromoted" in card
    assert "**promotion**: champion" in _members(partner["zip"])["docs/model_card.md"].decode()
    assert "Not promoted" in _members(partner["unsigned"])["docs/README.md"].decode()
    with pytest.raises(ValueError, match="holds 'champion': it is promoted; drop --unpromoted"):
        build_package(f"{NAME}@1", partner["root"] / "x.zip", tracking_uri=partner["uri"], include_wheel=False,
                      unpromoted=True)


def test_package_records_sizes_ships_the_licence_and_no_verification_step(partner: Any) -> None:
    members = _members(partner["zip"])
    files = partner["manifest"]["files"]
    assert set(members) - {"manifest.json", "manifest.sig"} == set(files) and "LICENSE" in files
    assert members["LICENSE"] == (Path(__file__).parents[1] / "LICENSE").read_bytes()
    assert all(entry["size"] == len(members[name]) for name, entry in files.items())
    config = yaml.safe_load(members["configs/inference.yaml"])
    assert "verify" not in config and "public_key" not in config and config["inference"] == "@run"
    readme = members["docs/README.md"].decode()
    assert "medgain infer partner_bundle.zip --public-key" in readme and "checks nothing" in readme


def test_registered_model_loads_without_unpickling(partner: Any, tmp_path: Path) -> None:
    client = mlflow.MlflowClient(partner["uri"])
    version = client.get_model_version(NAME, "1")
    local = Path(client.download_artifacts(version.run_id, "model", str(tmp_path)))
    assert (local / "data" / "model.pt2").is_file() and not list(local.rglob("*.pth")) + list(local.rglob("*.pkl"))
    loaded = mlflow.pytorch.load_model(str(local))
    assert loaded(torch.rand(3, 3, 32, 32)).shape == (3, 2)


def test_infer_end_to_end_matches_the_in_repo_inference(partner: Any, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert _infer(partner["zip"], out, partner) == 0
    assert "verified (signature and hashes)" in capsys.readouterr().out
    client = mlflow.MlflowClient(partner["uri"])
    champion = client.get_model_version_by_alias(NAME, "champion")
    checkpoint = client.download_artifacts(champion.run_id, "checkpoint/model.pt", str(tmp_path / "ckpt"))
    monai_run("inference", meta_file=str(CONFIGS / "metadata.json"), config_file=str(CONFIGS / "inference.yaml"),
              bundle_root=str(tmp_path / "own"), input_dir=str(partner["frames"]), output_dir=str(tmp_path / "own_out"),
              checkpoint=checkpoint, num_workers=0)
    with open(out / "predictions.csv") as f:
        packaged = list(csv.DictReader(f))
    with open(tmp_path / "own_out" / "predictions.csv") as f:
        assert len(packaged) == 3 and packaged == list(csv.DictReader(f))
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == sorted(
        p.name for p in (tmp_path / "own_out" / "heatmaps").iterdir())
    assert not (out / UNSIGNED_NOTICE).exists() and not (out / "shareable").exists()
    # the unpacked folder (nothing else in it) runs the same way
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(partner["zip"]).extractall(unpacked)
    assert _infer(unpacked, tmp_path / "out2", partner) == 0
    assert (tmp_path / "out2" / "predictions.csv").read_text() == (out / "predictions.csv").read_text()


def test_pseudonymised_outputs_name_no_file(partner: Any, tmp_path: Path) -> None:
    with registry_env("partner-test-salt"):
        frames, out = tmp_path / "frames", tmp_path / "out"
        shutil.copytree(partner["frames"], frames)
        broken = frames / f"{PATIENT_FOLDER}_broken.dcm"
        broken.write_bytes(b"not a dicom file")
        result = run_partner_inference(partner["zip"], frames, out, public_key=partner["public"],
                                       pseudonymise_outputs=True, num_workers=0)
        assert result["shareable"] == out / "shareable"
        with open(out / "shareable" / "predictions.csv") as f:
            shared = list(csv.DictReader(f))
        with open(out / "predictions.csv") as f:
            local = list(csv.DictReader(f))
        assert [r["ref"] for r in shared] == [frame_ref(r["file"], int(r["frame"])) for r in local]
        assert [{k: v for k, v in r.items() if k != "ref"} for r in shared] == [
            {k: v for k, v in r.items() if k != "file"} for r in local]
        heatmaps = sorted(p.name for p in (out / "shareable" / "heatmaps").iterdir())
        assert heatmaps == sorted(f"{r['ref']}{s}" for r in shared for s in (".png", ".nii.gz"))
        with open(out / "pseudonym_map.csv") as f:
            mapping = {r["ref"]: r["file"] for r in csv.DictReader(f)}
        assert all(mapping[r["ref"]] == row["file"] for r, row in zip(shared, local))
        with open(out / "shareable" / "errors.csv") as f:
            (error,) = list(csv.DictReader(f))
        assert mapping[error["ref"]] == str(broken) and error["ref"] == frame_ref(broken)
        # the local outputs name the patient's files; the shareable copy does not
        assert scan_for_identifiers([out / "pseudonym_map.csv"], {PATIENT_FOLDER})
        assert scan_for_identifiers([out / "shareable"], {PATIENT_FOLDER}) == []


def test_edited_inference_config_in_an_unzipped_package_never_runs(partner: Any, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    unpacked, marker = tmp_path / "unpacked", tmp_path / "payload_ran"
    zipfile.ZipFile(partner["zip"]).extractall(unpacked)
    config = unpacked / "configs" / "inference.yaml"
    edited = yaml.safe_load(config.read_text())
    edited["initialize"] = [f"$open({str(marker)!r}, 'w').write('pwned')"] + edited["initialize"]
    size, text = config.stat().st_size, yaml.safe_dump(edited)
    config.write_text(text + "#" * (size - len(text)))  # the listed size: only the hash tells them apart
    out = tmp_path / "out"
    assert _infer(unpacked, out, partner) == 1
    _refused(capsys, out, "configs/inference.yaml", "differs from the manifest")
    assert not marker.exists()


def test_an_unlisted_yaml_py_at_the_root_is_refused(partner: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def read_inputs(*args: Any) -> None:
        raise AssertionError("the bundle ran and read the inputs")

    monkeypatch.setattr("medgain.partner._run_bundle", read_inputs)  # the only step that reads an input
    unpacked, marker = tmp_path / "unpacked", tmp_path / "payload_ran"
    zipfile.ZipFile(partner["zip"]).extractall(unpacked)
    (unpacked / "yaml.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    out = tmp_path / "out"
    assert _infer(unpacked, out, partner) == 1
    _refused(capsys, out, "yaml.py is not listed in the manifest")
    assert main(["verify", str(unpacked), "--public-key", str(partner["public"])]) == 1
    assert not marker.exists()
    (unpacked / "yaml.py").unlink()  # a link in the folder is refused too
    (unpacked / "docs" / "README.md").unlink()
    (unpacked / "docs" / "README.md").symlink_to(tmp_path / "elsewhere.md")
    with pytest.raises(PackageVerificationError, match="docs/README.md is a link"):
        verify_package(unpacked, partner["public"])


def test_a_rehashed_package_without_its_signature_is_refused(partner: Any, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    members = _members(partner["zip"])
    del members["manifest.sig"]
    model = torch.load(io.BytesIO(members[MODEL]), weights_only=True)
    model["model"] = {k: torch.zeros_like(v) for k, v in model["model"].items()}
    buffer = io.BytesIO()
    torch.save(model, buffer)
    members[MODEL] = buffer.getvalue()
    manifest = json.loads(members["manifest.json"])
    manifest["files"][MODEL] = {"sha256": hashlib.sha256(members[MODEL]).hexdigest(), "size": len(members[MODEL])}
    members["manifest.json"] = json.dumps(manifest).encode()
    rehashed = _write_zip(tmp_path / "rehashed.zip", sorted(members.items()))
    out = tmp_path / "out"
    assert _infer(rehashed, out, partner) == 1
    _refused(capsys, out, "manifest.sig is missing")
    with pytest.raises(SystemExit):  # no key and no --allow-unsigned: a usage error
        main(["verify", str(rehashed)])
    with pytest.raises(ValueError, match="a signature is required"):
        verify_package(rehashed)


def test_an_empty_manifest_is_refused(partner: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    members = _members(partner["zip"])
    members["manifest.json"] = b'{"files": {}}'
    emptied = _write_zip(tmp_path / "emptied.zip", sorted(members.items()))
    assert _infer(emptied, tmp_path / "out", partner) == 1
    _refused(capsys, tmp_path / "out", "manifest.sig does not verify manifest.json")
    with pytest.raises(PackageVerificationError, match="manifest.json has no 'format'"):
        verify_package(emptied, allow_unsigned=True)
    with pytest.raises(PackageVerificationError, match="does not list configs/inference.yaml"):
        parse_manifest(json.dumps({**partner["manifest"], "files": {}}).encode(), tmp_path)


def test_duplicate_zip_entries_are_refused(partner: Any, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    members = _members(partner["zip"])
    entries = sorted(members.items()) + [(MODEL, b"an unverified model, kept by first-wins extractors")]
    with pytest.warns(UserWarning, match="Duplicate name"):
        doubled = _write_zip(tmp_path / "doubled.zip", entries)
    assert _infer(doubled, tmp_path / "out", partner) == 1
    _refused(capsys, tmp_path / "out", f"{MODEL} appears twice")


def test_a_400_mb_zero_run_is_refused_by_the_size_bound(partner: Any, tmp_path: Path) -> None:
    members = _members(partner["zip"])
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, data in sorted(members.items()):
            if name != MODEL:
                archive.writestr(name, data)
        with archive.open(MODEL, "w", force_zip64=True) as entry:
            zeros = bytes(1 << 20)
            for _ in range(400):
                entry.write(zeros)
    assert bomb.stat().st_size < 4 << 20
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(PackageVerificationError, match=f"{MODEL} holds {400 << 20} bytes, the manifest says"):
            verify_package(bomb, partner["public"])
        _, other = make_keys(tmp_path, "other")  # the signature comes first: a wrong key is named, not the size
        with pytest.raises(PackageVerificationError, match="manifest.sig does not verify"):
            verify_package(bomb, other)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20 and time.perf_counter() - start < 10


def test_unsigned_is_refused_by_default_and_loud_when_allowed(partner: Any, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    unsigned = partner["unsigned"]
    assert main(["verify", str(unsigned), "--public-key", str(partner["public"])]) == 1
    assert "manifest.sig is missing; the package is not signed" in capsys.readouterr().err
    assert _infer(unsigned, tmp_path / "refused", partner) == 1
    _refused(capsys, tmp_path / "refused", "not signed")
    assert main(["verify", str(unsigned), "--allow-unsigned"]) == 0
    captured = capsys.readouterr()
    assert "NO SIGNATURE IS CHECKED" in captured.err and "UNSIGNED" in captured.out
    out = tmp_path / "out"
    with registry_env("partner-test-salt"):
        assert _infer(unsigned, out, partner, "--pseudonymise-outputs", key=False) == 0
    captured = capsys.readouterr()
    assert "NO SIGNATURE IS CHECKED" in captured.err and "UNSIGNED" in captured.out
    assert "UNSIGNED" in (out / UNSIGNED_NOTICE).read_text()
    assert (out / "shareable" / UNSIGNED_NOTICE).is_file() and (out / "predictions.csv").is_file()
    # a wrong signature is refused like a missing one
    members = _members(partner["zip"])
    members["manifest.sig"] = base64.b64encode(bytes(64)) + b"\n"
    forged = _write_zip(tmp_path / "forged.zip", sorted(members.items()))
    with pytest.raises(PackageVerificationError, match="manifest.sig does not verify"):
        run_partner_inference(forged, partner["frames"], tmp_path / "out3", public_key=partner["public"])
    assert not (tmp_path / "out3").exists()


def test_unsafe_names_and_link_entries_in_a_zip_are_refused(partner: Any, tmp_path: Path) -> None:
    members = sorted(_members(partner["zip"]).items())
    for name, reason in (("../evil.py", "unsafe path"), ("/etc/evil.py", "unsafe path"),
                         ("configs/./x.yaml", "unsafe path")):
        with pytest.raises(PackageVerificationError, match=reason):
            verify_package(_write_zip(tmp_path / "named.zip", members + [(name, b"x")]), partner["public"])
    linked = tmp_path / "linked.zip"
    with zipfile.ZipFile(linked, "w") as archive:
        for name, data in members:
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 if name == "docs/README.md" else 0o100644) << 16
            archive.writestr(info, data)
    with pytest.raises(PackageVerificationError, match="docs/README.md is a link"):
        verify_package(linked, partner["public"])


def test_manifest_parser_refuses_duplicate_and_unknown_keys(tmp_path: Path) -> None:
    entry = {"sha256": "0" * 64, "size": 1}
    files = {n: entry for n in ("configs/inference.yaml", "configs/metadata.json", "models/model.pt")}
    good = {"format": "medgain-partner-package/2", "model": "m", "version": "1", "files": files}
    assert parse_manifest(json.dumps(good).encode(), tmp_path)["model"] == "m"
    text = json.dumps(good)
    with pytest.raises(PackageVerificationError, match="key 'files' is repeated"):
        parse_manifest((text[:-1] + ', "files": {}}').encode(), tmp_path)
    with pytest.raises(PackageVerificationError, match="unknown key 'verify'"):
        parse_manifest(json.dumps({**good, "verify": False}).encode(), tmp_path)
    with pytest.raises(PackageVerificationError, match="format 'medgain-partner-package/1'"):
        parse_manifest(json.dumps({**good, "format": "medgain-partner-package/1"}).encode(), tmp_path)
    with pytest.raises(PackageVerificationError, match="entry 'models/model.pt' is not"):
        parse_manifest(json.dumps({**good, "files": {**files, MODEL: "0" * 64}}).encode(), tmp_path)

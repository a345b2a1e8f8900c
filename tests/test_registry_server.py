"""The registry commands against a real ``mlflow server`` (127.0.0.1, free port, proxied artifacts), found
through ``MLFLOW_TRACKING_URI``: train -> review -> promote -> package (pinned requirement, no wheel) -> verify,
and no planted identifier in the server's database or artifact store."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from registry_helpers import identifiers, phi_dataset, train

from medgain.cli import main
from medgain.registry import scan_for_identifiers

NAME = "capsule_endoscopy_gain"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination",
               str(root / "artifacts"), "--workers", "1"]
    process = subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.25)
        else:
            pytest.fail("mlflow server did not start within 60 s")
        yield url, root
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_review_promote_package_verify_on_a_tracking_server(
    server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, server_root = server
    monkeypatch.setenv("MEDGAIN_PHI_SALT", "registry-server-salt")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    torch.set_num_threads(1)
    datalist = phi_dataset(tmp_path / "data")
    train(tmp_path / "run", datalist, url, seed=0)
    out = tmp_path / "review"
    args = ["--model", NAME, "--version", "1"]
    assert main(["review", *args, "--data", str(datalist), "--out", str(out), "--n-bootstrap", "50"]) == 0
    assert (out / "report.html").is_file()
    gate = tmp_path / "gate.yaml"
    gate.write_text(yaml.safe_dump({"rules": ["test_auc >= 0.0", "test_tpr_at_fpr_0.001 >= 0.0"]}))
    assert main(["promote", *args, "--gate", str(gate), "--reviewer", "dr-server"]) == 0
    import mlflow

    client = mlflow.MlflowClient(url)
    assert str(client.get_registered_model(NAME).aliases["champion"]) == "1"
    assert client.get_model_version(NAME, "1").tags["promotion.champion.decision"] == "promoted"
    package = tmp_path / "partner_bundle.zip"
    assert main(["package", "--model", f"{NAME}@champion", "--out", str(package), "--no-wheel"]) == 0
    names = zipfile.ZipFile(package).namelist()
    assert "requirements.txt" in names and not any(n.startswith("wheels/") for n in names)
    assert b"medgain==" in zipfile.ZipFile(package).read("requirements.txt")
    assert main(["verify", str(package), "--allow-unsigned"]) == 0
    planted = identifiers()
    assert scan_for_identifiers([server_root / "server.db", server_root / "artifacts", out / "report.html",
                                 package], planted) == []
    assert os.listdir(server_root / "artifacts")  # the scan above did look at the proxied artifacts

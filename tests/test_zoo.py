"""MONAI Model Zoo conformance of every bundle (issue 22), checked the way the Zoo's CI checks a bundle: MONAI's own
``verify_net_in_out``, ``ckpt_export`` (the TorchScript giving the eager network's outputs) and a run with MONAI's
default run id from a folder holding only ``configs/`` and ``models/model.pt``, each as ``python -m monai.bundle``
in a subprocess, on a tiny untrained model file of the bundle's architecture; the metadata's keys against the Zoo
schema's required keys (offline); the bundle layout."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from medgain.model_file import build_network, save_checkpoint, spec_from_config
from medgain.synth import make_wsi_slide

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT / "bundles"
NAMES = ["capsule_endoscopy_gain", "dermoscopy_gain", "glimpse_attention", "wsi_patch_gain"]

# The Zoo's metadata schema (meta_schema_20240725.json, the schema each metadata.json names; MONAI keeps the same
# file as monai/bundle/meta_schema.json): its top-level "required" list, and the keys its "tensor" definition
# requires of every input and output. Written here so the check runs offline. "optional_packages_version" is
# not among them, and MONAI 1.6 renames it to "required_packages_version" when it reads metadata (replacing the
# required packages): a metadata.json must not hold it.
SCHEMA_REQUIRED = [
    "schema", "version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version",
    "task", "description", "authors", "copyright", "network_data_format",
]
SCHEMA_TENSOR_REQUIRED = ["type", "format", "num_channels", "spatial_shape", "dtype", "value_range"]
# what the Zoo's bundles give besides (issue 22): every input says its modality and channels, every output its channels
INPUT_REQUIRED = SCHEMA_TENSOR_REQUIRED + ["modality", "channel_def"]
OUTPUT_REQUIRED = SCHEMA_TENSOR_REQUIRED + ["channel_def"]
# the schema file, where a machine has it (e.g. downloaded once by hand): verify_metadata then runs too
LOCAL_SCHEMA = os.environ.get("MEDGAIN_ZOO_SCHEMA", "")

# a fitted metadata encoder of the dermoscopy columns: 8 features (2 + unknown, age + unknown, 2 + unknown)
ENCODER = {
    "columns": ["sex", "age_approx", "anatom_site_general_challenge"],
    "numeric": ["age_approx"],
    "categories": {"sex": ["female", "male"], "anatom_site_general_challenge": ["lower extremity", "torso"]},
    "stats": {"age_approx": [50.0, 15.0]},
}
NUM_METADATA = 8
TINY_SPECS: dict[str, dict[str, Any]] = {
    "capsule_endoscopy_gain": {"class_names": ["normal", "lesion"], "modality": "ES"},
    "dermoscopy_gain": {"class_names": ["benign", "melanoma"], "modality": "XC", "architecture": "fusion",
                        "metadata_encoder": ENCODER},
    "glimpse_attention": {"class_names": ["normal", "tumour"], "modality": "other", "architecture": "glimpse",
                          "glimpse": {"num_glimpses": 3, "glimpse_size": 8, "hidden_size": 16, "context_size": 16}},
    "wsi_patch_gain": {"class_names": ["normal", "tumour"], "modality": "light microscopy", "level": 0, "mpp": 2.0},
}


def _meta(name: str) -> dict[str, Any]:
    return json.loads((BUNDLES / name / "configs" / "metadata.json").read_text())


def _zoo_bundle(name: str, folder: Path) -> Path:
    """``folder`` holding only the bundle's ``configs/`` and a tiny model file ``models/model.pt`` (small_cnn,
    freshly initialised, with the spec and operating point a trained one has)."""
    shutil.copytree(BUNDLES / name / "configs", folder / "configs")
    spec = spec_from_config("small_cnn", 2, 32, bundle=name, **TINY_SPECS[name])
    torch.manual_seed(0)
    (folder / "models").mkdir()
    save_checkpoint(folder / "models" / "model.pt", {
        "model": build_network(spec).state_dict(), "model_spec": spec, "epoch": 1, "metrics": {},
        "operating_point": {"threshold": 0.0, "max_fpr": 0.001},
    })
    return folder


def _monai_bundle(*args: str, cwd: Path) -> str:
    """``python -m monai.bundle ARGS`` as the Zoo's CI runs it; its output (the test fails on a non-zero exit)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"monai.bundle {args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def _inputs(name: str, folder: Path) -> Path:
    folder.mkdir()
    if name == "wsi_patch_gain":
        make_wsi_slide(folder / "slide.tif", seed=3, index=0, size=512, tumour=True, mpp=2.0)
        return folder
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"frame{i}.png")
    return folder


def _example(name: str, meta: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """A random input of the shape metadata.json gives (and, for the fused network, a metadata vector)."""
    image = meta["network_data_format"]["inputs"]["image"]
    generator = torch.Generator().manual_seed(1)
    example = (torch.rand(1, image["num_channels"], *image["spatial_shape"], generator=generator),)
    if name == "dermoscopy_gain":
        example += (torch.rand(1, NUM_METADATA, generator=generator),)
    return example


@pytest.mark.parametrize("name", NAMES)
def test_metadata_holds_every_key_the_zoo_schema_requires(name: str) -> None:
    meta = _meta(name)
    assert [k for k in SCHEMA_REQUIRED if k not in meta] == [] and "optional_packages_version" not in meta
    assert meta["version"] in meta["changelog"]
    fmt = meta["network_data_format"]
    for kind, required in (("inputs", INPUT_REQUIRED), ("outputs", OUTPUT_REQUIRED)):
        assert fmt[kind], f"{name}: no {kind}"
        for key, tensor in fmt[kind].items():
            assert [k for k in required if k not in tensor] == [], f"{name} {kind} {key}"
            assert tensor["channel_def"], f"{name} {kind} {key}: empty channel_def"
            assert isinstance(tensor["num_channels"], int) and isinstance(tensor["spatial_shape"], list)
            assert all(isinstance(v, (int, str)) for v in tensor["spatial_shape"])
    assert set(fmt["inputs"]) == ({"image", "metadata"} if name == "dermoscopy_gain" else {"image"})


@pytest.mark.skipif(not Path(LOCAL_SCHEMA).is_file() or importlib.util.find_spec("jsonschema") is None,
                    reason="the Zoo schema file (MEDGAIN_ZOO_SCHEMA) or jsonschema is not on this machine")
@pytest.mark.parametrize("name", NAMES)
def test_verify_metadata_against_the_local_schema(name: str, tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"  # a copy: verify_metadata uses an existing file instead of downloading
    shutil.copy(LOCAL_SCHEMA, schema)
    out = _monai_bundle("verify_metadata", "--meta_file", str(BUNDLES / name / "configs" / "metadata.json"),
                        "--filepath", str(schema), cwd=tmp_path)
    assert "metadata is verified with no error" in out


@pytest.mark.parametrize("name", NAMES)
def test_bundle_layout_is_the_zoos(name: str) -> None:
    bundle = BUNDLES / name
    for path in ("LICENSE", "docs/README.md", "configs/logging.conf", "configs/metadata.json",
                 "configs/inference.yaml"):
        assert (bundle / path).is_file(), f"{name}: no {path}"
    assert not list(bundle.glob("large_files.*"))  # nothing is fetched
    assert "bundles/*/models/" in (ROOT / ".gitignore").read_text().splitlines()  # model files stay out of git
    readme = (bundle / "docs" / "README.md").read_text()
    for command in ("python -m monai.bundle verify_net_in_out network_def",
                    "python -m monai.bundle ckpt_export network_def", "python -m monai.bundle run --config_file"):
        assert command in readme, f"{name}: docs/README.md does not show `{command}`"
    assert "models/" in readme and "LICENSE" in readme


@pytest.mark.parametrize("name", NAMES)
def test_network_def_without_a_model_file_has_the_metadata_shape(name: str, tmp_path: Path) -> None:
    """The Zoo checks shapes before any weights exist: network_def then builds the bundle's default network."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / name / "configs" / "inference.yaml"))
    parser.read_meta(str(BUNDLES / name / "configs" / "metadata.json"))
    parser["bundle_root"] = str(tmp_path)  # no models/model.pt there
    assert parser["run"] and parser["inference"] == "@run"  # the default id, and the documented named id
    net = parser.get_parsed_content("network_def").eval()
    meta = _meta(name)
    example = _example(name, meta)
    if name == "dermoscopy_gain":  # the default encoder knows no category yet: 4 features, every value unknown
        example = (example[0], torch.zeros(1, 4))
    with torch.no_grad():
        out = net(*example)
    assert out.shape == (1, meta["network_data_format"]["outputs"]["pred"]["num_channels"])


@pytest.mark.parametrize("architecture", ["classifier", "fusion", "chipnet", "glimpse"])
def test_every_architecture_scripts_to_the_eager_outputs(architecture: str) -> None:
    """torch.jit.script (what ckpt_export and the partner package use) of each model-spec architecture, including
    the fused network's f-string-free errors and the glimpse model's Gaussian filter banks."""
    options: dict[str, Any] = {
        "classifier": {"normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}},
        "fusion": {"architecture": "fusion", "metadata_encoder": ENCODER},
        "chipnet": {"architecture": "chipnet", "chip_size": 8},
        "glimpse": TINY_SPECS["glimpse_attention"],
    }[architecture]
    net = build_network(spec_from_config("small_cnn", 2, 32, **options), logits_only=True).eval()
    scripted = torch.jit.script(net)
    generator = torch.Generator().manual_seed(2)
    example = (torch.rand(2, 3, 40, 48, generator=generator),)
    if architecture == "fusion":
        example += (torch.rand(2, NUM_METADATA, generator=generator),)
    if architecture == "chipnet":
        example = (torch.rand(2, 3, 32, 48, generator=generator),)
    with torch.no_grad():
        expected, exported = net(*example), scripted(*example)
    assert isinstance(expected, torch.Tensor) and expected.shape == (2, 2)
    assert (exported - expected).abs().max().item() < 1e-5
    if architecture == "fusion":  # the scripted network's errors still name what is wrong
        with pytest.raises(Exception, match=r"metadata of shape \[2, 3\] for 2 images of 8 features"):
            scripted(example[0], torch.zeros(2, 3))


@pytest.mark.parametrize("name", NAMES)
def test_zoo_commands_pass_on_a_tiny_model(name: str, tmp_path: Path) -> None:
    bundle = _zoo_bundle(name, tmp_path / name)
    configs, meta_file = f"{name}/configs/inference.yaml", f"{name}/configs/metadata.json"
    # 1. verify_net_in_out: the fused network's metadata input goes through --extra_forward_args
    extra = ["--extra_forward_args", str({"metadata": [[0.0] * NUM_METADATA]})] if name == "dermoscopy_gain" else []
    out = _monai_bundle("verify_net_in_out", "network_def", "--config_file", configs, "--meta_file", meta_file,
                        "--bundle_root", name, *extra, cwd=tmp_path)
    assert "data shape of network is verified with no error" in out
    # 2. ckpt_export: TorchScript of the model file's network, giving the eager network's outputs
    out = _monai_bundle("ckpt_export", "network_def", "--filepath", f"{name}/models/model.ts", "--ckpt_file",
                        f"{name}/models/model.pt", "--meta_file", meta_file, "--config_file", configs,
                        "--key_in_ckpt", "model", "--bundle_root", name, cwd=tmp_path)
    assert "exported to file" in out
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.yaml"))
    parser["bundle_root"] = str(bundle)
    eager = parser.get_parsed_content("network_def")
    eager.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True)["model"])
    scripted = torch.jit.load(str(bundle / "models" / "model.ts"))
    example = _example(name, _meta(name))
    with torch.no_grad():
        expected, exported = eager.eval()(*example), scripted(*example)
    assert exported.shape == expected.shape == (1, 2)
    assert (exported - expected).abs().max().item() < 1e-4
    # 3. MONAI's default run id, from the folder holding only configs/ and models/ (model.pt, and model.ts now)
    assert sorted(p.name for p in bundle.iterdir()) == ["configs", "models"]
    inputs, output = _inputs(name, tmp_path / "input"), tmp_path / "output"
    workers = [] if name == "wsi_patch_gain" else ["--num_workers", "0"]  # slide inference reads in-process
    _monai_bundle("run", "--config_file", configs, "--meta_file", meta_file, "--bundle_root", name,
                  "--input_dir", str(inputs), "--output_dir", str(output), *workers, cwd=tmp_path)
    table = output / ("slides.csv" if name == "wsi_patch_gain" else "predictions.csv")
    with table.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == (1 if name == "wsi_patch_gain" else 2)
    assert (output / "run_summary.json").is_file()

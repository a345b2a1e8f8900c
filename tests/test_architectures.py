"""The model-file code builds every architecture through the registry, without importing any network class."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import medgain.model_file as model_file
from medgain.networks import ARCHITECTURES, Architecture, register_architecture


def test_model_file_imports_no_particular_network() -> None:
    tree = ast.parse(Path(model_file.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"ChipNet", "FusionClassifier", "RecurrentGlimpseNetwork", "GlimpseLogitsNetwork"}
    assert not any(m and m.startswith(("medgain.data", "medgain.networks.glimpse", "medgain.networks.chipnet"))
                   for m in modules)


def test_every_built_in_architecture_is_registered() -> None:
    assert set(ARCHITECTURES) >= {"classifier", "fusion", "chipnet", "glimpse"}
    assert ARCHITECTURES["chipnet"].layer_prefix == "encoder."
    assert ARCHITECTURES["fusion"].layer_prefix == "image_branch."


class _Doubler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean((2, 3)) * 2


def test_a_registered_architecture_is_built_and_checked_by_the_model_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ARCHITECTURES, "doubler", Architecture(
        "body.", lambda spec, path, logits_only: _Doubler(),
        lambda spec: None if spec.chip_size == 0 else "no chip_size",
    ))
    spec = model_file.ModelSpec("small_cnn", 2, 16, architecture="doubler")
    assert spec.target_layer.startswith("body.")
    assert isinstance(model_file.build_network(spec), _Doubler)
    with pytest.raises(ValueError, match="'doubler' model spec needs no chip_size"):
        model_file.ModelSpec("small_cnn", 2, 16, architecture="doubler", chip_size=4)
    with pytest.raises(ValueError, match="registered already"):
        register_architecture("doubler", ARCHITECTURES["doubler"])


def test_specs_lacking_their_architecture_fields_are_refused() -> None:
    with pytest.raises(ValueError, match="'chipnet' model spec needs a positive chip_size"):
        model_file.ModelSpec("small_cnn", 2, 16, architecture="chipnet")
    with pytest.raises(ValueError, match="'glimpse' model spec needs glimpse"):
        model_file.ModelSpec("small_cnn", 2, 16, architecture="glimpse")
    with pytest.raises(ValueError, match="'fusion' model spec needs metadata_encoder"):
        model_file.ModelSpec("small_cnn", 2, 16, architecture="fusion")

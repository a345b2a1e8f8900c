"""Shared test fixtures: tiny deterministic networks and a synthetic blob task."""

from __future__ import annotations

import os

# Under pytest-xdist (`make test` runs one worker per core) each worker, and every process it starts, gets one
# compute thread: two workers with two torch threads each would oversubscribe a 2-core machine.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from monai.engines import SupervisedTrainer

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from medgain.handlers.gain import GAINHandler
from torch import nn


class TinyNet(nn.Module):
    """Small conv net; ``features.conv2`` keeps the input resolution, ``pool`` halves it."""

    def __init__(self, num_classes: int = 3, downsample: bool = False, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv1", nn.Conv2d(3, 8, 3, padding=1))
        self.features.add_module("act1", act())
        if downsample:
            self.features.add_module("pool", nn.AvgPool2d(2))
        self.features.add_module("conv2", nn.Conv2d(8, 8, 3, padding=1))
        self.features.add_module("bn", nn.BatchNorm2d(8))
        self.features.add_module("act2", act())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.fixture
def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def blob_batch(n: int, size: int = 16, seed: int = 0, pos_rate: float = 0.5) -> dict[str, torch.Tensor]:
    """Noise images; positives carry a bright square blob whose mask is returned."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g) * 0.5
    labels = (torch.rand(n, generator=g) < pos_rate).long()
    masks = torch.zeros(n, 1, size, size)
    for i in torch.nonzero(labels)[:, 0].tolist():
        r, c = torch.randint(0, size - size // 4, (2,), generator=g).tolist()
        s = size // 4
        masks[i, :, r : r + s, c : c + s] = 1.0
        images[i, 0, r : r + s, c : c + s] += 0.6
    return {"image": images, "label": labels, "mask": masks, "has_mask": labels.bool()}


def gain_trainer(net: torch.nn.Module, batches: list[dict[str, Any]], loss: Any = None, **kw: Any) -> SupervisedTrainer:
    """A MONAI SupervisedTrainer over in-memory batches (lr 0 by default: gradients stay inspectable)."""
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=kw.pop("max_epochs", 1),
        train_data_loader=batches,
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=kw.pop("lr", 0.0)),
        loss_function=loss or torch.nn.CrossEntropyLoss(),
        decollate=False,
        **kw,
    )


def run_gain_iteration(net: torch.nn.Module, batch: dict[str, Any], handler: GAINHandler, loss: Any = None) -> dict[str, Any]:
    """One trainer iteration with ``handler`` attached; returns the engine output."""
    trainer = gain_trainer(net, [batch], loss)
    handler.attach(trainer)
    trainer.run()
    return trainer.state.output


def dicom_dataset(transfer_syntax: str = ExplicitVRLittleEndian) -> Dataset:
    """An empty Secondary Capture data set with its file meta, ready for pixel data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    return ds


def write_dicom(path: Path, arr: np.ndarray, photometric: str = "RGB", bits_stored: int = 8) -> Path:
    """Write ``arr`` ((frames,) rows, columns(, samples)) as an uncompressed DICOM file; returns the path."""
    ds = dicom_dataset()
    ds.set_pixel_data(arr, photometric, bits_stored)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# `make test` hands whole files to its pytest-xdist workers (`--dist loadfile`: a file's module fixtures, such as
# a trained bundle, are built once) in collection order (`--no-loadscope-reorder`). These files take longest
# (measured with `--durations=0`), so they go first and the short ones fill the gaps at the end.
SLOW_FILES_FIRST = [
    "test_capsule_bundle.py", "test_study.py", "test_registry_bundles.py", "test_zoo.py", "test_reliability.py",
    "test_registry.py", "test_every_network.py", "test_glimpse_bundle.py", "test_dermoscopy_training.py",
    "test_wsi_bundle.py", "test_partner.py", "test_phi_tracking.py", "test_registry_server.py", "test_errors.py",
    "test_outputs_atomic.py", "test_attention_crop_pipeline.py", "test_phi_pipeline.py",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order

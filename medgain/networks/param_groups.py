"""Optimizer parameter groups: one learning rate for the (pretrained) backbone, another for the new heads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

__all__ = ["backbone_head_param_groups"]


def backbone_head_param_groups(
    network: nn.Module,
    backbone_lr: float,
    head_lr: float,
    backbone_prefixes: Sequence[str] = ("image_branch.", "encoder."),
) -> list[dict[str, Any]]:
    """Two optimizer parameter groups: the backbone's parameters at ``backbone_lr``, all others at ``head_lr``.

    The defaults match :class:`~medgain.networks.FusionClassifier` (``image_branch``) and
    :class:`~medgain.networks.ChipNet` (``encoder``); a ``DistributedDataParallel`` wrapper's ``module.`` prefix
    is ignored.

    Args:
        network: the model.
        backbone_lr: learning rate of the backbone.
        head_lr: learning rate of the metadata MLP, scoring layers and heads.
        backbone_prefixes: parameter-name prefixes of the backbone.

    Returns:
        ``[{"params": [...], "lr": backbone_lr, "name": "backbone"}, {"params": [...], "lr": head_lr,
        "name": "head"}]`` for any ``torch.optim`` optimizer.

    Raises:
        ValueError: when either group would be empty (wrong prefixes for this network) or a rate is not positive.
    """
    if not (backbone_lr > 0 and head_lr > 0):
        raise ValueError(f"learning rates must be > 0, got backbone_lr={backbone_lr}, head_lr={head_lr}")
    prefixes = tuple(backbone_prefixes)
    backbone, head = [], []
    for name, parameter in network.named_parameters():
        if not parameter.requires_grad:
            continue
        (backbone if name.removeprefix("module.").startswith(prefixes) else head).append(parameter)
    if not backbone or not head:
        raise ValueError(
            f"{type(network).__name__}: prefixes {list(prefixes)} give {len(backbone)} backbone and {len(head)} head "
            "parameters; both groups need parameters"
        )
    return [
        {"params": backbone, "lr": float(backbone_lr), "name": "backbone"},
        {"params": head, "lr": float(head_lr), "name": "head"},
    ]

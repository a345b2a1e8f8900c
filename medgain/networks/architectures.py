"""The model architectures a model file can describe, each registered by the module that defines it.

A model file's spec names an architecture ("classifier", "fusion", "chipnet", "glimpse"); the generic model-file
code (:mod:`medgain.model_file`) builds and checks it through this registry, so it never imports a particular
network class. Each entry gives the prefix of its backbone's layer names (for the default Grad-CAM layer), the
spec fields it needs, and the function that builds it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["ARCHITECTURES", "Architecture", "register_architecture"]

#: ``build(spec, pretrained_path, logits_only)``: the network of a spec (a ``medgain.model_file.ModelSpec``).
Builder = Callable[[Any, "str | os.PathLike | None", bool], nn.Module]


@dataclass(frozen=True)
class Architecture:
    """How to check and build one architecture.

    Args:
        layer_prefix: prefix of the backbone's layer names inside the whole network (e.g. "encoder.").
        build: ``build(spec, pretrained_path, logits_only)`` returns the freshly built network.
        check: ``check(spec)`` returns what the spec lacks for this architecture, or None when it is complete.
    """

    layer_prefix: str
    build: Builder
    check: Callable[[Any], str | None] = lambda spec: None


#: name -> architecture; filled by :func:`register_architecture` when :mod:`medgain.networks` is imported.
ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(name: str, architecture: Architecture) -> None:
    """Make ``name`` a valid model-spec architecture.

    Raises:
        ValueError: ``name`` is registered already.
    """
    if name in ARCHITECTURES:
        raise ValueError(f"architecture {name!r} is registered already")
    ARCHITECTURES[name] = architecture

"""The variables a MONAI bundle's config files define: what a study or a pipeline may set for its runs, so that a
misspelt override (``max_epoch: 1``) is refused instead of being added to the config unused."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from medgain.config_yaml import load_yaml_file

__all__ = ["bundle_variables", "unknown_variables"]


def bundle_variables(bundle: str | os.PathLike, configs: Sequence[str]) -> set[str]:
    """The top-level ids of the bundle's config files ``configs`` (names under ``<bundle>/configs``).

    Raises:
        FileNotFoundError: when a config file does not exist.
        ValueError: naming the file, when it is not valid YAML or repeats a key.
    """
    names: set[str] = set()
    for name in configs:
        loaded = load_yaml_file(Path(bundle) / "configs" / name)
        if isinstance(loaded, Mapping):
            names.update(str(key) for key in loaded)
    return names


def unknown_variables(overrides: Iterable[object], known: set[str]) -> list[str]:
    """The override names (``a`` or ``a#b#c``, MONAI's nested ids) whose first id is not in ``known``, sorted."""
    return sorted(str(name) for name in overrides if str(name).split("#")[0] not in known)

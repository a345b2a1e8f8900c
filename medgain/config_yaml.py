"""YAML for medgain's own input files (gate files, study specs, ...): safe loading that refuses a key repeated in
one mapping, where plain ``yaml.safe_load`` silently keeps the last value (``rules:`` twice would replace the
strict rules by whatever follows)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node

__all__ = ["DuplicateKeyError", "UniqueKeyLoader", "load_yaml", "load_yaml_file"]


class DuplicateKeyError(ConstructorError):
    """A key repeated in one YAML mapping (``key``; ``line`` and ``first_line`` counted from 1)."""

    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(problem=f"duplicate key {key!r} at line {line} (first at line {first_line})")
        self.key, self.line, self.first_line = key, line, first_line


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that raises :class:`DuplicateKeyError` on a key repeated in one mapping (what a merge
    key ``<<`` brings in may still be overridden by explicit keys, as YAML intends)."""

    def construct_mapping(self, node: Node, deep: bool = False) -> dict[Any, Any]:
        """The mapping of ``node``, after checking that no explicit key occurs twice."""
        if isinstance(node, MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = seen.get(key)
                except TypeError:  # an unhashable key: SafeConstructor reports it below
                    continue
                if earlier is not None:
                    raise DuplicateKeyError(key, key_node.start_mark.line + 1, earlier)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str | bytes, source: str | os.PathLike) -> Any:
    """Parse YAML ``text`` with :class:`UniqueKeyLoader`.

    Args:
        text: the YAML document.
        source: what the text comes from (a file name), named in the error.

    Raises:
        ValueError: ``<source>: duplicate key 'k' at line N (first at line M) ...`` for a repeated key,
            ``<source>: not valid YAML (...)`` (one line) for any other YAML error.
    """
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except DuplicateKeyError as err:
        raise ValueError(
            f"{source}: duplicate key {err.key!r} at line {err.line} (first at line {err.first_line}); each key "
            "may appear once in a mapping"
        ) from None
    except yaml.YAMLError as err:
        raise ValueError(f"{source}: not valid YAML ({' '.join(str(err).split())})") from None


def load_yaml_file(path: str | os.PathLike) -> Any:
    """Read and parse a YAML file with :func:`load_yaml`.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: naming the file, for a repeated key or invalid YAML.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    return load_yaml(path.read_bytes(), path)

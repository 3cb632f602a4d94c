"""YAML files validated by pydantic models, with errors that name file, line and field.

Shared by the catalog, the selection policy and the RBAC policy, so an operator's typo
is reported the same way wherever it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError


def read_yaml(path: Path, error: type[Exception]) -> tuple[str, Any]:
    """The file's text and parsed YAML (an empty file is an empty mapping)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start})") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise error(f"{where}: invalid YAML: {problem}") from e
    except RecursionError:  # PyYAML's parser recurses once per level of nesting
        raise error(f"{path}: invalid YAML: nested too deeply") from None
    return text, ({} if data is None else data)


_M = TypeVar("_M", bound=BaseModel)


def load_yaml_model(path: Path, model: type[_M], error: type[Exception]) -> _M:
    """Parse YAML at `path` into `model`; invalid input raises `error` naming file:line and field.

    An empty file validates as an empty mapping.
    """
    text, data = read_yaml(path, error)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        root = yaml.compose(text)
        lines = []
        for err in e.errors():
            loc = err["loc"]
            field = ".".join(str(p) for p in loc) or "(top level)"
            lines.append(f"{path}:{line_of(root, loc)}: {field}: {err['msg']}")
        raise error("; ".join(lines)) from e


def line_of(root: yaml.Node | None, loc: Sequence[int | str]) -> int:
    """1-based line of the deepest YAML node `loc` reaches (the parent if a key is missing)."""
    node = root
    line = node.start_mark.line + 1 if node is not None else 1
    for part in loc:
        nxt: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == str(part):
                    nxt = v
                    line = k.start_mark.line + 1
                    break
        elif (
            isinstance(node, yaml.SequenceNode)
            and isinstance(part, int)
            and 0 <= part < len(node.value)
        ):
            nxt = node.value[part]
            line = nxt.start_mark.line + 1
        if nxt is None:
            # e.g. the tag of a discriminated union, or a missing key: stay where we are
            continue
        node = nxt
    return line



"""The default policies shipped with the agent, as package data: rbac.yaml, selection.yaml
and their JSON Schemas (schemas/). Found through `importlib.resources`, so an installed
wheel has them wherever it is installed. Imports nothing of the project.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["packaged"]


def packaged(name: str) -> Path:
    """The path of a packaged policy file, e.g. `packaged("rbac.yaml")`,
    `packaged("schemas/rbac.schema.json")`."""
    return Path(str(files(__name__).joinpath(name)))

"""What every CLI command module shares: the per-invocation context and output helpers.

Kept apart from `agent.cli` so command modules never import the group that imports them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from pydantic import BaseModel

from agent.settings import Settings, load_settings

F = TypeVar("F", bound=Callable[..., Any])


class Context:
    """Per-invocation state: settings are read lazily so `--help` never touches disk."""

    def __init__(self, config: Path | None, debug: bool) -> None:
        self.config = config
        self.debug = debug
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config)
        return self._settings


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"edge-agent: error: {message}", err=True)
    sys.exit(code)


def emit_json(data: Any) -> None:
    if isinstance(data, BaseModel):
        text = data.model_dump_json(indent=2)
    elif isinstance(data, list) and all(isinstance(d, BaseModel) for d in data):
        text = json.dumps([d.model_dump(mode="json") for d in data], indent=2)
    else:
        text = json.dumps(data, indent=2, default=str)
    click.echo(text)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(f)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"

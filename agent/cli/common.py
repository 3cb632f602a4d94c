"""What every CLI command module shares: the per-invocation context, the database and
registry it opens, the client of the running daemon, and output helpers.

Kept apart from `agent.cli` so command modules never import the group that imports them.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
from pydantic import BaseModel

from agent.errors import AgentError, SettingsError
from agent.settings import Settings, load_settings
from agent.terminal import printable
from registry.errors import RegistryError

if TYPE_CHECKING:
    from localdb import Database
    from registry.service import Registry

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def exit_code(exc: BaseException) -> int:
    """The documented exit code of an error: 2 for configuration, else 1. The one place
    errors become exit codes."""
    return 2 if isinstance(exc, SettingsError) else 1


class AgentGroup(click.Group):
    """Turns our exceptions into one-line errors with the documented exit codes. Every
    command group uses it, so a group invoked on its own behaves like `edge-agent GROUP`."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except (AgentError, RegistryError, OSError) as exc:
            obj = ctx.find_object(Context)
            if obj is not None and obj.debug:
                traceback.print_exception(exc)
            fail(str(exc), exit_code(exc))


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


@contextmanager
def database(ctx: Context, *, create: bool = False) -> Iterator[Database]:
    """The device database of the configured home; refuses a missing one unless `create`."""
    from localdb import open_database

    path = ctx.settings.state.db
    if not create and not path.is_file():
        fail(f"no registry database at {path} (has the agent run with this home?)")
    db = open_database(path)
    try:
        yield db
    finally:
        db.close()


@contextmanager
def registry(ctx: Context) -> Iterator[Registry]:
    """The registry of the configured home."""
    from registry.service import open_registry

    reg = open_registry(ctx.settings.state)
    try:
        yield reg
    finally:
        reg.close()


def call(ctx: Context, method: str, path: str, body: Any = None, *, timeout: float = 600) -> Any:
    """One API call to the running daemon (errors go to the group's one handler)."""
    from agent.client import AgentClient

    with AgentClient(ctx.settings.socket, timeout=timeout) as client:
        return client.request(method, path, body)


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


def root_option(help: str) -> Callable[[F], F]:
    """--root DIR: a tree laid out like a device's / (a capture) instead of this system."""
    return click.option("--root", type=click.Path(path_type=Path, file_okay=False, exists=True),
                        default=None, help=help)


def print_rows(
    data: Any,
    as_json: bool,
    rows: Sequence[T],
    line: Callable[[T], str],
    *,
    empty: str,
    header: str | None = None,
) -> None:
    """A listing: `data` as JSON with --json, else `empty`, or `header` and one line a row."""
    if as_json:
        emit_json(data)
        return
    if not rows:
        click.echo(empty)
        return
    if header is not None:
        click.echo(header)
    for row in rows:
        click.echo(printable(line(row)))  # stored text may hold control characters


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"

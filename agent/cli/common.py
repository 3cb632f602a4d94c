"""What every CLI command module shares: the per-invocation context, the options every
command accepts, the database and registry it opens, the client of the running daemon, and
output helpers.

Kept apart from `agent.cli` so command modules never import the group that imports them.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
from pydantic import BaseModel

from agent.errors import AgentError, DaemonError, SettingsError
from agent.settings import Settings
from agent.terminal import printable
from registry.errors import RegistryError

if TYPE_CHECKING:
    from agent.cli.discovery import Located
    from agent.client import AgentClient
    from localdb import Database, StateDir
    from registry.service import Registry

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def exit_code(exc: BaseException) -> int:
    """The documented exit code of an error: 2 for a usage or configuration error, else 1.
    The one place errors become exit codes (click's own usage errors carry their 2).

    A request the daemon refused for one of its fields (HTTP 400 naming the parameter:
    `--keep-alive forever`, a prompt longer than the context) is the caller's usage error
    too: the CLI passes such arguments through rather than keep a second copy of the
    daemon's parsers. Other refusals (an invalid policy file on reload) stay 1."""
    if isinstance(exc, SettingsError):
        return 2
    if isinstance(exc, DaemonError) and exc.status == 400 and exc.param is not None:
        return 2
    return 1


class AgentGroup(click.Group):
    """Turns our exceptions into one-line errors with the documented exit codes, and gives
    every command the global options (`--debug`, `--config`, `--home`, `--socket`) so they
    work after the subcommand too. Every command group uses it, so a group invoked on its
    own behaves like `edge-agent GROUP`."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = super().get_command(ctx, cmd_name)
        return None if cmd is None else with_global_options(cmd)

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
    """Per-invocation state: settings are read lazily so `--help` never touches disk, and
    the home and socket are found in the order `agent.cli.discovery` documents."""

    def __init__(
        self,
        config: Path | None,
        debug: bool,
        home: Path | None = None,
        socket: Path | None = None,
    ) -> None:
        self.config = config
        self.debug = debug
        self.home = home
        self.socket = socket
        self._located: Located | None = None

    @property
    def located(self) -> Located:
        """The settings with the origin of their home and socket (read once)."""
        if self._located is None:
            from agent.cli.discovery import locate

            self._located = locate(self.config, self.home, self.socket)
        return self._located

    @property
    def settings(self) -> Settings:
        return self.located.settings

    def client(self, timeout: float = 600) -> AgentClient:
        """A client of the daemon this invocation talks to; its errors name the socket and
        where that choice came from."""
        from agent.client import AgentClient

        located = self.located
        return AgentClient(located.settings.socket, timeout=timeout,
                           origin=located.socket_origin)


def context_of(ctx: click.Context) -> Context:
    """The invocation's Context, made here when an option is parsed before the root
    command's callback has run (or when a group is invoked on its own)."""
    obj = ctx.find_object(Context)
    if obj is None:
        obj = ctx.find_root().obj = Context(None, False)
    return obj


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        context_of(ctx).debug = True
        logging.getLogger().setLevel(logging.DEBUG)  # the root callback may have run


def _set_path(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
    if value is not None:
        setattr(context_of(ctx), str(param.name), value)


def global_options() -> list[click.Option]:
    """The options every command accepts, before or after its subcommand; each sets the
    invocation's Context rather than reaching a callback."""
    path = click.Path(path_type=Path)
    return [
        click.Option(["--config"], type=click.Path(path_type=Path, dir_okay=False),
                     expose_value=False, callback=_set_path,
                     help="Settings file (TOML). Default: $EDGE_AGENT_CONFIG, then "
                          "/etc/edge-agent/agent.toml."),
        click.Option(["--home"], type=path, expose_value=False, callback=_set_path,
                     help="State directory (default: found as `edge-agent --help` says)."),
        click.Option(["--socket"], type=path, expose_value=False, callback=_set_path,
                     help="The daemon's API socket (default: found as `edge-agent --help` "
                          "says)."),
        click.Option(["--debug"], is_flag=True, expose_value=False, callback=_set_debug,
                     help="Show tracebacks and debug logs."),
    ]


def with_global_options(cmd: click.Command) -> click.Command:
    """`cmd` with the global options added (once; an option it defines itself wins)."""
    if getattr(cmd, "_edge_global_options", False):
        return cmd
    taken = {opt for p in cmd.params for opt in p.opts}
    cmd.params.extend(o for o in global_options() if not taken & set(o.opts))
    cmd._edge_global_options = True  # type: ignore[attr-defined]
    return cmd


@contextmanager
def database(ctx: Context, *, create: bool = False) -> Iterator[Database]:
    """The device database of the configured home; refuses a missing one unless `create`
    (then says which home it creates, and why that one)."""
    from localdb import open_database

    state = ctx.settings.state
    if not state.db.is_file():
        if not create:
            fail(f"no registry database at {state.db} (home {state.home} from "
                 f"{ctx.located.home_origin}: has the agent run with this home? Choose "
                 "another with --home or EDGE_AGENT_HOME)")
        _say_where(ctx, "creating the home")
    db = open_database(state.db)
    try:
        yield db
    finally:
        db.close()


@contextmanager
def registry(ctx: Context, *, create: bool = False) -> Iterator[Registry]:
    """The registry of the configured home. Only commands that install pass `create`
    (they say where they install). Without it a home that does not exist is read as an
    empty one, in a throwaway directory: a command that only reads (`models list`) must
    not leave a database and a store behind in a home nobody chose (issue 15)."""
    from registry.service import open_registry

    with ExitStack() as stack:
        home: StateDir | Path = ctx.settings.state
        if create:
            _say_where(ctx, "installing into")
        elif not ctx.settings.state.db.is_file():
            home = Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="edge-agent-empty-")))
        reg = stack.enter_context(closing(open_registry(home)))
        yield reg


def _say_where(ctx: Context, doing: str) -> None:
    """One line on stderr naming the home a writing command uses, and where that choice
    came from: a model installed into the wrong home is a model the daemon never sees."""
    located = ctx.located
    click.echo(f"edge-agent: {doing} {located.settings.home} ({located.home_origin})",
               err=True)


def call(ctx: Context, method: str, path: str, body: Any = None, *, timeout: float = 600) -> Any:
    """One API call to the running daemon (errors go to the group's one handler)."""
    with ctx.client(timeout) as client:
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

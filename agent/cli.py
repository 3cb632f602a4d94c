"""The `edge-agent` command: models, device, and (later) serve/run/audit subcommands.

Exit codes: 0 ok, 1 the operation failed, 2 usage or configuration error. Errors are one
line a person can act on; `--debug` adds the traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from pydantic import BaseModel

from agent import __version__
from agent.settings import Settings, SettingsError, load_settings
from registry.errors import RegistryError

F = TypeVar("F", bound=Callable[..., Any])
POLICIES_DIR = Path(__file__).resolve().parent.parent / "policies"


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


class AgentGroup(click.Group):
    """Turns our exceptions into one-line errors with the documented exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SettingsError as exc:
            self._report(ctx, exc, 2)
        except RegistryError as exc:
            self._report(ctx, exc, 1)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except OSError as exc:
            self._report(ctx, exc, 1)

    @staticmethod
    def _report(ctx: click.Context, exc: BaseException, code: int) -> NoReturn:
        obj = ctx.find_object(Context)
        if obj is not None and obj.debug:
            traceback.print_exception(exc)
        fail(str(exc), code)


@click.group(cls=AgentGroup)
@click.version_option(__version__, prog_name="edge-agent")
@click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Settings file (TOML). Default: $EDGE_AGENT_CONFIG, then /etc/edge-agent/agent.toml.",
)
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.pass_context
def main(ctx: click.Context, config: Path | None, debug: bool) -> None:
    """edge-agent: run small language models on this device, managed from a fleet."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, stream=sys.stderr)
    ctx.obj = Context(config, debug)


def _register_commands() -> None:
    # Imported here so each command module stays small and `--help` stays fast.
    from agent import cli_audit, cli_device, cli_models, cli_policy, cli_serve, cli_tokens

    main.add_command(cli_models.models)
    main.add_command(cli_device.device)
    main.add_command(cli_policy.policy)
    main.add_command(cli_tokens.tokens)
    main.add_command(cli_audit.audit)
    cli_serve.register(cli_models.models, main)


_register_commands()

"""The `edge-agent` command group: models, device, serve/run/chat/ps, policy, tokens, audit.

Exit codes: 0 ok, 1 the operation failed, 2 usage or configuration error. Errors are one
line a person can act on; `--debug` adds the traceback.
"""

from __future__ import annotations

import importlib
import logging
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

import click

from agent import __version__
from agent.cli_common import Context, fail
from agent.settings import SettingsError
from registry.errors import RegistryError


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


class LazyGroup(AgentGroup):
    """Imports a command's module only when that command runs: `serve` stays lean."""

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            module, attr = self.lazy[name].split(":")
            cmd = getattr(importlib.import_module(module), attr)
            assert isinstance(cmd, click.Command)
            return cmd
        return super().get_command(ctx, name)


COMMANDS = {
    "models": "agent.cli_models:models",
    "device": "agent.cli_device:device",
    "policy": "agent.cli_policy:policy",
    "tokens": "agent.cli_tokens:tokens",
    "audit": "agent.cli_audit:audit",
    "serve": "agent.cli_serve:serve",
    "run": "agent.cli_serve:run",
    "chat": "agent.cli_serve:chat",
    "ps": "agent.cli_serve:ps",
}


@click.group(cls=LazyGroup, lazy=COMMANDS)
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


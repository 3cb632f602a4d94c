"""`edge-agent serve | run | chat | ps` and `models load/unload`: the daemon and its clients."""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from agent.cli_common import Context, emit_json, fail, human_bytes, json_option
from agent.client import AgentClient, AgentError, AgentUnavailable

pass_ctx = click.make_pass_decorator(Context)


def _client(ctx: Context) -> AgentClient:
    return AgentClient(ctx.settings.socket)


def call(ctx: Context, method: str, path: str, body: Any = None) -> Any:
    """One API call to the running daemon; a failure is a one-line error, exit 1."""
    with _client(ctx) as client:
        try:
            return client.request(method, path, body)
        except (AgentUnavailable, AgentError) as exc:
            fail(str(exc))


@click.command()
@pass_ctx
def serve(ctx: Context) -> None:
    """Run the daemon in the foreground (systemd runs this)."""
    from agent.daemon import serve as run_daemon
    from agent.server import ListenerError

    settings = ctx.settings
    try:
        code = run_daemon(settings)
    except ListenerError as exc:
        fail(str(exc))
    sys.exit(code)


@click.command()
@click.argument("alias")
@click.argument("prompt")
@click.option("--max-tokens", type=int, default=None, help="Stop after this many tokens.")
@click.option("--seed", type=int, default=None, help="Sampling seed, for repeatable output.")
@pass_ctx
def chat(ctx: Context, alias: str, prompt: str, max_tokens: int | None, seed: int | None) -> None:
    """Ask a model one question; the answer streams to stdout."""
    params: dict[str, Any] = {}
    if max_tokens:
        params["max_tokens"] = max_tokens
    if seed is not None:
        params["seed"] = seed
    with _client(ctx) as client:
        try:
            for text in client.stream_chat(alias, [{"role": "user", "content": prompt}], **params):
                click.echo(text, nl=False)
        except (AgentUnavailable, AgentError) as exc:
            fail(str(exc))
    click.echo()


@click.command()
@click.argument("alias")
@click.option("--system", default=None, help="System prompt for the conversation.")
@pass_ctx
def run(ctx: Context, alias: str, system: str | None) -> None:
    """Chat with a model interactively; /bye or Ctrl-D ends it."""
    history: list[dict[str, str]] = []
    if system:
        history.append({"role": "system", "content": system})
    with _client(ctx) as client:
        try:
            client.request("POST", f"/agent/v1/models/{alias}/load", {})
        except (AgentUnavailable, AgentError) as exc:
            fail(str(exc))
        click.echo(f"chatting with {alias}; /bye or Ctrl-D to end", err=True)
        while True:
            try:
                line = input(">>> ")
            except EOFError:
                click.echo()
                break
            if line.strip() in ("/bye", "/exit", "/quit"):
                break
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            parts: list[str] = []
            try:
                for text in client.stream_chat(alias, history):
                    parts.append(text)
                    click.echo(text, nl=False)
            except KeyboardInterrupt:
                click.echo(" [interrupted]", err=True)
            except (AgentUnavailable, AgentError) as exc:
                fail(str(exc))
            click.echo()
            history.append({"role": "assistant", "content": "".join(parts)})


@click.command()
@json_option
@pass_ctx
def ps(ctx: Context, as_json: bool) -> None:
    """List the models the running agent has loaded."""
    data = call(ctx, "GET", "/agent/v1/loaded")
    if as_json:
        emit_json(data)
        return
    rows = data["models"]
    if not rows:
        click.echo("no models loaded")
        return
    click.echo(f"{'MODEL':<24} {'VARIANT':<24} {'MEMORY':>9} {'QUEUE':>5}  UNTIL")
    now = time.time()
    for m in rows:
        until = "forever" if m["expires_at"] is None else _until(m["expires_at"], now)
        click.echo(
            f"{m['alias']:<24} {m['variant']:<24} {human_bytes(m['memory_bytes']):>9} "
            f"{m['queue_depth']:>5}  {until}"
        )


def _until(expires_at: float, now: float) -> str:
    # The agent reports expiry on its monotonic clock plus wall offset (seconds from now).
    left = max(0, int(expires_at - now))
    return f"{left // 60}m{left % 60:02d}s"

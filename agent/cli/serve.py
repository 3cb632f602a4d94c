"""`edge-agent serve | run | chat | ps` and `models load/unload`: the daemon and its clients."""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from agent.cli.common import Context, call, human_bytes, json_option, print_rows
from agent.client import AgentClient

pass_ctx = click.make_pass_decorator(Context)


@click.command()
@pass_ctx
def serve(ctx: Context) -> None:
    """Run the daemon in the foreground (systemd runs this)."""
    from agent.daemon import serve as run_daemon

    sys.exit(run_daemon(ctx.settings))


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
    with AgentClient(ctx.settings.socket) as client:
        for text in client.stream_chat(alias, [{"role": "user", "content": prompt}], **params):
            click.echo(text, nl=False)
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
    with AgentClient(ctx.settings.socket) as client:
        client.request("POST", f"/agent/v1/models/{alias}/load", {})
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
            click.echo()
            history.append({"role": "assistant", "content": "".join(parts)})


@click.command()
@json_option
@pass_ctx
def ps(ctx: Context, as_json: bool) -> None:
    """List the models the running agent has loaded."""
    data = call(ctx, "GET", "/agent/v1/loaded")
    now = time.time()

    def line(m: dict[str, Any]) -> str:
        until = "forever" if m["expires_at"] is None else _until(m["expires_at"], now)
        return (f"{m['alias']:<24} {m['variant']:<24} {human_bytes(m['memory_bytes']):>9} "
                f"{m['queue_depth']:>5}  {until}")

    print_rows(data, as_json, data["models"], line, empty="no models loaded",
               header=f"{'MODEL':<24} {'VARIANT':<24} {'MEMORY':>9} {'QUEUE':>5}  UNTIL")


def _until(expires_at: float, now: float) -> str:
    # The agent reports expiry on its monotonic clock plus wall offset (seconds from now).
    left = max(0, int(expires_at - now))
    return f"{left // 60}m{left % 60:02d}s"

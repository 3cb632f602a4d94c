"""A small client of the agent's socket API, for the CLI (`run`, `chat`, `ps`, ...): its
errors are the CLI's messages, naming the socket it tried and what to run next."""

from __future__ import annotations

import errno
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import AgentUnavailable, DaemonError

if TYPE_CHECKING:  # imported when a client is made: `edge-agent serve` never needs httpx
    import httpx

log = logging.getLogger(__name__)
WARNING_HEADER = "Edge-Agent-Warning"  # agent.api.tasks: e.g. chatting with a base model
CHAT_MAX_TOKENS = 1024
"""What `stream_chat` (`edge-agent chat` and `run`) asks for unless told: an answer of a
small model fits, and a model that never stops is cut within a minute or two instead of
generating up to its context (the daemon caps every answer at runtime.max_tokens_ceiling
as well)."""


class AgentClient:
    """Talks HTTP to the daemon over its Unix socket."""

    def __init__(self, socket_path: Path, timeout: float = 600.0, *,
                 origin: str | None = None) -> None:
        """`origin` says where the socket path came from (`--socket`, `EDGE_AGENT_SOCKET`,
        the config file, `make run`'s state dir, the default), for the message shown when
        nothing answers there."""
        import httpx

        self.socket_path = socket_path
        self.origin = origin
        self._http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(socket_path)),
            base_url="http://edge-agent",
            timeout=timeout,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unavailable(self, exc: Exception) -> AgentUnavailable:
        where = f"{self.socket_path}" + (f" ({self.origin})" if self.origin else "")
        choose = ("choose another socket with --socket PATH or EDGE_AGENT_SOCKET "
                  "(`edge-agent --help` lists where the CLI looks)")
        if _errno(exc) in (errno.EACCES, errno.EPERM):
            return AgentUnavailable(
                f"cannot connect to the edge-agent on {where}: permission denied (this user "
                f"may not use that socket: ask for its group or a token); or {choose}")
        return AgentUnavailable(
            f"no edge-agent is running on {where}; start one with `edge-agent serve` (or "
            f"`make run` in a checkout), or {choose}")

    def _broken(self, exc: Exception) -> AgentUnavailable:
        """Connected, but the answer never came whole: a timeout, or the daemon went away."""
        return AgentUnavailable(
            f"the edge-agent on {self.socket_path} did not finish its answer "
            f"({exc.__class__.__name__}: {exc or 'no detail'}); if it stopped, its log says why")

    def request(self, method: str, path: str, body: Any = None) -> Any:
        import httpx

        try:
            resp = self._http.request(method, path, json=body)
        except (httpx.ConnectError, FileNotFoundError) as exc:
            raise self._unavailable(exc) from exc
        except httpx.TransportError as exc:
            raise self._broken(exc) from exc
        model = body.get("model") if isinstance(body, dict) else None
        if model is None and path.startswith("/agent/v1/models/"):
            model = path.split("/")[4]
        return _decode(resp, model if isinstance(model, str) else None)

    def stream_chat(
        self, model: str, messages: list[dict[str, str]], **params: Any
    ) -> Iterator[str]:
        """Yield text deltas of a streamed chat completion."""
        import httpx

        body = {"model": model, "messages": messages, "stream": True,
                "max_tokens": CHAT_MAX_TOKENS, **params}
        try:
            with self._http.stream("POST", "/v1/chat/completions", json=body) as resp:
                if resp.status_code != 200:
                    resp.read()
                    _decode(resp, model)
                if warning := resp.headers.get(WARNING_HEADER):
                    log.warning("%s", warning)  # the CLI shows warnings on stderr
                for line in resp.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    for choice in event.get("choices", []):
                        text = choice.get("delta", {}).get("content")
                        if text:
                            yield text
        except (httpx.ConnectError, FileNotFoundError) as exc:
            raise self._unavailable(exc) from exc
        except httpx.TransportError as exc:
            raise self._broken(exc) from exc


def _errno(exc: BaseException) -> int | None:
    """The OS error number behind a connection failure (httpx wraps the OSError)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    return None


def _decode(resp: httpx.Response, model: str | None = None) -> Any:
    try:
        data = resp.json()
    except ValueError:
        data = {"error": {"message": resp.text}}
    if resp.status_code >= 400:
        err = data.get("error", {}) if isinstance(data, dict) else {}
        message = err.get("message") or resp.reason_phrase
        if err.get("code") == "model_not_found":
            message += install_hint(model)
        param = err.get("param")
        raise DaemonError(resp.status_code, message,
                          param=param if isinstance(param, str) else None)
    return data


def install_hint(model: str | None) -> str:
    """What to run when the daemon has no model `model`: pull it if the catalog has it,
    else import a file under that name or pull the catalog's default model."""
    from registry.catalog import load_catalog

    catalog = load_catalog()
    if model is not None and catalog.find(model) is not None:
        return f"; run `edge-agent models pull {model}`"
    default = catalog.default_model("chat")
    pull = f"run `edge-agent models pull {default.alias}`" if default is not None else ""
    if model is None:
        return f"; {pull}" if pull else ""
    imp = f"`edge-agent models import FILE --alias {model}`"
    return f"; {model!r} is not in the catalog: install a file with {imp}" + (
        f", or {pull} (the catalog's default)" if pull else "")

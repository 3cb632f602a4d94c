"""A small client of the agent's socket API, for the CLI (`run`, `chat`, `ps`, ...)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import AgentUnavailable, DaemonError

if TYPE_CHECKING:  # imported when a client is made: `edge-agent serve` never needs httpx
    import httpx


class AgentClient:
    """Talks HTTP to the daemon over its Unix socket."""

    def __init__(self, socket_path: Path, timeout: float = 600.0) -> None:
        import httpx

        self.socket_path = socket_path
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
        return AgentUnavailable(
            f"no edge-agent is running on {self.socket_path} ({exc.__class__.__name__}); "
            "start it with `edge-agent serve` or `make run`"
        )

    def request(self, method: str, path: str, body: Any = None) -> Any:
        import httpx

        try:
            resp = self._http.request(method, path, json=body)
        except (httpx.ConnectError, FileNotFoundError) as exc:
            raise self._unavailable(exc) from exc
        return _decode(resp)

    def stream_chat(
        self, model: str, messages: list[dict[str, str]], **params: Any
    ) -> Iterator[str]:
        """Yield text deltas of a streamed chat completion."""
        import httpx

        body = {"model": model, "messages": messages, "stream": True, **params}
        try:
            with self._http.stream("POST", "/v1/chat/completions", json=body) as resp:
                if resp.status_code != 200:
                    resp.read()
                    _decode(resp)
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


def _decode(resp: httpx.Response) -> Any:
    try:
        data = resp.json()
    except ValueError:
        data = {"error": {"message": resp.text}}
    if resp.status_code >= 400:
        err = data.get("error", {}) if isinstance(data, dict) else {}
        raise DaemonError(resp.status_code, err.get("message") or resp.reason_phrase)
    return data

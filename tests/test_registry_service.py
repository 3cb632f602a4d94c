"""Registry operations on real files and a real SQLite DB: import, dedupe, rm, pull, crash."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest_models import make_text_file, make_truncated_copy, minilm_int8_onnx_path

from registry.errors import InvalidModelFile, ModelInUse, ModelNotFound, NoSourceAvailable
from registry.service import open_registry

SMOL_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def blobs(home: Path) -> list[Path]:
    return [p for p in (home / "store" / "blobs").rglob("*") if p.is_file()]


def rows(home: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(home / "registry.db") as db:
        return db.execute(sql).fetchall()


def test_import_real_models_reads_metadata_from_the_files(
    tmp_path: Path, smollm2_gguf: Path, gemma3_gguf: Path
) -> None:
    reg = open_registry(tmp_path)
    smol = reg.import_file(smollm2_gguf, alias="smol")
    gemma = reg.import_file(gemma3_gguf)  # alias from the file's own name
    assert reg.import_file(minilm_int8_onnx_path(), alias="minilm").created
    assert smol.created and smol.sha256 == SMOL_SHA
    m = reg.get("smol")
    assert (m.architecture, m.task, m.context_length) == ("llama", "chat", 8192)
    assert m.variants[0].quantization == "Q4_1" and m.variants[0].has_chat_template
    g = reg.get(gemma.model.alias)
    assert (g.architecture, g.task, g.context_length) == ("gemma3", "completion", 32768)
    assert g.variants[0].quantization == "Q4_K_M" and not g.variants[0].has_chat_template
    e = reg.get("minilm")
    assert (e.task, e.variants[0].format, e.variants[0].quantization) == ("embedding", "onnx",
                                                                          "int8")
    assert [i["name"] for i in e.variants[0].details["inputs"]] == [
        "input_ids", "attention_mask", "token_type_ids"]
    assert [ev.kind for ev in reg.events("smol")] == ["imported"]
    reg.close()


def test_duplicate_import_is_a_no_op_and_shared_files_are_stored_once(
    tmp_path: Path, smollm2_gguf: Path
) -> None:
    reg = open_registry(tmp_path)
    first = reg.import_file(smollm2_gguf, alias="smol")
    again = reg.import_file(smollm2_gguf, alias="smol")
    other = reg.import_file(smollm2_gguf, alias="smol-copy")
    assert first.created and not again.created and other.created
    assert len(blobs(tmp_path)) == 1
    assert rows(tmp_path, "SELECT count(*) FROM artifacts") == [(1,)]
    # removing one alias keeps the file the other still uses
    assert reg.remove("smol") == []
    assert len(blobs(tmp_path)) == 1
    assert reg.remove("smol-copy") == [SMOL_SHA]
    assert blobs(tmp_path) == []
    reg.close()


@pytest.mark.parametrize("kind", ["truncated", "text"])
def test_invalid_files_are_refused_and_leave_nothing(
    tmp_path: Path, smollm2_gguf: Path, kind: str
) -> None:
    bad = tmp_path / "bad.gguf"
    if kind == "truncated":
        make_truncated_copy(smollm2_gguf, bad, 4 * 1024 * 1024)
    else:
        make_text_file(bad)
    home = tmp_path / "home"
    reg = open_registry(home)
    with pytest.raises(InvalidModelFile) as err:
        reg.import_file(bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    assert reg.list_models() == [] and blobs(home) == []
    reg.close()


def test_cli_refuses_a_text_file_renamed_gguf_with_one_line(tmp_path: Path) -> None:
    bad = make_text_file(tmp_path / "notes.gguf")
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "models", "import", str(bad)],
        env={**os.environ, "EDGE_AGENT_HOME": str(tmp_path / "home")},
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 1
    # One error line (an import also says where it installs, on a line of its own).
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "not a valid" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_import_killed_mid_copy_leaves_no_record_and_no_blob(
    tmp_path: Path, smollm2_gguf: Path
) -> None:
    home = tmp_path / "home"
    open_registry(home).close()
    child = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from registry.service import open_registry
        reg = open_registry(Path({str(home)!r}))
        def progress(n):
            sys.stdout.write("copying\\n"); sys.stdout.flush()
            sys.stdin.readline()  # blocks: the parent kills us here, mid-copy
        reg.import_file(Path({str(smollm2_gguf)!r}), alias="smol", progress=progress)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "copying\n"  # the first chunk is in the temp file
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = list((home / "store" / "tmp").iterdir())
    assert partial, "the kill should have left the temp file"
    reg = open_registry(home)  # recovery runs at open
    assert reg.list_models() == []
    assert blobs(home) == [] and list((home / "store" / "tmp").iterdir()) == []
    # and the same import then succeeds
    assert reg.import_file(smollm2_gguf, alias="smol").created
    reg.close()


def test_rm_refuses_while_another_process_has_the_model_loaded(
    tmp_path: Path, smollm2_gguf: Path
) -> None:
    reg = open_registry(tmp_path)
    reg.import_file(smollm2_gguf, alias="smol")
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from pathlib import Path
            from registry.service import open_registry
            reg = open_registry(Path({str(tmp_path)!r}))
            with reg.lease({SMOL_SHA!r}):
                print("held", flush=True)
                sys.stdin.readline()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    try:
        with pytest.raises(ModelInUse, match="in use"):
            reg.remove("smol")
        assert [m.alias for m in reg.list_models()] == ["smol"]
        assert reg.remove("smol", force=True) == [SMOL_SHA]
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(ModelNotFound, match="no models are installed"):
        reg.get("smol")
    assert [e.kind for e in reg.events("smol")] == ["imported", "removed"]
    reg.close()


def test_pull_installs_offline_models_verified(tmp_path: Path) -> None:
    reg = open_registry(tmp_path)
    result = reg_pull(reg, "smollm2-135m")
    assert result.created and result.sha256 == SMOL_SHA
    assert reg.get("smollm2-135m").source == "catalog"
    assert not reg_pull(reg, "smollm2-135m").created  # idempotent
    with pytest.raises(NoSourceAvailable, match="models import FILE --alias phi4-mini"):
        reg_pull(reg, "phi4-mini")
    with pytest.raises(NoSourceAvailable, match="not in the catalog"):
        reg_pull(reg, "no-such-model")
    reg.close()


def reg_pull(reg, alias):  # type: ignore[no-untyped-def]
    return reg.pull(alias)


def test_cli_models_commands_round_trip(tmp_path: Path, smollm2_gguf: Path) -> None:
    env = {**os.environ, "EDGE_AGENT_HOME": str(tmp_path)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agent", *args], env=env,
                              capture_output=True, text=True, check=False)

    assert cli("models", "import", str(smollm2_gguf), "--alias", "smol").returncode == 0
    listed = json.loads(cli("models", "list", "--json").stdout)
    assert [m["alias"] for m in listed] == ["smol"]
    shown = json.loads(cli("models", "show", "smol", "--json").stdout)
    assert shown["variants"][0]["sha256"] == SMOL_SHA and shown["events"][0]["kind"] == "imported"
    sel = json.loads(cli("models", "select", "smol", "--json").stdout)
    assert sel["chosen"]["name"] == "gguf-q4_1-cpu"
    missing = cli("models", "show", "nope")
    assert missing.returncode == 1 and "no model named 'nope'" in missing.stderr
    assert cli("models", "rm", "smol").returncode == 0
    assert json.loads(cli("models", "list", "--json").stdout) == []
    assert cli("--version").stdout.startswith("edge-agent")

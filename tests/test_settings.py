"""Settings: file + environment precedence, one-line errors naming key and source."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.settings import SettingsError, iter_setting_keys, load_settings

DOCS = Path(__file__).parent.parent / "docs" / "settings.md"


def test_defaults_without_file() -> None:
    s = load_settings(None, environ={})
    assert s.home == Path("/var/lib/edge-agent")
    assert s.runtime.keep_alive_seconds == 300


def test_file_then_env_override(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('home = "/srv/ea"\n[runtime]\nthreads = 3\nqueue_size = 4\n')
    s = load_settings(cfg, environ={"EDGE_AGENT_RUNTIME__THREADS": "2"})
    assert s.home == Path("/srv/ea")
    assert s.runtime.threads == 2  # environment wins over the file
    assert s.runtime.queue_size == 4  # the file still applies to what env leaves alone


def test_env_config_variable_selects_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text('socket = "/tmp/x.sock"\n')
    s = load_settings(None, environ={"EDGE_AGENT_CONFIG": str(cfg)})
    assert s.socket == Path("/tmp/x.sock")


def test_bad_value_in_file_names_key_and_file(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[runtime]\nthreads = 0\n")
    with pytest.raises(SettingsError) as err:
        load_settings(cfg, environ={})
    msg = str(err.value)
    assert "runtime.threads" in msg and str(cfg) in msg and "greater than or equal to 1" in msg
    assert "\n" not in msg


def test_bad_value_in_env_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(None, environ={"EDGE_AGENT_RUNTIME__MEMORY_FRACTION": "2"})
    assert "EDGE_AGENT_RUNTIME__MEMORY_FRACTION" in str(err.value)


def test_unknown_key_lists_allowed_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[runtime]\nthreds = 2\n")
    with pytest.raises(SettingsError) as err:
        load_settings(cfg, environ={})
    assert "runtime.threds" in str(err.value) and "threads" in str(err.value)


def test_invalid_toml_is_reported(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text("home = \n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(cfg, environ={})


def test_cli_exits_2_with_one_line_on_bad_setting(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[logging]\nlevel = 'loud'\n")
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(cfg), "models", "list"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "logging.level" in lines[0] and str(cfg) in lines[0]
    assert "'debug', 'info', 'warning' or 'error'" in lines[0]


def test_every_setting_is_documented() -> None:
    text = DOCS.read_text()
    missing = [
        key for key, env, _ in iter_setting_keys() if f"`{key}`" not in text or env not in text
    ]
    assert missing == []

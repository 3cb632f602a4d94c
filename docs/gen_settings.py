"""Regenerates the settings table in docs/settings.md from agent.settings (run after edits)."""

from __future__ import annotations

from pathlib import Path

from agent.settings import Settings, iter_setting_keys

DOC = Path(__file__).with_name("settings.md")
MARK = "| key | environment | default | meaning |"


def default_of(key: str) -> object:
    obj: object = Settings.model_construct()
    for part in key.split("."):
        obj = getattr(obj, part)
        if callable(obj):
            obj = obj()
    return oct(obj) if key == "server.socket_mode" and isinstance(obj, int) else obj


def main() -> None:
    head = DOC.read_text().split(MARK)[0]
    rows = [
        f"| `{k}` | `{env}` | `{default_of(k)}` | {desc} |" for k, env, desc in iter_setting_keys()
    ]
    DOC.write_text(head + MARK + "\n|---|---|---|---|\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()

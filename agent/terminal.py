"""Text on its way to a terminal or a log line, with control characters made visible.

Whatever a local caller managed to get stored (an alias, a path, a token name) is printed
by `audit tail` and the other listings; raw, a newline forged whole lines and `ESC[8m`
hid the real subject ([hardening] finding 4). Escaped, each such character shows as its
code: C0 and C1 controls, DEL, and the invisible formatting characters (bidirectional
overrides, zero-width joiners) that can reorder or hide what a reader sees.
"""

from __future__ import annotations

import unicodedata


def printable(text: str) -> str:
    """`text` with every control or invisible formatting character escaped (\\n → \\x0a)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else _escape(c) for c in text)


def _escape(c: str) -> str:
    code = ord(c)
    if code < 0x100:
        return f"\\x{code:02x}"
    if unicodedata.category(c) in ("Zs",):  # other spaces print as themselves
        return c
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"

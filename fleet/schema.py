"""docs/protocol.md's generated part: every message's JSON Schema, from the models.

`python -m fleet.schema` rewrites the part between the markers; a test fails when the
document and the models drift apart.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fleet.messages import MESSAGES

BEGIN = "<!-- BEGIN GENERATED: python -m fleet.schema -->"
END = "<!-- END GENERATED -->"


def generated() -> str:
    parts = []
    for kind, model in MESSAGES.items():
        schema = json.dumps(model.model_json_schema(), indent=2, sort_keys=True)
        doc = (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else ""
        parts.append(f"### `{kind}`: {model.__name__}\n\n{doc}\n\n```json\n{schema}\n```\n")
    return "\n".join(parts)


def rewrite(doc: Path) -> bool:
    """Put the generated schemas into `doc`; True if it changed."""
    text = doc.read_text(encoding="utf-8")
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    new = f"{head}{BEGIN}\n\n{generated()}\n{END}{tail}"
    if new != text:
        doc.write_text(new, encoding="utf-8")
        return True
    return False


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/protocol.md")
    print(f"{path}: {'updated' if rewrite(path) else 'unchanged'}")

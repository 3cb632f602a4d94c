"""Regenerates docs/openapi.json: the socket API as OpenAPI 3.1 (run after changing a route,
a request model or a response model in agent/api/schema.py).

    python docs/gen_openapi.py            # write docs/openapi.json
    python docs/gen_openapi.py --check    # exit 1 if it is out of date (tests run this)

The routes are the table `create_app()` builds (in a throwaway home), so a route added
anywhere the app registers routes is in the document or the generator fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

DOC = Path(__file__).with_name("openapi.json")


def build() -> dict[str, Any]:
    """The document for the app `create_app()` makes."""
    from agent import __version__
    from agent.api.routes import ROUTE_TABLE
    from agent.api.schema import document
    from agent.app import create_app, shutdown
    from agent.settings import Settings
    from agent.state import STATE

    with tempfile.TemporaryDirectory(prefix="ea-openapi-") as home:
        app = create_app(Settings(home=Path(home)))
        try:
            return document(app[ROUTE_TABLE], __version__)
        finally:
            asyncio.run(shutdown(app[STATE]))


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="Fail if the file is stale.")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not DOC.exists() or DOC.read_text(encoding="utf-8") != text:
            print(f"{DOC.name} is out of date: run `python docs/gen_openapi.py`",
                  file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

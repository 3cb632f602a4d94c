"""Request bodies as JSON, bounded in nesting as aiohttp bounds them in size.

A 200 KB body of 100,000 nested arrays made `json.loads` raise RecursionError, which
surfaced as a 500 with a traceback ([hardening] finding 9); a body nested just below the
interpreter's limit parses, and then every recursive walk after it (pydantic, the JSON
Schema to grammar conversion, the audit's canonical form) risks the same. No OpenAI
request needs more than a few levels (a deep JSON Schema: a dozen), so anything nested
deeper than `MAX_DEPTH` is refused with a 400 before any of that runs.
"""

from __future__ import annotations

from typing import Any

from agent.api.errors import APIError

MAX_DEPTH = 64


def loads(body: bytes) -> Any:
    """`body` parsed; APIError 400 if it is not JSON or is nested deeper than MAX_DEPTH."""
    import json

    try:
        data = json.loads(body)
    except RecursionError:
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise APIError(400, f"request body is not valid JSON: {exc}",
                       code="invalid_json") from exc
    if depth_exceeds(data, MAX_DEPTH):
        raise _too_deep()
    return data


def depth_exceeds(data: Any, limit: int) -> bool:
    """Whether containers in `data` nest deeper than `limit` (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if level > limit:
            return True
        stack.extend((c, level + 1) for c in children if isinstance(c, (dict, list)))
    return False


def _too_deep() -> APIError:
    return APIError(400, f"request body is nested deeper than {MAX_DEPTH} levels",
                    code="invalid_json")

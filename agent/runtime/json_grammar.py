"""JSON Schema to GBNF for constrained output, with integer bounds enforced.

llama-cpp-python's `LlamaGrammar.from_json_schema` drives its Python `SchemaConverter`,
which ignores `minimum` / `maximum` / `exclusiveMinimum` / `exclusiveMaximum` (its own
"TODO"): a schema `{"type": "integer", "minimum": 0, "maximum": 120}` let SmolLM2 write
`1653`, and a client validating the reply with the schema it sent got an error, even with
`strict: true`. `schema_to_gbnf` converts with `JsonGrammarConverter`, a subclass that
writes an integer's bounds into the grammar the way llama.cpp's own C++ converter does
(`build_min_max_int`, and how its `build_integer` folds the exclusive bounds in, from
vendor/llama.cpp/common/json-schema-to-grammar.cpp and json-schema.cpp of the
llama-cpp-python 0.3.36 sdist; llama.cpp is MIT licensed, Copyright (c) 2023-2026 The
ggml authors; the converter subclassed is llama-cpp-python's, MIT, Copyright (c) 2023
Andrei Betlen). The port fixes two faults of the original, found by the property test in
tests/test_json_grammar.py: a minimum whose digits after the first start with a zero lost
them (`minimum: 100` accepted `10`, `minimum: 105` accepted `15`), and a negative maximum
allowed a leading zero after the sign (`maximum: -5` accepted `-05`, which is not JSON).
The subclass also takes from the C++ converter its string character (no raw control
characters) and its reading of a `type` list (other keywords kept for each type).

`unenforced` lists what the grammar still cannot hold a reply to, so `strict: true` can
refuse such a schema with a 400 naming the keyword and where it is, instead of promising
a reply that may not validate.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from llama_cpp.llama_grammar import (
    DOT,
    PRIMITIVE_RULES,
    RESERVED_NAMES,
    STRING_FORMAT_RULES,
    BuiltinRule,
    SchemaConverter,
)

INTEGRAL_DIGITS = 16
"""Digits of an integer with an open side, as the converter's own `integral-part`."""

BOUND_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")

# A JSON string's character, as llama.cpp's C++ converter has it: the Python converter's
# `[^"\\]` also lets a raw control character (a newline) into a string, which no JSON
# parser accepts.
JSON_CHAR = BuiltinRule(
    r'[^"\\\x7F\x00-\x1F] | [\\] (["\\/bfnrt] | "u" [0-9a-fA-F]{4})', [])

# A pattern's `.`: the Python converter's `[^\x0A\x0D]` could write a quote (ending the
# string early), a backslash or a control character; here, any character JSON takes raw.
JSON_DOT = r'[^"\\\x7F\x00-\x1F]'

# JSON Schema keywords that constrain a value (draft 2020-12 and the older `items` list,
# `additionalItems`, `dependencies`); `format` too, which a demanding client expects to
# hold. Anything else (title, description, default, examples, $defs, unknown words) is an
# annotation and never makes a reply invalid.
ASSERTIONS = frozenset({
    "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum",
    "exclusiveMinimum", "maxLength", "minLength", "pattern", "format", "maxItems",
    "minItems", "uniqueItems", "maxContains", "minContains", "contains", "maxProperties",
    "minProperties", "required", "dependentRequired", "dependentSchemas", "dependencies",
    "allOf", "anyOf", "oneOf", "not", "if", "then", "else", "prefixItems", "items",
    "additionalItems", "unevaluatedItems", "properties", "patternProperties",
    "additionalProperties", "unevaluatedProperties", "propertyNames", "$ref",
    "$dynamicRef", "$recursiveRef",
})


def _digits(low: int, high: int) -> str:
    """`[0-9]` repeated low..high times, in GBNF (high -1: no upper bound)."""
    if low == high == 1:
        return "[0-9]"
    if low == high:
        return f"[0-9]{{{low}}}"
    return f"[0-9]{{{low},{'' if high < 0 else high}}}"


def _digit_range(start: str, end: str) -> str:
    return f"[{start}]" if start == end else f"[{start}-{end}]"


def _uniform_range(start: str, end: str) -> str:
    """GBNF for the decimal strings of equal length from `start` to `end` (leading zeros
    kept: the strings are the tail of a longer number)."""
    i = 0
    while i < len(start) and i < len(end) and start[i] == end[i]:
        i += 1
    out = f'"{start[:i]}"' if i > 0 else ""
    if i < len(start) and i < len(end):
        if i > 0:
            out += " "
        sub_len = len(start) - i - 1
        if sub_len > 0:
            from_sub, to_sub = start[i + 1:], end[i + 1:]
            zeros, nines = "0" * sub_len, "9" * sub_len
            to_reached = False
            out += "("
            if from_sub == zeros:
                out += _digit_range(start[i], chr(ord(end[i]) - 1)) + " " \
                    + _digits(sub_len, sub_len)
            else:
                out += f"[{start[i]}] ({_uniform_range(from_sub, nines)})"
                if start[i] < chr(ord(end[i]) - 1):
                    out += " | "
                    if to_sub == nines:
                        out += _digit_range(chr(ord(start[i]) + 1), end[i])
                        to_reached = True
                    else:
                        out += _digit_range(chr(ord(start[i]) + 1), chr(ord(end[i]) - 1))
                    out += " " + _digits(sub_len, sub_len)
            if not to_reached:
                out += " | " + _digit_range(end[i], end[i]) + " " \
                    + _uniform_range(zeros, to_sub)
            out += ")"
        else:
            out += f"[{start[i]}-{end[i]}]"
    return out


def int_range(minimum: int | None, maximum: int | None, decimals_left: int = INTEGRAL_DIGITS,
              top_level: bool = True) -> str:
    """A GBNF expression matching exactly the JSON integers from `minimum` to `maximum`
    (None: open on that side; an open side allows `decimals_left` digits, as the
    converter's plain integers do). A port of llama.cpp's `build_min_max_int` (MIT; see
    the module's docstring), with its two faults fixed. `top_level` False: the digits
    follow a leading digit or a sign that rule out a leading zero already."""
    if minimum is None and maximum is None:
        raise ValueError("at least one of minimum and maximum must be set")
    if minimum is not None and maximum is not None:
        if minimum > maximum:
            raise ValueError(f"no integer is from {minimum} to {maximum}")
        if minimum < 0 and maximum < 0:
            return f'"-" ({int_range(-maximum, -minimum, decimals_left, True)})'
        out = ""
        if minimum < 0:
            out = f'"-" ({int_range(0, -minimum, decimals_left, True)}) | '
            minimum = 0
        min_s, max_s = str(minimum), str(maximum)
        parts = []
        for digits in range(len(min_s), len(max_s)):
            parts.append(_uniform_range(min_s, "9" * digits))
            min_s = "1" + "0" * digits
        parts.append(_uniform_range(min_s, max_s))
        return out + " | ".join(parts)

    if top_level:  # room for the bound's own digits and one more (not in the original)
        bound = minimum if minimum is not None else maximum
        assert bound is not None
        decimals_left = max(decimals_left, len(str(abs(bound))) + 1)
    less_decimals = max(decimals_left - 1, 1)
    if minimum is not None:
        if minimum < 0:
            return (f'"-" ({int_range(None, -minimum, decimals_left, False)}) | [0] | [1-9] '
                    + _digits(0, decimals_left - 1))
        if minimum == 0:
            if top_level:
                return "[0] | [1-9] " + _digits(0, less_decimals)
            return _digits(1, decimals_left)
        if minimum <= 9:
            c = str(minimum)
            start = "1" if top_level else "0"
            out = ""
            if c > start:
                out = _digit_range(start, chr(ord(c) - 1)) + " " \
                    + _digits(1, less_decimals) + " | "
            return out + _digit_range(c, "9") + " " + _digits(0, less_decimals)
        min_s = str(minimum)
        c = min_s[0]
        out = ""
        if c > "1":
            out = _digit_range("1" if top_level else "0", chr(ord(c) - 1)) + " " \
                + _digits(len(min_s), less_decimals) + " | "
        rest = min_s[1:]
        if len(rest) > 1 and rest[0] == "0":  # fixed: int(rest) lost the zeros (min 100
            # accepted 10): the tail has len(rest) digits and is at least rest, or is longer
            tail = _uniform_range(rest, "9" * len(rest))
            if len(min_s) <= less_decimals:
                tail += " | " + _digits(len(min_s), less_decimals)
        else:
            tail = int_range(int(rest), None, less_decimals, False)
        out += _digit_range(c, c) + f" ({tail})"
        if c < "9":
            out += " | " + _digit_range(chr(ord(c) + 1), "9") + " " \
                + _digits(len(min_s) - 1, less_decimals)
        return out

    assert maximum is not None
    if maximum >= 0:
        out = ""
        if top_level:
            out = '"-" [1-9] ' + _digits(0, less_decimals) + " | "
        return out + int_range(0, maximum, decimals_left, True)
    # fixed: top_level True, as no digits precede these (max -5 accepted -05)
    return f'"-" ({int_range(-maximum, None, decimals_left, True)})'


def _bound(schema: dict[str, Any], key: str) -> float | int:
    value = schema[key]
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, not {json.dumps(value)}")
    return value


def integer_bounds(schema: dict[str, Any]) -> tuple[int | None, int | None]:
    """The least and greatest integer an integer schema allows (None: unbounded), from
    `minimum` / `maximum` and their exclusive forms together (the stricter wins; the C++
    converter reads only one of each pair). A fractional bound is rounded inwards; the
    boolean `exclusiveMinimum` / `exclusiveMaximum` of draft 4 make `minimum` / `maximum`
    exclusive. ValueError when a bound is not a number or no integer is in range."""
    low: int | None = None
    high: int | None = None
    ex_low, ex_high = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if "minimum" in schema:
        m = _bound(schema, "minimum")
        low = math.floor(m) + 1 if ex_low is True else math.ceil(m)
    if "exclusiveMinimum" in schema and not isinstance(ex_low, bool):
        m = math.floor(_bound(schema, "exclusiveMinimum")) + 1
        low = m if low is None else max(low, m)
    if "maximum" in schema:
        m = _bound(schema, "maximum")
        high = math.ceil(m) - 1 if ex_high is True else math.floor(m)
    if "exclusiveMaximum" in schema and not isinstance(ex_high, bool):
        m = math.ceil(_bound(schema, "exclusiveMaximum")) - 1
        high = m if high is None else min(high, m)
    if low is not None and high is not None and low > high:
        given = ", ".join(f"{k} {schema[k]}" for k in BOUND_KEYWORDS if k in schema)
        raise ValueError(f"no integer satisfies {given}")
    return low, high


def _single_all_of(schema: dict[str, Any]) -> Any | None:
    """The one schema of an `allOf` of one, when nothing beside it constrains the value
    (Pydantic writes `{"allOf": [{"$ref": ...}], "description": ...}`): the converter
    would merge only its properties, turning a referenced enum into `{}`."""
    parts = schema.get("allOf")
    if isinstance(parts, list) and len(parts) == 1 \
            and not (ASSERTIONS & (schema.keys() - {"allOf"})):
        return parts[0]
    return None


# llama_grammar has no annotations: through Any, its methods are called without mypy's
# untyped-call errors, and every value taken from them is made a str here.
_Converter: Any = SchemaConverter


class JsonGrammarConverter(_Converter):  # type: ignore[misc]
    """llama-cpp-python's converter, plus: integer bounds (as llama.cpp's C++ converter
    writes them), the other keywords of a schema whose `type` is a list kept for each
    type (as the C++ converter does; the Python one kept only the types), an `allOf` of
    one schema read as that schema, and strings without raw control characters (nor, from
    a pattern's `.`, a raw quote)."""

    def __init__(self) -> None:
        super().__init__(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)

    def visit(self, schema: dict[str, Any], name: str) -> str:
        """One schema's rule, by the parent's dispatch except where this class adds."""
        if isinstance(schema, dict) and not ({"$ref", "oneOf", "anyOf"} & schema.keys()):
            rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
            kind = schema.get("type")
            if "const" in schema or "enum" in schema:
                if isinstance(kind, list):  # the parent would keep only the types
                    return str(super().visit(
                        {k: v for k, v in schema.items() if k != "type"}, name))
            elif isinstance(kind, list):
                return str(self._add_rule(rule_name, " | ".join(
                    self.visit({**schema, "type": t},
                               f"{name}{'-' if name else 'alternative-'}{i}")
                    for i, t in enumerate(kind))))
            elif kind == "integer" and any(k in schema for k in BOUND_KEYWORDS):
                low, high = integer_bounds(schema)
                if low is None and high is None:  # only draft-4 boolean flags
                    return str(super().visit(schema, name))
                return str(self._add_rule(rule_name, f"({int_range(low, high)}) space"))
            elif (part := _single_all_of(schema)) is not None:
                return self.visit(part, name)
        return str(super().visit(schema, name))

    def _add_primitive(self, name: str, rule: BuiltinRule) -> str:
        if rule is PRIMITIVE_RULES["char"]:
            rule = JSON_CHAR
        return str(super()._add_primitive(name, rule))

    def _add_rule(self, name: str, rule: str) -> str:
        if name == "dot" and rule == DOT:  # a pattern's `.`, written raw into a JSON string
            rule = JSON_DOT
        return str(super()._add_rule(name, rule))


def schema_to_gbnf(schema_text: str) -> str:
    """The GBNF grammar (root rule `root`) for a JSON Schema given as JSON text, like
    llama-cpp-python's `json_schema_to_gbnf` but with `JsonGrammarConverter`. Remote
    `$ref`s are refused (never fetched). Raises what the converter raises on a schema it
    cannot turn into a grammar (ValueError, AssertionError, KeyError, ...)."""
    schema = json.loads(schema_text)
    converter = JsonGrammarConverter()
    schema = converter.resolve_refs(schema, "stdin")
    converter.visit(schema, "")
    return str(converter.format_grammar())


def unenforced(schema: Any, path: str = "") -> list[tuple[str, str]]:
    """(JSON Pointer, keyword) of each keyword in `schema` that the grammar from
    `schema_to_gbnf` does not hold a reply to, in document order: what `strict: true`
    must refuse. Mirrors the converter's dispatch: of a schema it reads one branch (a
    `$ref`, an `anyOf`, an enum, an object's properties, an array's items, a string's
    pattern or format or length, a primitive) and drops every other keyword. Enforced,
    beyond the types: `properties` / `required` / `additionalProperties` (false, or a
    schema; left out it allows no other properties, stricter than JSON Schema); `items` /
    `prefixItems` / `minItems` / `maxItems`; `minLength` / `maxLength`; `pattern`
    (anchored with ^...$, else the conversion fails); the formats date, time, date-time
    and uuid; integer bounds; `enum`, `const`; `anyOf` and `oneOf` (as anyOf: alternatives
    that overlap are the schema's own risk); `$ref` within the schema."""
    found: list[tuple[str, str]] = []
    _walk(schema, path, found)
    return list(dict.fromkeys(found))


_NUMERIC = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
                      "multipleOf"})
# Keywords that say nothing of a value of another type (maxLength of a null).
_TYPE_KEYWORDS = {
    "string": frozenset({"minLength", "maxLength", "pattern", "format"}),
    "integer": _NUMERIC,
    "number": _NUMERIC,
    "array": frozenset({"items", "prefixItems", "minItems", "maxItems", "uniqueItems",
                        "contains", "minContains", "maxContains", "additionalItems",
                        "unevaluatedItems"}),
    "object": frozenset({"properties", "required", "additionalProperties",
                         "patternProperties", "minProperties", "maxProperties",
                         "propertyNames", "dependentRequired", "dependentSchemas",
                         "dependencies", "unevaluatedProperties"}),
}


def _flag(schema: dict[str, Any], path: str, allowed: set[str],
          found: list[tuple[str, str]]) -> None:
    kind = schema.get("type")
    vacuous: set[str] = set()
    if isinstance(kind, str):
        for other, words in _TYPE_KEYWORDS.items():
            if other != kind:
                vacuous |= words - _TYPE_KEYWORDS.get(kind, frozenset())
    found.extend((path, k) for k in schema
                 if k in ASSERTIONS and k not in allowed and k not in vacuous)


def _walk(schema: Any, path: str, found: list[tuple[str, str]]) -> None:
    if not isinstance(schema, dict):
        return  # the converter fails on it: an error of its own, strict or not
    for defs in ("$defs", "definitions"):
        if isinstance(schema.get(defs), dict):
            for key, sub in schema[defs].items():
                _walk(sub, f"{path}/{defs}/{_escape(key)}", found)
    kind = schema.get("type")
    if "$ref" in schema:
        _flag(schema, path, {"$ref"}, found)
    elif "oneOf" in schema or "anyOf" in schema:
        key = "oneOf" if schema.get("oneOf") else "anyOf"
        _flag(schema, path, {key}, found)
        for i, sub in enumerate(schema.get(key) or []):
            _walk(sub, f"{path}/{key}/{i}", found)
    elif "const" in schema or "enum" in schema:
        _flag(schema, path, {"const" if "const" in schema else "enum", "type"}, found)
    elif isinstance(kind, list):
        for t in kind:
            _walk({**schema, "type": t}, path, found)
    elif (part := _single_all_of(schema)) is not None:
        _walk(part, f"{path}/allOf/0", found)
    elif kind in (None, "object") and ("properties" in schema or (
            "additionalProperties" in schema and schema["additionalProperties"] is not True)):
        _flag(schema, path, {"type", "properties", "required", "additionalProperties"}, found)
        properties = schema.get("properties") or {}
        if any(r not in properties for r in schema.get("required") or []):
            found.append((path, "required"))  # the grammar writes only listed properties
        for key, sub in properties.items():
            _walk(sub, f"{path}/properties/{_escape(key)}", found)
        if isinstance(schema.get("additionalProperties"), dict):
            _walk(schema["additionalProperties"], f"{path}/additionalProperties", found)
    elif kind in (None, "array") and ("items" in schema or "prefixItems" in schema):
        key = "items" if schema.get("items") else "prefixItems"
        items = schema.get(key)
        if isinstance(items, list):
            _flag(schema, path, {"type", key}, found)
            for i, sub in enumerate(items):
                _walk(sub, f"{path}/{key}/{i}", found)
        else:
            _flag(schema, path, {"type", key, "minItems", "maxItems"}, found)
            _walk(items, f"{path}/{key}", found)
    elif kind in (None, "string") and "pattern" in schema:
        _flag(schema, path, {"type", "pattern"}, found)
    elif kind in (None, "string") and (
            re.match(r"^uuid[1-5]?$", schema.get("format") or "")
            or f"{schema.get('format')}-string" in STRING_FORMAT_RULES):
        _flag(schema, path, {"type", "format"}, found)
    elif kind == "string":
        _flag(schema, path, {"type", "minLength", "maxLength"}, found)
    elif kind == "object":
        allowed = {"type"} | ({"additionalProperties"}
                              if schema.get("additionalProperties") is True else set())
        _flag(schema, path, allowed, found)
    elif kind == "integer":
        _flag(schema, path, {"type", *BOUND_KEYWORDS}, found)
    else:
        _flag(schema, path, {"type"}, found)


def _escape(key: str) -> str:
    """A JSON Pointer reference token (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")

"""Grammars from JSON Schemas (`agent.runtime.json_grammar`), checked with llama.cpp's own
grammar engine: a sampler built from the grammar is fed a text one character-token at a
time and must let every character through and then end-of-generation, exactly when the
text is a JSON value the schema allows. Property-style for integer ranges (many bounds,
every integer near them); then the other things the converter adds, and what `strict`
refuses (`unenforced`)."""

from __future__ import annotations

import ctypes
import json
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest_models import smollm2_gguf_path
from test_openai_compat import SCHEMA

from agent.runtime.json_grammar import (
    INTEGRAL_DIGITS,
    int_range,
    integer_bounds,
    schema_to_gbnf,
    unenforced,
)

Accepts = Callable[[str, str], bool]


@pytest.fixture(scope="module")
def accepts() -> Iterator[Accepts]:
    """accepts(grammar, text): whether llama.cpp's grammar sampler takes `text` whole.
    The vocabulary alone is loaded (SmolLM2's has a token for each ASCII character)."""
    import llama_cpp as lc

    lc.llama_backend_init()
    params = lc.llama_model_default_params()
    params.vocab_only = True
    model = lc.llama_model_load_from_file(str(smollm2_gguf_path()).encode(), params)
    assert model
    vocab = lc.llama_model_get_vocab(model)
    eos = lc.llama_vocab_eos(vocab)
    tokens: dict[str, int] = {}

    def token(ch: str) -> int:
        if ch not in tokens:
            buf = (lc.llama_token * 8)()
            raw = ch.encode()
            n = lc.llama_tokenize(vocab, raw, len(raw), buf, 8, False, True)
            assert n == 1, f"{ch!r} is {n} tokens"
            tokens[ch] = buf[0]
        return tokens[ch]

    def allowed(sampler: Any, tok: int) -> bool:
        data = (lc.llama_token_data * 1)(lc.llama_token_data(tok, 0.0, 0.0))
        array = lc.llama_token_data_array(data, 1, -1, False)
        lc.llama_sampler_apply(sampler, ctypes.byref(array))
        return bool(data[0].logit != float("-inf"))

    def run(grammar: str, text: str) -> bool:
        sampler = lc.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        assert sampler, f"llama.cpp refused the grammar:\n{grammar}"
        try:
            for ch in text:
                if not allowed(sampler, token(ch)):
                    return False
                lc.llama_sampler_accept(sampler, token(ch))
            return allowed(sampler, eos)
        finally:
            lc.llama_sampler_free(sampler)

    yield run
    lc.llama_model_free(model)


EDGES: list[tuple[int | None, int | None]] = [
    (0, 120), (0, 0), (5, 5), (-5, -5), (-7, 7), (-1000, -10), (1, 9), (9, 10), (10, 99),
    (99, 100), (100, 1000), (101, 109), (-100, 100), (-1, 0), (0, 1), (7, 1_000_007),
    (-123456789, -100), (123456789, 987654321), (-(2**53 - 1), 2**53 - 1),
    (0, None), (1, None), (3, None), (9, None), (10, None), (25, None), (100, None),
    (105, None), (1000, None), (1001, None), (2000, None), (-5, None), (-123, None),
    (-100, None), (-1, None), (10**15, None), (10**17, None), (-(10**17), None),
    (None, -5), (None, -100), (None, -105), (None, 0), (None, 1), (None, 30), (None, 100),
    (None, -1), (None, 10**17), (None, -(10**17)),
]


def _random_pairs(n: int) -> list[tuple[int | None, int | None]]:
    rng = random.Random(20240917)

    def value() -> int:
        return rng.choice([1, -1]) * rng.choice([
            rng.randrange(10), rng.randrange(200), rng.randrange(10**4),
            rng.randrange(10**9), 10 ** rng.randrange(1, 15) + rng.randrange(-2, 3)])

    pairs: list[tuple[int | None, int | None]] = []
    for _ in range(n):
        a, b = sorted((value(), value()))
        shape = rng.randrange(4)
        pairs.append((a, b) if shape < 2 else (a, None) if shape == 2 else (None, b))
    return pairs


def _candidates(low: int | None, high: int | None) -> set[int]:
    """Integers near the bounds, near zero, at each power of ten, and a few between."""
    out: set[int] = set()
    for b in (low, high, 0):
        if b is not None:
            out.update(range(b - 25, b + 26))
    for k in range(1, 19):
        for p in (10**k - 1, 10**k, 10**k + 1):
            out.update((p, -p))
    if low is not None and high is not None and high - low > 50:
        rng = random.Random(low ^ high)
        out.update(rng.randrange(low, high) for _ in range(40))
    return out


def _expected(n: int, low: int | None, high: int | None) -> bool:
    """In range; on an open side with at most INTEGRAL_DIGITS digits, as the converter's
    plain `integer` (or one more than the bound has)."""
    if (low is not None and n < low) or (high is not None and n > high):
        return False
    if low is None or high is None:
        bound = low if low is not None else high
        assert bound is not None
        return len(str(abs(n))) <= max(INTEGRAL_DIGITS, len(str(abs(bound))) + 1)
    return True


NOT_INTEGERS = ["", "-", "--1", "+1", "00", "01", "-01", "-00", "007", "1.0", "1e2", "1-",
                " 1", "0x1"]


@pytest.mark.parametrize(("low", "high"), EDGES + _random_pairs(80))
def test_an_integer_range_admits_exactly_the_integers_in_it(
    accepts: Accepts, low: int | None, high: int | None
) -> None:
    schema: dict[str, Any] = {"type": "integer"}
    if low is not None:
        schema["minimum"] = low
    if high is not None:
        schema["maximum"] = high
    grammar = schema_to_gbnf(json.dumps(schema))
    wrong = [n for n in sorted(_candidates(low, high))
             if accepts(grammar, str(n)) != _expected(n, low, high)]
    assert not wrong, f"{schema}: wrong for {wrong[:10]}\n{grammar}"
    taken = [s for s in NOT_INTEGERS if accepts(grammar, s)]
    assert not taken, f"{schema}: took {taken}\n{grammar}"
    zero = (low is None or low <= 0) and (high is None or high >= 0)
    assert not accepts(grammar, "-0") or zero  # JSON's -0 is 0: only where 0 is in range
    some = low if low is not None else high
    assert accepts(grammar, f"{some} ")  # the converter's trailing space rule


@pytest.mark.parametrize(("schema", "low", "high"), [
    ({"exclusiveMinimum": -3, "exclusiveMaximum": 3}, -2, 2),
    ({"minimum": 0.5, "maximum": 9.5}, 1, 9),
    ({"exclusiveMinimum": 0.5, "exclusiveMaximum": 9.5}, 1, 9),
    ({"minimum": 0, "exclusiveMinimum": 4, "maximum": 10, "exclusiveMaximum": 8}, 5, 7),
    ({"minimum": 3, "exclusiveMinimum": True, "maximum": 6, "exclusiveMaximum": True}, 4, 5),
    ({"minimum": -4.0}, -4, None),
    ({"exclusiveMaximum": 0}, None, -1),
])
def test_exclusive_and_fractional_bounds_fold_into_the_stricter_integer_bound(
    accepts: Accepts, schema: dict[str, Any], low: int | None, high: int | None
) -> None:
    full = {"type": "integer", **schema}
    assert integer_bounds(full) == (low, high)
    grammar = schema_to_gbnf(json.dumps(full))
    for n in range(-12, 13):
        assert accepts(grammar, str(n)) == _expected(n, low, high), (schema, n)


@pytest.mark.parametrize("schema", [
    {"type": "integer", "minimum": 5, "maximum": 4},
    {"type": "integer", "exclusiveMinimum": 3, "exclusiveMaximum": 4},
    {"type": "integer", "minimum": "3"},
    {"type": "integer", "maximum": True},
])
def test_bounds_no_integer_meets_or_that_are_not_numbers_are_refused(
    schema: dict[str, Any]
) -> None:
    with pytest.raises(ValueError, match=r"no integer|must be a finite number"):
        schema_to_gbnf(json.dumps(schema))


def test_int_range_needs_a_bound() -> None:
    with pytest.raises(ValueError, match="at least one"):
        int_range(None, None)


PERSON = SCHEMA  # the schema of test_openai_compat's twenty requests


@pytest.mark.parametrize(("age", "ok"), [
    ("0", True), ("42", True), ("120", True), ("121", False), ("1653", False), ("-1", False),
    ("007", False),
])
def test_a_person_s_age_is_held_to_its_range(accepts: Accepts, age: str, ok: bool) -> None:
    """The bug: llama-cpp-python's converter let SmolLM2 answer "age": 1653."""
    grammar = schema_to_gbnf(json.dumps(PERSON))
    text = f'{{"name": "Ann", "age": {age}, "colour": "red"}}'
    assert accepts(grammar, text) == ok


def test_strings_carry_no_raw_control_characters(accepts: Accepts) -> None:
    """The Python converter's `char` took a raw newline, which no JSON parser accepts."""
    grammar = schema_to_gbnf(json.dumps({"type": "string"}))
    assert accepts(grammar, '"a\\nb\\u00e9\\/"')
    assert not accepts(grammar, '"a\nb"')
    assert not accepts(grammar, '"a\tb"')


def test_a_pattern_s_dot_writes_no_quote_into_the_string(accepts: Accepts) -> None:
    grammar = schema_to_gbnf(json.dumps({"type": "string", "pattern": "^a.c$"}))
    assert accepts(grammar, '"abc"') and accepts(grammar, '"a-c"')
    assert not accepts(grammar, '"a"c"') and not accepts(grammar, '"a\\c"')


def test_a_list_of_types_keeps_the_other_keywords(accepts: Accepts) -> None:
    grammar = schema_to_gbnf(json.dumps({"type": ["integer", "null"], "minimum": 0,
                                         "maximum": 9}))
    assert [accepts(grammar, t) for t in ("null", "0", "9", "10", "-1")] == \
        [True, True, True, False, False]
    grammar = schema_to_gbnf(json.dumps({"type": ["string", "null"], "enum": ["a", None]}))
    assert [accepts(grammar, t) for t in ('"a"', "null", '"b"')] == [True, True, False]


def test_an_allof_of_one_reference_is_that_schema(accepts: Accepts) -> None:
    """Pydantic's `{"allOf": [{"$ref": ...}], "description": ...}` around an enum: the
    converter merged the (absent) properties and wrote `{}`."""
    schema = {"type": "object", "properties": {"c": {"allOf": [{"$ref": "#/$defs/C"}],
                                                     "description": "a colour"}},
              "required": ["c"], "$defs": {"C": {"enum": ["red", "blue"]}}}
    grammar = schema_to_gbnf(json.dumps(schema))
    assert accepts(grammar, '{"c": "red"}') and not accepts(grammar, '{"c": {}}')


def test_a_remote_reference_is_never_fetched() -> None:
    with pytest.raises(AssertionError, match="not allowed"):
        schema_to_gbnf(json.dumps({"$ref": "https://example.com/elsewhere.json"}))


@pytest.mark.parametrize("schema", [
    PERSON,
    {"type": "object", "title": "t", "description": "d", "examples": [{}], "x-extra": 1,
     "properties": {"id": {"type": "string", "format": "uuid"},
                    "at": {"type": "string", "format": "date-time"},
                    "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
                    "n": {"type": "integer", "exclusiveMinimum": 0, "default": 3},
                    "x": {"type": "number"}, "ok": {"type": "boolean"},
                    "kind": {"anyOf": [{"const": "a"}, {"type": "null"}]},
                    "pair": {"type": "array", "prefixItems": [{"type": "integer"},
                                                              {"type": "string"}]},
                    "ref": {"$ref": "#/$defs/R", "description": "r"}},
     "required": ["id"], "additionalProperties": {"type": "integer", "maximum": 3},
     "$defs": {"R": {"type": ["string", "null"], "maxLength": 4}}},
    {"type": "object", "additionalProperties": True},
    {"type": "integer", "maxLength": 3, "items": {}},  # keywords of other types say nothing
    {"allOf": [{"$ref": "#/$defs/R"}], "title": "wrapped", "$defs": {"R": {"enum": [1]}}},
])
def test_a_schema_the_grammar_holds_has_nothing_unenforced(schema: dict[str, Any]) -> None:
    assert unenforced(schema) == []


@pytest.mark.parametrize(("schema", "found"), [
    ({"type": "number", "minimum": 0, "maximum": 1}, [("", "minimum"), ("", "maximum")]),
    ({"type": "object", "properties": {"price": {"type": "number", "multipleOf": 0.01}}},
     [("/properties/price", "multipleOf")]),
    ({"type": "object", "properties": {"a/b": {"type": "integer", "multipleOf": 2}}},
     [("/properties/a~1b", "multipleOf")]),
    ({"type": "string", "format": "email"}, [("", "format")]),
    ({"type": "string", "pattern": "^a+$", "maxLength": 3}, [("", "maxLength")]),
    ({"type": "string", "format": "date", "minLength": 3}, [("", "minLength")]),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a", "b"]},
     [("", "required")]),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "minProperties": 1,
      "patternProperties": {"^x": {}}}, [("", "minProperties"), ("", "patternProperties")]),
    ({"type": "object", "required": ["a"]}, [("", "required")]),
    ({"type": "array", "maxItems": 3}, [("", "maxItems")]),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
     [("", "uniqueItems")]),
    ({"type": "array", "items": [{"type": "integer"}], "minItems": 1}, [("", "minItems")]),
    ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}},
                {"required": ["a"]}]}, [("", "allOf")]),
    ({"$ref": "#/$defs/A", "minimum": 1, "$defs": {"A": {"type": "integer"}}},
     [("", "minimum")]),
    ({"$defs": {"A": {"type": "number", "maximum": 1}}, "$ref": "#/$defs/A"},
     [("/$defs/A", "maximum")]),
    ({"anyOf": [{"type": "string"}, {"type": "number", "minimum": 0}], "not": {}},
     [("", "not"), ("/anyOf/1", "minimum")]),
    ({"enum": ["aa", "b"], "maxLength": 1}, [("", "maxLength")]),
    ({"type": ["number", "null"], "maximum": 1}, [("", "maximum")]),
])
def test_what_the_grammar_cannot_hold_is_named_with_its_place(
    schema: dict[str, Any], found: list[tuple[str, str]]
) -> None:
    assert unenforced(schema) == found

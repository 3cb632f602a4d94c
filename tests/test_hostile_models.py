"""Hostile model files: what a model file can make the agent do is read it, refuse it with
one clear line, or run its chat template in a metered sandbox — never read outside the
store, run Python, loop, or take memory in proportion to what the file claims.

(Malformed-file refusals that are plain format errors — truncation, bad magic, unknown
types, split files — are in test_importers.py; ONNX side files in test_registry_files.py.)
"""

from __future__ import annotations

import struct
import time
import tracemalloc
from pathlib import Path

import pytest
from conftest_models import gguf_header_bytes, gguf_str, make_sparse_file

from agent.errors import ChatNotSupported
from agent.runtime.templates import (
    RENDER_SECONDS,
    JinjaFormat,
    TemplateBudgetExceeded,
    chat_format_for,
)
from agent.runtime.types import ChatMessage
from registry.errors import InvalidModelFile
from registry.importers import read_metadata

U8, U64, STRING, ARRAY = 0, 10, 8, 9
ARCH = ("general.architecture", STRING, gguf_str("llama"))


def peak_bytes(fn: object) -> tuple[object, int]:
    """fn()'s result (or the exception it raised) and the peak of Python allocations."""
    tracemalloc.start()
    try:
        try:
            result: object = fn()  # type: ignore[operator]
        except Exception as exc:  # returned for the caller to assert on
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# -- GGUF headers that claim more than they hold ------------------------------------------


def test_nested_empty_arrays_are_refused_without_building_them(tmp_path: Path) -> None:
    """The review's 48 MB file of 4 million nested empty arrays (431 MB RSS at import):
    llama.cpp refuses arrays of arrays, so do we, at the first one."""
    inner = struct.pack("<IQ", U8, 0)
    middle = struct.pack("<IQ", ARRAY, 1000) + inner * 1000
    path = tmp_path / "nested.gguf"
    path.write_bytes(gguf_header_bytes([ARCH, ("x", ARRAY, struct.pack("<IQ", ARRAY, 4000)
                                               + middle * 4000)]))
    assert path.stat().st_size > 48_000_000
    result, peak = peak_bytes(lambda: read_metadata(path))
    assert isinstance(result, InvalidModelFile)
    assert "metadata 'x' is an array of arrays, which llama.cpp cannot load" in str(result)
    assert peak < 1 << 20, peak


def test_a_gigabyte_metadata_string_is_skipped_not_decoded(tmp_path: Path) -> None:
    """A 1 GiB chat template (a sparse file: no disk used) is stepped over, not read into
    memory: the model imports as one without a template."""
    size = 1 << 30
    head = gguf_header_bytes([ARCH, ("tokenizer.chat_template", STRING,
                                     struct.pack("<Q", size))])
    path = make_sparse_file(tmp_path / "big-string.gguf", len(head) + size, head=head)
    result, peak = peak_bytes(lambda: read_metadata(path))
    assert not isinstance(result, Exception), result
    assert result.architecture == "llama"  # type: ignore[attr-defined]
    assert result.chat_template is None  # type: ignore[attr-defined]
    assert peak < 4 << 20, peak


def test_a_gigabyte_key_or_tensor_name_is_refused(tmp_path: Path) -> None:
    size = 1 << 30
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", size)
    path = make_sparse_file(tmp_path / "big-key.gguf", len(head) + size + 16, head=head)
    result, peak = peak_bytes(lambda: read_metadata(path))
    assert isinstance(result, InvalidModelFile)
    assert f"has a name of {size} bytes" in str(result)
    assert peak < 1 << 20, peak


@pytest.mark.parametrize(("tensors", "message"), [
    # a count of 2^60 tensor infos in a file of a few bytes
    ("count", "tensor info 1 of 1152921504606846976"),
    # dimensions whose product is 2^124 elements
    ("dims", "truncated at tensor data (expected"),
    ("ndims", "has 9 dimensions (at most 4)"),
])
def test_absurd_tensor_counts_and_dimensions_are_refused_at_once(
    tmp_path: Path, tensors: str, message: str,
) -> None:
    path = tmp_path / f"{tensors}.gguf"
    if tensors == "count":
        data = b"GGUF" + struct.pack("<IQQ", 3, 1 << 60, 0)
    elif tensors == "dims":
        data = gguf_header_bytes([ARCH], [("w", [1 << 62, 1 << 62], 0, 0)]) + b"\0" * 64
    else:
        data = gguf_header_bytes([ARCH], [("w", [1] * 9, 0, 0)]) + b"\0" * 64
    path.write_bytes(data)
    start = time.monotonic()
    result, peak = peak_bytes(lambda: read_metadata(path))
    assert isinstance(result, InvalidModelFile) and message in str(result), result
    assert time.monotonic() - start < 5
    assert peak < 1 << 20, peak


# -- chat templates: code from a model file ------------------------------------------------

HOSTILE_TEMPLATES = {
    # reach Python through the sandbox
    "class-walk": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "globals": "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "self-module": "{{ self._TemplateReference__context.environment }}",
    # loop or recurse
    "nested-loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                    "{% endfor %}",
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    # build huge values in one step or by doubling
    "repeat": "{{ 'x' * 1000000000 }}",
    "repeat-list": "{% for m in messages * 10000000 %}{{ m }}{% endfor %}",
    "power": "{{ 10 ** 100000000 }}",
    "doubling-tilde": "{% set ns = namespace(s='ab') %}{% for i in range(60) %}"
                      "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "doubling-plus": "{% set s = 'ab' %}" + "{% set s = s + s %}" * 45 + "{{ s }}",
    "center": "{{ 'x' | center(1000000000) }}",
    "ljust": "{{ 'x'.ljust(1000000000) }}",
    "format-width": "{{ '{:>1000000000}'.format('x') }}",
    "percent-width": "{{ '%1000000000s' % 'x' }}",
    "format-filter": "{{ '%1000000000s' | format('x') }}",
    "long-output": "{% for i in range(150000) %}xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx{% endfor %}",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_TEMPLATES))
def test_a_hostile_chat_template_is_refused_when_the_model_loads(name: str) -> None:
    import jinja2

    start = time.monotonic()
    result, peak = peak_bytes(lambda: JinjaFormat(HOSTILE_TEMPLATES[name], bos_token="<s>",
                                                  eos_token="</s>"))
    took = time.monotonic() - start
    assert isinstance(result, (TemplateBudgetExceeded, RecursionError, jinja2.TemplateError)), \
        result
    assert took < RENDER_SECONDS + 1, took
    assert peak < 64 << 20, peak
    # The model stays usable with its architecture's known format (or none), with a warning.
    fallback = chat_format_for(HOSTILE_TEMPLATES[name], "qwen2", bos_token="", eos_token="")
    assert fallback is not None and not isinstance(fallback, JinjaFormat)
    assert chat_format_for(HOSTILE_TEMPLATES[name], "llama", bos_token="",
                           eos_token="") is None


def test_a_template_that_is_costly_only_for_some_messages_refuses_those_requests() -> None:
    """Fine for the load-time sample, exponential in the conversation it is given: that
    request gets a clear refusal (400 at the API) and the next one is served."""
    template = ("{% for m in messages %}{% set ns = namespace(s=m['content']) %}"
                "{% for i in range((m['content'] | length) - 20) %}{% set ns.s = ns.s ~ ns.s %}"
                "{% endfor %}{{ ns.s }}{% endfor %}")
    fmt = JinjaFormat(template, bos_token="", eos_token="</s>")
    with pytest.raises(ChatNotSupported, match="could not render these messages"):
        fmt([ChatMessage(role="user", content="x" * 40)])
    assert fmt([ChatMessage(role="user", content="ab" * 11)]).text == "ab" * 44


def test_ordinary_templates_render_as_before() -> None:
    """The meter changes nothing for a real template: SmolLM2's own, through llama-cpp-
    python's formatter (the reference) and ours."""
    from conftest_models import smollm2_gguf_path
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = read_metadata(smollm2_gguf_path()).chat_template
    assert template
    ours = JinjaFormat(template, bos_token="<s>", eos_token="<|im_end|>")
    reference = Jinja2ChatFormatter(template=template, bos_token="<s>", eos_token="<|im_end|>")
    for convo in ([("user", "hi")],
                  [("system", "be brief"), ("user", "hi"), ("assistant", "yo"),
                   ("user", "a 1000000% " + "long " * 2000)]):
        got = ours([ChatMessage(role=r, content=c) for r, c in convo]).text
        want = reference(messages=[{"role": r, "content": c}  # type: ignore[misc]
                                   for r, c in convo]).prompt
        assert got == want


# -- ONNX external data --------------------------------------------------------------------


@pytest.mark.parametrize("location", ["../../etc/shadow", "/etc/shadow", "sub/../../x.data",
                                      "..", ".hidden.data"])
def test_onnx_external_data_outside_its_folder_is_refused(tmp_path: Path, location: str) -> None:
    """Neither the importer nor anything after it reads a file the model names outside its
    own folder: the import is refused before any side file is opened."""
    import onnx
    from conftest_models import make_tiny_onnx

    from registry.service import open_registry

    folder = tmp_path / "model"
    folder.mkdir()
    path = make_tiny_onnx(folder / "model.onnx", external_data=True)
    model = onnx.load_model(str(path), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save_model(model, str(path))
    with pytest.raises(InvalidModelFile, match=r"external data location .* is not a file in "
                                               r"the model's own folder"):
        read_metadata(path)
    reg = open_registry(tmp_path / "home")
    try:
        with pytest.raises(InvalidModelFile, match="is not a file in the model's own folder"):
            reg.import_file(folder, alias="emb")
        assert reg.list_models() == []
    finally:
        reg.close()

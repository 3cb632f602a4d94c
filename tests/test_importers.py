"""registry.importers: metadata from real and tiny GGUF/ONNX files; broken files refused."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import gguf
import pytest
from conftest_models import (
    SMOLLM2_SIZE,
    gguf_header_bytes,
    gguf_str,
    make_empty_file,
    make_random_file,
    make_text_file,
    make_tiny_gguf,
    make_tiny_onnx,
    make_truncated_copy,
    minilm_int8_onnx_path,
    smollm2_gguf_path,
)

from registry.errors import InvalidModelFile, RegistryError
from registry.importers import FileMetadata, ftype_name, read_metadata, slugify

ALIAS_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
U8, U32, STRING, ARRAY = 0, 4, 8, 9


def invalid(path: Path) -> str:
    """The message read_metadata refuses `path` with (checked to be one line)."""
    with pytest.raises(InvalidModelFile) as info:
        read_metadata(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    return message


# -- real models ------------------------------------------------------------------------


def test_smollm2_gguf() -> None:
    meta = read_metadata(smollm2_gguf_path())
    assert meta.format == "gguf"
    assert meta.architecture == "llama"
    assert meta.quantization == "Q4_1"
    assert meta.context_length == 8192
    assert meta.chat_template and "<|im_start|>" in meta.chat_template
    assert meta.parameter_count is not None
    assert 100_000_000 < meta.parameter_count < 200_000_000
    assert meta.size_label == "135M"
    assert meta.license == "apache-2.0"
    assert (meta.n_layers, meta.n_embd, meta.n_head, meta.n_head_kv) == (30, 576, 9, 3)
    assert meta.file_size == SMOLLM2_SIZE
    assert meta.bits_per_weight == pytest.approx(SMOLLM2_SIZE * 8 / meta.parameter_count, 1e-3)
    assert meta.suggested_task() == "chat"
    assert ALIAS_RE.match(meta.suggested_alias("SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.mark.slow
def test_gemma3_gguf_has_no_chat_template(gemma3_gguf: Path) -> None:
    meta = read_metadata(gemma3_gguf)
    assert meta.architecture == "gemma3"
    assert meta.quantization == "Q4_K_M"
    assert meta.context_length == 32768
    assert meta.chat_template is None
    assert meta.suggested_task() == "completion"
    assert meta.parameter_count is not None
    assert 200_000_000 < meta.parameter_count < 350_000_000
    # Gemma 3's head size is not n_embd / n_head (640 / 4); the file says so.
    assert (meta.n_embd, meta.n_head, meta.n_head_kv, meta.key_length) == (640, 4, 1, 256)


def test_minilm_int8_onnx() -> None:
    meta = read_metadata(minilm_int8_onnx_path())
    assert meta.format == "onnx"
    assert [io.name for io in meta.onnx_inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(io.elem_type == "int64" for io in meta.onnx_inputs)
    assert meta.onnx_inputs[0].shape == ["batch", "sequence"]
    assert [io.name for io in meta.onnx_outputs] == ["last_hidden_state"]
    assert meta.onnx_outputs[0].shape == ["batch", "sequence", 384]
    assert meta.n_embd == 384
    assert meta.quantization == "int8"
    assert meta.weight_types["int8"] > 0
    assert meta.opset is not None and meta.opset >= 11
    assert meta.ir_version and meta.producer
    assert meta.parameter_count is not None
    assert 20_000_000 < meta.parameter_count < 25_000_000
    assert meta.suggested_task() == "embedding"


@pytest.mark.slow
def test_gguf_parser_agrees_with_gguf_reader() -> None:
    """We parse the header ourselves (fast); gguf.GGUFReader is the reference."""
    path = smollm2_gguf_path()
    meta = read_metadata(path)
    reader = gguf.GGUFReader(path, "r")

    def contents(key: str) -> object:
        field = reader.get_field(key)
        assert field is not None
        return field.contents()

    assert meta.parameter_count == sum(int(t.n_elements) for t in reader.tensors)
    assert meta.architecture == contents("general.architecture")
    assert meta.name == contents("general.name")
    assert meta.chat_template == contents("tokenizer.chat_template")
    assert meta.context_length == contents("llama.context_length")
    assert meta.n_head_kv == contents("llama.attention.head_count_kv")
    assert meta.quantization == ftype_name(int(contents("general.file_type")))  # type: ignore[call-overload]


# -- tiny valid files -------------------------------------------------------------------


def test_tiny_gguf_with_chat_template_is_chat(tmp_path: Path) -> None:
    path = make_tiny_gguf(tmp_path / "tiny.gguf", chat_template="{{ messages }}", license="mit")
    meta = read_metadata(path)
    assert meta.architecture == "llama"
    assert meta.name == "Tiny Test Model"
    assert meta.quantization == "F32"
    assert meta.parameter_count == 32 * 16 + 3 * 16
    assert (meta.context_length, meta.n_layers, meta.n_embd) == (256, 2, 16)
    assert (meta.n_head, meta.n_head_kv) == (4, 2)
    assert meta.chat_template == "{{ messages }}"
    assert meta.license == "mit"
    assert meta.suggested_task() == "chat"
    assert meta.suggested_alias("ignored.gguf") == "tiny-test-model"


def test_tiny_gguf_without_template_is_completion(tmp_path: Path) -> None:
    meta = read_metadata(make_tiny_gguf(tmp_path / "t.gguf", arch="gemma3"))
    assert meta.architecture == "gemma3"
    assert meta.context_length == 256  # read from gemma3.context_length
    assert meta.chat_template is None
    assert meta.suggested_task() == "completion"


def test_gguf_defaults_when_the_file_is_silent(tmp_path: Path) -> None:
    path = make_tiny_gguf(
        tmp_path / "My Model v2.gguf", name=None, file_type=None, head_count_kv=None
    )
    meta = read_metadata(path)
    assert meta.quantization == "F32"  # from the tensors, lacking general.file_type
    assert meta.n_head_kv == meta.n_head == 4  # llama.cpp's default
    assert meta.name is None
    assert meta.suggested_alias(path.name) == "my-model-v2"


def test_format_is_decided_by_content_not_name(tmp_path: Path) -> None:
    assert read_metadata(make_tiny_gguf(tmp_path / "model.onnx")).format == "gguf"
    assert read_metadata(make_tiny_onnx(tmp_path / "model.gguf")).format == "onnx"
    assert read_metadata(make_tiny_gguf(tmp_path / "model")).format == "gguf"


@pytest.mark.parametrize(
    ("weight_dtype", "quantization", "quant_ops"),
    [
        ("float32", "fp32", {}),
        ("float16", "fp16", {}),
        ("int8", "int8", {"DequantizeLinear": 1}),
    ],
)
def test_tiny_onnx_quantization(
    tmp_path: Path, weight_dtype: str, quantization: str, quant_ops: dict[str, int]
) -> None:
    meta = read_metadata(make_tiny_onnx(tmp_path / "m.onnx", weight_dtype=weight_dtype))
    assert meta.quantization == quantization
    assert meta.quant_ops == quant_ops
    assert meta.opset == 17
    assert meta.ir_version == 8
    assert meta.producer == "edge-agent-tests 1"
    assert meta.parameter_count == 64 * 8 + (1 if weight_dtype == "int8" else 0)
    assert meta.suggested_task() == "embedding"


def test_tiny_onnx_weight_types_count_initializers(tmp_path: Path) -> None:
    meta = read_metadata(make_tiny_onnx(tmp_path / "m.onnx", weight_dtype="int8"))
    assert meta.weight_types == {"int8": 1, "float32": 1}


def test_onnx_with_unknown_outputs_has_no_suggested_task(tmp_path: Path) -> None:
    meta = read_metadata(make_tiny_onnx(tmp_path / "m.onnx", output_name="logits"))
    assert meta.suggested_task() is None


def test_onnx_external_data_is_not_loaded(tmp_path: Path) -> None:
    path = make_tiny_onnx(tmp_path / "m.onnx", external_data=True)
    (tmp_path / "m.onnx.data").unlink()
    meta = read_metadata(path)
    assert meta.parameter_count == 64 * 8
    assert meta.quantization == "fp32"
    assert meta.external_data == ["m.onnx.data"]
    assert meta.bits_per_weight is None  # the file alone says nothing about weight size


def test_self_contained_onnx_has_no_external_data(tmp_path: Path) -> None:
    assert read_metadata(make_tiny_onnx(tmp_path / "m.onnx")).external_data == []


# -- broken files -----------------------------------------------------------------------


def test_truncated_gguf_says_how_much_is_missing(tmp_path: Path) -> None:
    path = make_truncated_copy(smollm2_gguf_path(), tmp_path / "x.gguf", 4 << 20)
    message = invalid(path)
    assert message == (
        f"{path} is not a valid GGUF file: truncated at tensor data "
        f"(expected {SMOLLM2_SIZE} bytes, found {4 << 20})"
    )


def test_gguf_truncated_in_header(tmp_path: Path) -> None:
    path = make_truncated_copy(smollm2_gguf_path(), tmp_path / "x.gguf", 1000)
    assert "truncated in the header" in invalid(path)


def test_tiny_gguf_missing_its_last_byte(tmp_path: Path) -> None:
    full = make_tiny_gguf(tmp_path / "full.gguf")
    size = full.stat().st_size
    path = make_truncated_copy(full, tmp_path / "cut.gguf", size - 1)
    assert f"truncated at tensor data (expected {size} bytes, found {size - 1})" in invalid(path)


def test_text_file_renamed_gguf(tmp_path: Path) -> None:
    message = invalid(make_text_file(tmp_path / "notes.gguf"))
    assert "is not a valid GGUF file" in message
    assert "text file" in message


def test_empty_file(tmp_path: Path) -> None:
    assert invalid(make_empty_file(tmp_path / "e.gguf")).endswith(
        "is not a valid GGUF file: the file is empty"
    )
    assert "the file is empty" in invalid(make_empty_file(tmp_path / "e.bin"))


def test_random_bytes(tmp_path: Path) -> None:
    assert "is not a valid ONNX file" in invalid(
        make_random_file(tmp_path / "r.onnx", first=b"\x01")
    )
    assert "is not a GGUF or ONNX model file" in invalid(
        make_random_file(tmp_path / "r.bin", first=b"\x01")
    )


def test_corrupt_onnx_protobuf(tmp_path: Path) -> None:
    # Starts like a ModelProto (ir_version tag), so it reaches the protobuf parser.
    path = make_random_file(tmp_path / "c.onnx", first=b"\x08\x07")
    assert "cannot parse it as an ONNX protobuf" in invalid(path)


def test_onnx_protobuf_without_a_graph(tmp_path: Path) -> None:
    path = tmp_path / "v.onnx"
    path.write_bytes(b"\x08\x08")  # ir_version = 8 and nothing else
    assert "holds no ONNX graph" in invalid(path)


def test_other_formats_get_a_hint(tmp_path: Path) -> None:
    zip_file = make_random_file(tmp_path / "pytorch_model.bin", first=b"PK\x03\x04")
    assert "zip archive" in invalid(zip_file)
    safetensors = tmp_path / "model.safetensors"
    safetensors.write_bytes(struct.pack("<Q", 20) + b'{"__metadata__":{}}' + b" " * 64)
    assert "safetensors" in invalid(safetensors)


def test_gguf_huge_array_count_fails_fast(tmp_path: Path) -> None:
    path = tmp_path / "bogus.gguf"
    huge = 1 << 62
    path.write_bytes(
        gguf_header_bytes(
            [
                ("a", ARRAY, struct.pack("<IQ", U8, huge)),
                ("b", ARRAY, struct.pack("<IQ", STRING, huge) + gguf_str("x")),
            ]
        )
    )
    assert "metadata 'a' runs past the end of the file" in invalid(path)
    path.write_bytes(gguf_header_bytes([("b", ARRAY, struct.pack("<IQ", STRING, huge))]))
    assert "metadata 'b' runs past the end of the file" in invalid(path)


def test_gguf_unknown_tensor_type(tmp_path: Path) -> None:
    path = tmp_path / "new.gguf"
    arch = ("general.architecture", STRING, gguf_str("llama"))
    path.write_bytes(gguf_header_bytes([arch], [("w", [4, 4], 9999, 0)]) + b"\0" * 4096)
    assert "tensor 'w' has type 9999" in invalid(path)


def test_gguf_unsupported_version_and_duplicate_key(tmp_path: Path) -> None:
    path = tmp_path / "v1.gguf"
    path.write_bytes(gguf_header_bytes([], version=1))
    assert "GGUF version 1 is not supported" in invalid(path)
    path.write_bytes(gguf_header_bytes([("k", U32, b"\1\0\0\0"), ("k", U32, b"\2\0\0\0")]))
    assert "metadata key 'k' appears twice" in invalid(path)


def test_gguf_without_architecture(tmp_path: Path) -> None:
    path = tmp_path / "noarch.gguf"
    path.write_bytes(gguf_header_bytes([("general.name", STRING, gguf_str("x"))]))
    assert "general.architecture is missing" in invalid(path)


def test_split_gguf_part_is_refused(tmp_path: Path) -> None:
    path = make_tiny_gguf(
        tmp_path / "m-00001-of-00003.gguf", extra={"split.count": 3, "split.no": 0}
    )
    assert "part 1 of a model split in 3 files" in invalid(path)


def test_invalid_model_file_is_a_registry_error() -> None:
    assert issubclass(InvalidModelFile, RegistryError)


# -- names --------------------------------------------------------------------------------

BRIEF_FTYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
}  # fmt: skip


def test_ftype_names_follow_llama_file_type() -> None:
    assert {n: ftype_name(n) for n in BRIEF_FTYPES} == BRIEF_FTYPES
    assert ftype_name(15 | int(gguf.LlamaFileType.GUESSED)) == "Q4_K_M"
    assert ftype_name(9999) is None


@pytest.mark.parametrize(
    ("name", "basename", "size", "filename", "alias"),
    [
        # derived aliases are short (<= 24, cut at a word) and the same for every variant
        ("Smollm2 135M 8k Lc100K Mix1 Ep2", "smollm2", "135M", "x.gguf", "smollm2-135m"),
        ("Smollm2 135M 8k Lc100K Mix1 Ep2", None, None, "x.gguf", "smollm2-135m-8k-lc100k"),
        ("Qwen3 0.6B", None, "0.6B", "x.gguf", "qwen3-0.6b"),
        (None, "gemma-3", "270M", "x.gguf", "gemma-3-270m"),
        (None, None, None, "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
        (None, None, None, "Qwen3-0.6B-Q8_0.gguf", "qwen3-0.6b"),
        ("Café Crème 1.5B", None, None, "x.gguf", "cafe-creme-1.5b"),
        ("!!!", None, None, "--Weird__Name--.onnx", "weird__name"),
        ("", None, None, "", "model"),
        ("A" * 100, None, None, "x.gguf", "a" * 24),
        ("x" * 63 + "-y", None, None, "x.gguf", "x" * 24),
        ("Long", "some-very-long-model-name", "70B", "x", "some-very-long-model-70b"),
    ],
)
def test_suggested_alias(
    name: str | None, basename: str | None, size: str | None, filename: str, alias: str
) -> None:
    meta = FileMetadata(format="gguf", file_size=1, quantization="F32", name=name,
                        basename=basename, size_label=size)
    assert meta.suggested_alias(filename) == alias
    assert ALIAS_RE.match(alias) and len(alias) <= 24


def test_slugify_never_starts_or_ends_with_punctuation() -> None:
    assert slugify("..hidden..") == "hidden"
    assert slugify("日本語") == ""

"""Reading what a model file states about itself: GGUF and ONNX metadata, as `FileMetadata`.

The format is decided by content (GGUF magic, ONNX protobuf), never by file name. Anything
that is not a complete, readable model raises `InvalidModelFile` with a one-line reason.
"""

from __future__ import annotations

import importlib.metadata
import mmap
import re
import struct
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import onnx
from pydantic import BaseModel, ConfigDict, Field

from registry.errors import InvalidModelFile
from registry.types import BITS_PER_WEIGHT, Format, Task

__all__ = ["ALIAS_MAX", "FileMetadata", "TensorIO", "ftype_name", "read_metadata", "slugify"]

# Longest alias derived from a file (one typed with --alias may be longer): short enough to
# type, and to show in `models list` without cutting.
ALIAS_MAX = 24

# Quantization and format names as they appear in names and file names ("...-Q4_K_M.gguf",
# "Qwen3-0.6B-GGUF"): dropped from derived aliases, so every variant of a model gets one.
_QUANT_TOKEN = re.compile(
    r"(^|[-._\s])(?:" + "|".join(re.escape(q) for q in sorted(
        {*BITS_PER_WEIGHT, "gguf", "onnx"}, key=len, reverse=True)) + r")(?=$|[-._\s])",
    re.IGNORECASE,
)

# Output names that mark an ONNX model as a text-embedding model.
EMBEDDING_OUTPUTS = frozenset(
    {"last_hidden_state", "sentence_embedding", "token_embeddings", "embeddings"}
)

# ONNX ops whose presence means the graph computes with quantized integers.
ONNX_QUANT_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "ConvInteger",
        "QLinearMatMul",
        "QLinearConv",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "MatMulNBits",
        "QAttention",
    }
)


class TensorIO(BaseModel):
    """One input or output of an ONNX graph."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    elem_type: str = Field(description="numpy-style element type, e.g. 'int64', 'float32'.")
    shape: list[int | str | None] | None = Field(
        default=None,
        description="Dimensions: an int if fixed, the symbol (e.g. 'batch') if named, None if "
        "unknown; None for the whole shape if the graph gives none.",
    )


class FileMetadata(BaseModel):
    """What one GGUF or ONNX file states about the model in it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Format
    file_size: int = Field(ge=0, description="Bytes on disk.")
    architecture: str | None = Field(default=None, description="GGUF general.architecture.")
    name: str | None = Field(default=None, description="GGUF general.name.")
    basename: str | None = Field(
        default=None, description="GGUF general.basename: the model's name without its size, "
        "fine-tune or version, e.g. 'smollm2'."
    )
    parameter_count: int | None = Field(
        default=None, ge=0, description="Sum of tensor (GGUF) or initializer (ONNX) elements."
    )
    size_label: str | None = Field(default=None, description="GGUF general.size_label, e.g. 135M.")
    quantization: str = Field(
        description="GGUF file type (Q4_K_M, F16, ...) or ONNX weight type (int8, fp16, fp32)."
    )
    bits_per_weight: float | None = Field(
        default=None, description="File size in bits per parameter, metadata included."
    )
    context_length: int | None = None
    n_layers: int | None = Field(default=None, description="GGUF <arch>.block_count.")
    n_embd: int | None = Field(
        default=None,
        description="GGUF <arch>.embedding_length; ONNX: last dimension of an embedding output.",
    )
    n_head: int | None = Field(default=None, description="Attention heads (max over layers).")
    n_head_kv: int | None = Field(
        default=None, description="KV heads (max over layers); n_head when the file omits it."
    )
    key_length: int | None = Field(
        default=None,
        description="GGUF attention.key_length: per-head K size when not n_embd / n_head "
        "(Gemma 3: 256, not 160).",
    )
    value_length: int | None = Field(default=None, description="GGUF attention.value_length.")
    chat_template: str | None = Field(default=None, description="GGUF tokenizer.chat_template.")
    license: str | None = None
    onnx_inputs: list[TensorIO] = Field(default_factory=list)
    onnx_outputs: list[TensorIO] = Field(default_factory=list)
    opset: int | None = Field(default=None, description="ONNX opset of the default domain.")
    ir_version: int | None = None
    producer: str | None = Field(default=None, description="ONNX producer name and version.")
    weight_types: dict[str, int] = Field(
        default_factory=dict, description="ONNX initializer count per element type."
    )
    quant_ops: dict[str, int] = Field(
        default_factory=dict, description="ONNX quantization op counts, e.g. MatMulInteger."
    )
    external_data: list[str] = Field(
        default_factory=list,
        description="ONNX: side files holding weights (relative paths); this file alone will "
        "not run.",
    )

    def suggested_task(self) -> Task | None:
        """The task the file implies; None when it does not say (ask the user)."""
        if self.format == "gguf":
            return "chat" if self.chat_template else "completion"
        if any(io.name in EMBEDDING_OUTPUTS for io in self.onnx_outputs):
            return "embedding"
        return None

    def suggested_alias(self, filename: str | Path) -> str:
        """A short, stable alias for a file imported without --alias: general.basename
        with the size label ('smollm2-135m'), else general.name, else the file (or folder)
        name; quantization and format names dropped so every variant of a model derives the
        same alias; [a-z0-9._-], at most ALIAS_MAX characters, cut at a word boundary.
        general.name alone gave 'smollm2-135m-8k-lc100k-mix1-ep2' (the fine-tune's label),
        which nobody types twice alike."""
        label = slugify(self.size_label or "")
        base = slugify(_QUANT_TOKEN.sub("", self.basename or self.name or "")) or \
            slugify(_QUANT_TOKEN.sub("", Path(filename).stem if filename else ""))
        if not base:
            return label[:ALIAS_MAX] or "model"
        if not label or label in base.split("-") or len(label) > ALIAS_MAX // 2:
            return _cut(base, ALIAS_MAX)
        return f"{_cut(base, ALIAS_MAX - len(label) - 1)}-{label}"


def _cut(slug: str, n: int) -> str:
    """`slug` in at most `n` characters, cut at the last '-' that fits when there is one."""
    if len(slug) <= n:
        return slug
    head = slug[: n + 1]
    cut = head.rsplit("-", 1)[0] if "-" in head else slug[:n]
    return cut.rstrip("-._") or slug[:n].rstrip("-._")


def slugify(text: str, max_len: int = 64) -> str:
    """Lowercase [a-z0-9._-] starting and ending with a letter or digit; may be empty."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9._-]+", "-", ascii_text.lower())
    slug = re.sub(r"-{2,}", "-", slug).strip("-._")
    return slug[:max_len].rstrip("-._")


def read_metadata(path: Path) -> FileMetadata:
    """Read a model file's metadata; raise InvalidModelFile unless it is a complete model."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(16)
    if size == 0:
        raise _invalid(path, _kind_from_suffix(path), "the file is empty")
    if head.startswith(b"GGUF"):
        return _read_gguf(path, size)
    if head[0] == 0x08:  # protobuf tag of ModelProto.ir_version, which onnx writes first
        return _read_onnx(path, size)
    raise _invalid(path, _kind_from_suffix(path), _describe_unknown(head, size))


# -- messages --------------------------------------------------------------------------


def _invalid(path: Path, kind: str | None, reason: str) -> InvalidModelFile:
    reason = " ".join(reason.split())  # one line, whatever a library put in its message
    if kind is None:
        return InvalidModelFile(f"{path} is not a GGUF or ONNX model file: {reason}")
    return InvalidModelFile(f"{path} is not a valid {kind} file: {reason}")


def _kind_from_suffix(path: Path) -> str | None:
    # Only for wording the error: the name is a hint about what the user meant to give us.
    return {".gguf": "GGUF", ".onnx": "ONNX"}.get(path.suffix.lower())


def _describe_unknown(head: bytes, size: int) -> str:
    if head.startswith(b"PK\x03\x04"):
        return "it is a zip archive (a PyTorch checkpoint?); convert the model to GGUF or ONNX"
    if size >= 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack_from("<Q", head)
        if header_len < size:
            return (
                "it is a safetensors file; convert it to GGUF (llama.cpp "
                "convert_hf_to_gguf.py) or export it to ONNX"
            )
    if not any((b < 32 and b not in (9, 10, 13)) or b == 127 for b in head):
        text = head.decode("utf-8", "replace")[:12]
        return f"it looks like a text file (it starts with {text!r})"
    return f"unrecognised content (it starts with bytes {head[:8].hex(' ')})"


# -- GGUF ------------------------------------------------------------------------------
#
# We parse the GGUF header ourselves, by the spec, rather than with gguf.GGUFReader:
# the reader builds a numpy array per vocabulary entry (11 s for Gemma 3 270M's 262k
# tokens, against 0.1 s here), reports a truncated file as a numpy reshape error, and
# spins on a corrupt array count. The gguf package still supplies the constants.

# struct format of each GGUF scalar value type (gguf.GGUFValueType numbers).
_GGUF_SCALAR_FORMAT = {
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d",
}  # fmt: skip
_GGUF_STRING = int(gguf.GGUFValueType.STRING)
_GGUF_ARRAY = int(gguf.GGUFValueType.ARRAY)
_GGUF_MAX_DIMS = 4  # GGML_MAX_DIMS
# Numeric arrays up to this length are read (per-layer values such as head counts);
# longer ones (token types, scores) are skipped.
_GGUF_MAX_READ_ARRAY = 4096
# What a header may make us hold in memory, whatever the file claims: values past these are
# parsed (every length still checked) and dropped, read as None. (A 48 MB file of nested
# empty arrays once took 431 MB of RSS as Python lists — nested arrays are now refused, as
# llama.cpp refuses them; a metadata string of a gigabyte would have been decoded whole.)
_GGUF_MAX_KEPT_ITEMS = 65_536
_GGUF_MAX_KEPT_STRING = 1 << 20
_GGUF_MAX_KEPT_BYTES = 16 << 20
_GGUF_MAX_NAME = 65_536  # a metadata key or tensor name longer than this is not a name

GGUFValue = str | int | float | bool | list[Any] | None


class _BadGGUF(Exception):
    """Internal: why a GGUF file is invalid."""


@dataclass(frozen=True)
class _GGUFTensor:
    name: str
    n_dims: int
    n_elements: int
    ggml_type: int


@dataclass(frozen=True)
class _GGUFHeader:
    version: int
    metadata: dict[str, GGUFValue]
    tensors: list[_GGUFTensor]
    data_offset: int
    data_end: int


class _GGUFParser:
    """Reads a GGUF header from a buffer, checking every length against the file size."""

    def __init__(self, buf: mmap.mmap, size: int) -> None:
        self.buf = buf
        self.size = size
        self.pos = 0
        self.order = "<"
        self.kept_items = 0
        self.kept_bytes = 0

    def take(self, n: int, what: str) -> int:
        if self.pos + n > self.size:
            raise _BadGGUF(
                f"truncated in the header: {what} runs past the end of the file ({self.size} bytes)"
            )
        start = self.pos
        self.pos += n
        return start

    def scalar(self, fmt: str, what: str) -> Any:
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(self.order + fmt, self.buf, start)[0]

    def u32(self, what: str) -> int:
        return int(self.scalar("I", what))

    def u64(self, what: str) -> int:
        return int(self.scalar("Q", what))

    def name(self, what: str) -> str:
        """A metadata key or a tensor name."""
        n = self.u64(what)
        if n > _GGUF_MAX_NAME:
            raise _BadGGUF(f"{what} has a name of {n} bytes")
        start = self.take(n, what)
        return self.buf[start : start + n].decode("utf-8", "replace")

    def string(self, what: str) -> str | None:
        """A string value; None when keeping it would pass the bounds above."""
        n = self.u64(what)
        start = self.take(n, what)
        if n > _GGUF_MAX_KEPT_STRING or self.kept_bytes + n > _GGUF_MAX_KEPT_BYTES:
            return None
        self.kept_bytes += n
        return self.buf[start : start + n].decode("utf-8", "replace")

    def value(self, vtype: int, what: str) -> GGUFValue:
        """Read one value; long arrays are skipped and read as None."""
        if vtype in _GGUF_SCALAR_FORMAT:
            return self.scalar(_GGUF_SCALAR_FORMAT[vtype], what)  # type: ignore[no-any-return]
        if vtype == _GGUF_STRING:
            return self.string(what)
        if vtype != _GGUF_ARRAY:
            raise _BadGGUF(f"{what} has unknown value type {vtype}")
        item_type = self.u32(what)
        count = self.u64(what)
        if item_type == _GGUF_ARRAY:  # gguf.cpp: "has invalid GGUF type" — it cannot load it
            raise _BadGGUF(f"{what} is an array of arrays, which llama.cpp cannot load")
        if item_type in _GGUF_SCALAR_FORMAT:
            fmt = _GGUF_SCALAR_FORMAT[item_type]
            start = self.take(count * struct.calcsize(fmt), what)
            if count > _GGUF_MAX_READ_ARRAY or self.kept_items + count > _GGUF_MAX_KEPT_ITEMS:
                return None
            self.kept_items += count
            return list(struct.unpack_from(f"{self.order}{count}{fmt}", self.buf, start))
        if item_type != _GGUF_STRING:
            raise _BadGGUF(f"{what} has unknown value type {item_type}")
        if count > _GGUF_MAX_READ_ARRAY or self.kept_items + count > _GGUF_MAX_KEPT_ITEMS:
            for _ in range(count):  # each takes >= 8 bytes: a bogus count soon runs out
                self.take(self.u64(what), what)
            return None
        self.kept_items += count
        return [self.string(what) for _ in range(count)]

    def parse(self) -> _GGUFHeader:
        self.take(4, "the magic")
        version = self.u32("the version")
        if version & 0xFFFF == 0:  # written on a big-endian machine
            self.order = ">"
            version = int.from_bytes(version.to_bytes(4, "little"), "big")
        if version not in (2, 3):
            raise _BadGGUF(f"GGUF version {version} is not supported (only 2 and 3)")
        tensor_count = self.u64("the tensor count")
        kv_count = self.u64("the metadata count")

        metadata: dict[str, GGUFValue] = {}
        for i in range(kv_count):
            key = self.name(f"metadata entry {i + 1} of {kv_count}")
            if key in metadata:
                raise _BadGGUF(f"metadata key {key!r} appears twice")
            metadata[key] = self.value(self.u32(f"metadata {key!r}"), f"metadata {key!r}")

        alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise _BadGGUF(f"general.alignment {alignment!r} is not a power of two")

        tensors: list[_GGUFTensor] = []
        names: set[str] = set()
        tensor_end = 0
        for i in range(tensor_count):
            what = f"tensor info {i + 1} of {tensor_count}"
            name = self.name(what)
            if name in names:
                raise _BadGGUF(f"tensor {name!r} appears twice")
            names.add(name)
            n_dims = self.u32(what)
            if n_dims > _GGUF_MAX_DIMS:
                raise _BadGGUF(f"tensor {name!r} has {n_dims} dimensions (at most 4)")
            n_elements = 1
            for _ in range(n_dims):
                n_elements *= self.u64(what)
            ggml_type = self.u32(what)
            offset = self.u64(what)
            tensor_end = max(tensor_end, offset + _tensor_bytes(name, ggml_type, n_elements))
            tensors.append(_GGUFTensor(name, n_dims, n_elements, ggml_type))

        data_offset = -(-self.pos // alignment) * alignment
        data_end = data_offset + tensor_end if tensors else self.pos
        if data_end > self.size:
            raise _BadGGUF(
                f"truncated at tensor data (expected {data_end} bytes, found {self.size})"
            )
        return _GGUFHeader(version, metadata, tensors, data_offset, data_end)


def _tensor_bytes(name: str, ggml_type: int, n_elements: int) -> int:
    try:
        block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise _BadGGUF(
            f"tensor {name!r} has type {ggml_type}, which the installed gguf package "
            f"({_package_version('gguf')}) does not know; upgrade it"
        ) from None
    return n_elements * type_size // block_size


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def _parse_gguf(path: Path, size: int) -> _GGUFHeader:
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return _GGUFParser(buf, size).parse()


def _text(metadata: dict[str, GGUFValue], key: str) -> str | None:
    value = metadata.get(key)
    return value if isinstance(value, str) and value else None


def _integer(metadata: dict[str, GGUFValue], key: str) -> int | None:
    """An integer value; for a per-layer array, its largest element."""
    value = metadata.get(key)
    if isinstance(value, list):
        ints = [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
        return max(ints) if ints else None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def ftype_name(ftype: int) -> str | None:
    """llama.cpp's name for a general.file_type number (per gguf.LlamaFileType), e.g. 'Q4_K_M'."""
    ftype &= ~int(gguf.LlamaFileType.GUESSED)
    try:
        name = gguf.LlamaFileType(ftype).name
    except ValueError:
        return None
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _dominant_tensor_type(tensors: list[_GGUFTensor]) -> str:
    """The type holding most weight elements, for files without general.file_type."""
    by_type: Counter[str] = Counter()
    for t in tensors:
        if t.n_dims >= 2:
            by_type[gguf.GGMLQuantizationType(t.ggml_type).name] += t.n_elements
    return by_type.most_common(1)[0][0] if by_type else "F32"


def _read_gguf(path: Path, size: int) -> FileMetadata:
    try:
        header = _parse_gguf(path, size)
        return _gguf_metadata(size, header)
    except _BadGGUF as exc:
        raise _invalid(path, "GGUF", str(exc)) from None


def _gguf_metadata(size: int, header: _GGUFHeader) -> FileMetadata:
    meta = header.metadata
    split_count = _integer(meta, gguf.Keys.Split.LLM_KV_SPLIT_COUNT) or 0
    if split_count > 1:
        part = (_integer(meta, gguf.Keys.Split.LLM_KV_SPLIT_NO) or 0) + 1
        raise _BadGGUF(
            f"it is part {part} of a model split in {split_count} files; merge them first "
            "(llama-gguf-split --merge)"
        )
    arch = _text(meta, "general.architecture")
    if arch is None:
        raise _BadGGUF("general.architecture is missing")
    parameter_count = sum(t.n_elements for t in header.tensors)
    ftype = _integer(meta, "general.file_type")
    named = ftype_name(ftype) if ftype is not None else None
    n_head = _integer(meta, f"{arch}.attention.head_count")
    return FileMetadata(
        format="gguf",
        file_size=size,
        architecture=arch,
        name=_text(meta, "general.name"),
        basename=_text(meta, "general.basename"),
        parameter_count=parameter_count,
        size_label=_text(meta, "general.size_label"),
        quantization=named or _dominant_tensor_type(header.tensors),
        bits_per_weight=round(size * 8 / parameter_count, 3) if parameter_count else None,
        context_length=_integer(meta, f"{arch}.context_length"),
        n_layers=_integer(meta, f"{arch}.block_count"),
        n_embd=_integer(meta, f"{arch}.embedding_length"),
        n_head=n_head,
        n_head_kv=_integer(meta, f"{arch}.attention.head_count_kv") or n_head,
        key_length=_integer(meta, f"{arch}.attention.key_length"),
        value_length=_integer(meta, f"{arch}.attention.value_length"),
        chat_template=_text(meta, "tokenizer.chat_template"),
        license=_text(meta, "general.license"),
    )


# -- ONNX ------------------------------------------------------------------------------

_ONNX_ELEM_NAMES = {
    "FLOAT": "float32",
    "DOUBLE": "float64",
    "FLOAT16": "float16",
    "BFLOAT16": "bfloat16",
}

# Quantization label by weight element type, as registry.types names ONNX precisions.
_ONNX_QUANT_BY_ELEM = {
    "int8": "int8",
    "uint8": "int8",
    "int4": "int4",
    "uint4": "int4",
    "float16": "fp16",
    "bfloat16": "bf16",
    "float32": "fp32",
    "float64": "fp32",
}


def _elem_name(data_type: int) -> str:
    try:
        name = str(onnx.TensorProto.DataType.Name(data_type))
    except ValueError:
        return f"type{data_type}"
    return _ONNX_ELEM_NAMES.get(name, name.lower())


def _tensor_io(value_info: Any) -> TensorIO:
    kind = value_info.type.WhichOneof("value")
    if kind != "tensor_type":
        return TensorIO(name=value_info.name, elem_type=str(kind or "unknown"))
    tt = value_info.type.tensor_type
    shape: list[int | str | None] | None = None
    if tt.HasField("shape"):
        shape = []
        for d in tt.shape.dim:
            which = d.WhichOneof("value")
            shape.append(int(d.dim_value) if which == "dim_value" else (d.dim_param or None))
    return TensorIO(name=value_info.name, elem_type=_elem_name(tt.elem_type), shape=shape)


def _onnx_quantization(elements_by_type: Counter[str], quant_ops: Counter[str], graph: Any) -> str:
    if quant_ops["MatMulNBits"]:  # onnxruntime's packed block quantization, bits=4 by default
        bits = 4
        for node in graph.node:
            if node.op_type == "MatMulNBits":
                bits = next((int(a.i) for a in node.attribute if a.name == "bits"), 4)
                break
        return f"int{bits}"
    weights = Counter(
        {t: n for t, n in elements_by_type.items() if t in _ONNX_QUANT_BY_ELEM and n > 0}
    )
    if not weights:
        return "fp32"
    return _ONNX_QUANT_BY_ELEM[weights.most_common(1)[0][0]]


def _beside(location: str) -> bool:
    """Whether an external-data location names a plain file in the model's folder."""
    return (
        bool(location) and location not in (".", "..") and "/" not in location
        and "\\" not in location and "\0" not in location and not location.startswith(".")
    )


def _read_onnx(path: Path, size: int) -> FileMetadata:
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError, or anything else onnx raises
        raise _invalid(path, "ONNX", f"cannot parse it as an ONNX protobuf ({exc})") from exc
    graph = model.graph
    if model.ir_version <= 0 or not graph.node or not graph.output:
        raise _invalid(path, "ONNX", "it parses as protobuf but holds no ONNX graph")

    weight_types: Counter[str] = Counter()
    elements_by_type: Counter[str] = Counter()
    initializer_names = set()
    external: set[str] = set()
    parameter_count = 0
    for init in graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            external.update(e.value for e in init.external_data if e.key == "location")
        elem = _elem_name(init.data_type)
        n = 1
        for d in init.dims:
            n *= int(d)
        weight_types[elem] += 1
        elements_by_type[elem] += n
        parameter_count += n
        initializer_names.add(init.name)
    from onnx.external_data_helper import _get_all_tensors

    # Every tensor's external data — initializers and those inside node attributes (a
    # Constant's value, a subgraph's) — must be a file beside the model: a location such as
    # "../../etc/shadow" would make whoever loads it read another file.
    for tensor in _get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            external.update(e.value for e in tensor.external_data if e.key == "location")
    outside = sorted(n for n in external if not _beside(n))
    if outside:
        raise _invalid(path, "ONNX", f"its external data location {outside[0]!r} is not a "
                       "file in the model's own folder")
    quant_ops = Counter(n.op_type for n in graph.node if n.op_type in ONNX_QUANT_OPS)

    # IR < 4 lists initializers among the inputs; they are weights, not inputs to feed.
    inputs = [_tensor_io(v) for v in graph.input if v.name not in initializer_names]
    outputs = [_tensor_io(v) for v in graph.output]
    opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    producer = f"{model.producer_name} {model.producer_version}".strip() or None
    n_embd = next(
        (
            o.shape[-1]
            for o in outputs
            if o.name in EMBEDDING_OUTPUTS and o.shape and isinstance(o.shape[-1], int)
        ),
        None,
    )
    return FileMetadata(
        format="onnx",
        file_size=size,
        parameter_count=parameter_count,
        quantization=_onnx_quantization(elements_by_type, quant_ops, graph),
        bits_per_weight=(
            round(size * 8 / parameter_count, 3) if parameter_count and not external else None
        ),
        n_embd=n_embd,
        onnx_inputs=inputs,
        onnx_outputs=outputs,
        opset=opset,
        ir_version=int(model.ir_version),
        producer=producer,
        weight_types=dict(weight_types),
        quant_ops=dict(quant_ops),
        external_data=sorted(external),
    )

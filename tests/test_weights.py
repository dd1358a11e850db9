"""The served weights file: round trip, header-only metadata, and every way a file can be bad.

Bad files must fail with ``WeightsError`` naming the file and the problem, and nothing on
the loading path may unpickle: a pickle payload that would create a file proves it never ran.
"""

from __future__ import annotations

import builtins
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fcn_core.weights as weights_module
from fcn_core.data.palettes import CAMVID_CLASSES, CAMVID_PALETTE, VOC_CLASSES, VOC_PALETTE
from fcn_core.models import build_model
from fcn_core.preprocess import HALF_RGB, IMAGENET_RGB
from fcn_core.weights import (
    WeightsError,
    WeightsMetadata,
    content_hash,
    import_torch_checkpoint,
    load_weights,
    read_metadata,
    save_weights,
)


def small_model(arch: str = "fcn8s", at_once: bool = False) -> nn.Module:
    model = build_model(arch, 11, "efficientnet_lite0", at_once=at_once)
    torch.manual_seed(0)
    for name, module in model.named_modules():
        if name.startswith("score"):
            nn.init.normal_(module.weight, std=0.05)
    return model.eval()


def camvid_meta(arch: str = "fcn8s", **overrides) -> WeightsMetadata:
    fields = {
        "arch": arch,
        "backbone": "efficientnet_lite0",
        "class_names": list(CAMVID_CLASSES),
        "palette": [list(c) for c in CAMVID_PALETTE],
        "normalization": HALF_RGB,
        "dataset": "camvid",
        "metrics": {"mean_iu": 0.5, "iu": [0.1] * 11},
        "metrics_split": "val",
        "command": "fcn-train --dataset camvid",
        "created": "2025-01-01T00:00:00Z",
        "notes": "test file",
    }
    return WeightsMetadata(**(fields | overrides))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module, WeightsMetadata]:
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    model = small_model()
    meta = save_weights(path, model, camvid_meta())
    return path, model, meta


def copy_of(saved_path: Path, tmp_path: Path) -> Path:
    path = tmp_path / "copy.safetensors"
    path.write_bytes(saved_path.read_bytes())
    return path


class CreatesFile:
    """A pickle payload: unpickling it opens (creates) ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


# --- round trip --------------------------------------------------------------------------------


@pytest.mark.parametrize("at_once", [False, True])
def test_round_trip_gives_identical_outputs_and_metadata(tmp_path: Path, at_once: bool) -> None:
    model = small_model(at_once=at_once)
    meta = save_weights(tmp_path / "w.safetensors", model, camvid_meta(at_once=at_once))
    assert len(meta.sha256) == 64 and meta.sha256 == content_hash(model.state_dict())
    assert not list(tmp_path.glob("*.tmp"))  # written under a temporary name, then renamed

    loaded = load_weights(tmp_path / "w.safetensors")
    assert loaded.meta == meta
    assert loaded.meta.normalization == HALF_RGB
    assert loaded.meta.num_classes == 11
    assert not loaded.model.training
    assert loaded.model.at_once is at_once
    x = torch.randn(2, 3, 45, 61)
    with torch.no_grad():
        expected, got = model(x), loaded.model(x)
    assert expected.abs().max() > 0  # a non-trivial output, so equality means something
    assert torch.equal(got, expected)


def test_metadata_is_plain_json_in_the_safetensors_header(saved) -> None:
    path, _, meta = saved
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["fcn"])
    assert header["num_classes"] == 11
    assert header["normalization"] == {"mean": [0.5] * 3, "std": [0.5] * 3, "channel_order": "RGB"}
    assert header["sha256"] == meta.sha256
    assert json.loads(json.dumps(meta.to_dict())) == header


def test_read_metadata_reads_only_the_header(
    saved, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _, meta = saved

    def tripwire(*args, **kwargs):
        raise AssertionError("read_metadata touched the tensors or built a model")

    monkeypatch.setattr(weights_module, "load_file", tripwire)
    monkeypatch.setattr(weights_module, "build_model", tripwire)
    assert read_metadata(path) == meta
    # Tensor bytes it never reads cannot fail it: flip the last byte of the data section.
    tampered = copy_of(path, tmp_path)
    data = bytearray(tampered.read_bytes())
    data[-1] ^= 0xFF
    tampered.write_bytes(bytes(data))
    assert read_metadata(tampered) == meta


def test_loading_never_unpickles(saved, monkeypatch: pytest.MonkeyPatch) -> None:
    def tripwire(*args, **kwargs):
        raise AssertionError("the safetensors loading path unpickled something")

    monkeypatch.setattr(torch, "load", tripwire)
    monkeypatch.setattr(pickle, "load", tripwire)
    monkeypatch.setattr(pickle, "loads", tripwire)
    monkeypatch.setattr(pickle, "Unpickler", tripwire)
    assert load_weights(saved[0]).meta.sha256 == saved[2].sha256


def test_a_pickle_posing_as_weights_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    pickled = tmp_path / "model.pth"
    torch.save({"score_fr.weight": CreatesFile(marker)}, pickled)
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickled.read_bytes())
    for load in (read_metadata, load_weights):
        with pytest.raises(WeightsError, match="not a readable safetensors file"):
            load(path)
    assert not marker.exists()
    torch.load(pickled, weights_only=False)  # the payload is live: plain unpickling runs it
    assert marker.exists()


# --- bad files ---------------------------------------------------------------------------------


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "fcn.safetensors"
    for load in (read_metadata, load_weights, import_torch_checkpoint):
        with pytest.raises(WeightsError, match=f"weights file not found: {missing}"):
            load(missing)


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda b: b[: len(b) // 2], id="truncated-data"),
        pytest.param(lambda b: b[:20], id="truncated-header"),
        pytest.param(lambda b: b"", id="empty"),
        pytest.param(lambda b: bytes(range(256)) * 8, id="garbage"),
        pytest.param(lambda b: b[:8] + b"{not json" + b[17:], id="broken-header-json"),
    ],
)
def test_corrupt_files_raise_weights_error(saved, tmp_path: Path, corrupt) -> None:
    path = copy_of(saved[0], tmp_path)
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(WeightsError, match=str(path)):
        load_weights(path)


def test_tampered_tensor_bytes_fail_the_content_hash(saved, tmp_path: Path) -> None:
    path = copy_of(saved[0], tmp_path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one bit of one tensor; the header still parses
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="content hash mismatch"):
        load_weights(path)
    # verify=False is the explicit opt-out, and then the file loads.
    assert load_weights(path, verify=False).meta.num_classes == 11


def test_safetensors_without_our_metadata_is_refused(saved, tmp_path: Path) -> None:
    tensors = load_file(str(saved[0]))
    for i, metadata in enumerate([None, {"format": "pt"}]):
        path = tmp_path / f"foreign{i}.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        with pytest.raises(WeightsError, match="no 'fcn' metadata; not an fcn_core weights file"):
            load_weights(path)


def write_with_header(path: Path, tensors: dict[str, torch.Tensor], header: dict) -> Path:
    save_file(tensors, str(path), metadata={"fcn": json.dumps(header)})
    return path


def test_class_count_mismatch_names_the_layer(saved, tmp_path: Path) -> None:
    tensors = load_file(str(saved[0]))
    meta = camvid_meta(class_names=list(VOC_CLASSES), palette=[list(c) for c in VOC_PALETTE])
    meta.sha256 = content_hash(tensors)  # a consistent hash: the shapes are what is wrong
    path = write_with_header(tmp_path / "w.safetensors", tensors, meta.to_dict())
    with pytest.raises(
        WeightsError, match=r"shape mismatch: score_fr\.weight \(11, 1280, 1, 1\) != \(21, 1280"
    ):
        load_weights(path)


def test_architecture_mismatch_names_missing_and_unexpected_tensors(saved, tmp_path: Path) -> None:
    tensors = load_file(str(saved[0]))  # an FCN-8s
    meta = camvid_meta(arch="fcn32s", sha256=content_hash(tensors))
    path = write_with_header(tmp_path / "w.safetensors", tensors, meta.to_dict())
    with pytest.raises(
        WeightsError, match=r"does not match FCN32s.*missing 1 tensors.*upscore\.weight"
    ):
        load_weights(path)
    with pytest.raises(WeightsError, match=r"unexpected 7 tensors"):
        load_weights(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        pytest.param(lambda h: h.pop("arch"), "metadata is malformed", id="missing-field"),
        pytest.param(lambda h: h.pop("normalization"), "metadata is malformed", id="no-norm"),
        pytest.param(
            lambda h: h.update(colour="red"), r"unknown metadata fields \['colour'\]", id="unknown"
        ),
        pytest.param(
            lambda h: h.update(palette=h["palette"][:5]),
            "palette has 5 colours for 11 classes",
            id="short-palette",
        ),
    ],
)
def test_bad_metadata_is_named(saved, tmp_path: Path, edit, message: str) -> None:
    tensors = load_file(str(saved[0]))
    header = saved[2].to_dict()
    edit(header)
    path = write_with_header(tmp_path / "w.safetensors", tensors, header)
    with pytest.raises(WeightsError, match=message) as err:
        read_metadata(path)
    assert str(path) in str(err.value)


def test_unknown_architecture_in_header_is_a_weights_error(saved, tmp_path: Path) -> None:
    tensors = load_file(str(saved[0]))
    header = saved[2].to_dict() | {"arch": "fcn4s", "sha256": content_hash(tensors)}
    path = write_with_header(tmp_path / "w.safetensors", tensors, header)
    with pytest.raises(WeightsError, match=rf"{path}.*fcn4s"):
        load_weights(path)


def test_palette_shorter_than_classes_is_refused() -> None:
    with pytest.raises(WeightsError, match="palette has 2 colours for 11 classes"):
        camvid_meta(palette=[[0, 0, 0], [1, 1, 1]])


def test_metadata_dict_round_trip_keeps_normalization() -> None:
    meta = camvid_meta(normalization=IMAGENET_RGB)
    back = WeightsMetadata.from_dict(json.loads(json.dumps(meta.to_dict())))
    assert back == meta and back.normalization == IMAGENET_RGB


# --- foreign .pth checkpoints ----------------------------------------------------------------


def test_import_torch_checkpoint_reads_plain_state_dicts(tmp_path: Path) -> None:
    state = small_model().state_dict()
    torch.save(state, tmp_path / "plain.pth")
    torch.save({"model": state, "epoch": 3}, tmp_path / "wrapped.pth")
    for name in ("plain.pth", "wrapped.pth"):
        loaded = import_torch_checkpoint(tmp_path / name)
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_import_torch_checkpoint_refuses_arbitrary_objects(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "payload": CreatesFile(marker)}, path)
    with pytest.raises(WeightsError, match="cannot be read as a plain state dict"):
        import_torch_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # proves the payload would have run
    assert marker.exists()


def test_import_torch_checkpoint_refuses_non_state_dicts(tmp_path: Path) -> None:
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    torch.save({"w": torch.zeros(2), "step": 3}, tmp_path / "mixed.pth")
    for name in ("list.pth", "mixed.pth"):
        with pytest.raises(WeightsError, match="expected a dict of tensors"):
            import_torch_checkpoint(tmp_path / name)
    (tmp_path / "junk.pth").write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="cannot be read as a plain state dict"):
        import_torch_checkpoint(tmp_path / "junk.pth")


def test_a_blanked_content_hash_is_refused(saved, tmp_path: Path) -> None:
    tensors = load_file(str(saved[0]))
    path = write_with_header(
        tmp_path / "w.safetensors", tensors, saved[2].to_dict() | {"sha256": ""}
    )
    with pytest.raises(WeightsError, match="no content hash"):
        load_weights(path)
    assert load_weights(path, verify=False).meta.sha256 == ""


def test_a_newer_format_version_is_refused(saved, tmp_path: Path) -> None:
    tensors = load_file(str(saved[0]))
    header = saved[2].to_dict() | {"format_version": 99}
    path = write_with_header(tmp_path / "w.safetensors", tensors, header)
    with pytest.raises(WeightsError, match="format version 99 is newer"):
        read_metadata(path)


@pytest.mark.parametrize(
    "overrides",
    [
        {"class_names": list(VOC_CLASSES), "palette": [list(c) for c in VOC_PALETTE]},
        {"arch": "fcn16s"},
        {"backbone": "vgg16"},
        {"at_once": True},
    ],
    ids=["classes", "arch", "backbone", "at_once"],
)
def test_save_refuses_metadata_that_does_not_describe_the_model(tmp_path: Path, overrides) -> None:
    path = tmp_path / "w.safetensors"
    with pytest.raises(WeightsError, match="does not describe the model"):
        save_weights(path, small_model(), camvid_meta(**overrides))
    assert not path.exists()

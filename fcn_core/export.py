"""fcn-export: a weights file -> an ONNX graph, cached by content hash, checked on real photos.

The graph is the network exactly as the CPU's inference core runs it (``served_network``):
its frozen upsampling layers grouped, one filter per class, and, unless ``--full-logits``,
without its final upsampling: a normalised float N x 3 x H x W batch in, the class scores at
the output stride out (``scores``, N x C x ~H/8 x ~W/8 for FCN-8s), which
``fcn_core.final_upsampling`` turns into labels faster than a full-resolution argmax. With
``--full-logits`` (for other runtimes: Triton, a browser) the graph ends in N x C x H x W
``logits``. Batch, height and width are dynamic (the Lite0 FCN pads itself to a multiple of
32 inside the graph). Normalisation and the labels stay in the inference core, so every
backend shares them and the labels differ only by what the runtime computes. The weights'
metadata (classes, palette, normalisation, content hash, the command that made them)
travels in the ONNX file's ``metadata_props`` under ``fcn``, the output's name under
``fcn_output``.

Exports are cached by the weights' content hash, the output and the graph's version
(``GRAPH_VERSION``; ``FCN_CACHE_DIR``, else ``~/.cache/fcn-serve``), so a service exports
once per weights file and release of the graph, not at every start; ``fcn-export`` fills the
same cache (a Docker image can export at build time).
Needs onnx, onnxscript and onnxruntime (dependencies of fcn-serve: the CPU's backend).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fcn_core.files import atomic_write
from fcn_core.final_upsampling import served_network
from fcn_core.weights import LoadedWeights, WeightsError, WeightsMetadata, load_weights

METADATA_KEY = "fcn"
INPUT, LOGITS, SCORES = "input", "logits", "scores"
GRAPH_KEY, GRAPH_VERSION = "fcn_graph", "3"
"""A cached export of another graph version is made again: 2 = grouped upsampling layers,
3 = the coarse ``scores`` output."""
OUTPUT_KEY = "fcn_output"


def cache_dir(configured: str | Path | None = None) -> Path:
    """The export cache: ``configured`` (the service's setting), else ``FCN_CACHE_DIR`` (the
    same variable, for the command-line tools), else ``~/.cache/fcn-serve``."""
    chosen = configured or os.environ.get("FCN_CACHE_DIR")
    return Path(chosen) if chosen else Path.home() / ".cache" / "fcn-serve"


def export_onnx(loaded: LoadedWeights, path: str | Path, coarse: bool = True) -> Path:
    """Write the network of ``loaded`` as ONNX (dynamic batch, height, width) to ``path``:
    its coarse ``scores`` (``coarse``, when ``FinalUpsampling`` can finish them) or its
    full-resolution ``logits``."""
    import onnx

    network, final = served_network(loaded.model.eval().cpu(), coarse)
    output = SCORES if final else LOGITS
    dynamic = torch.export.Dim.DYNAMIC
    example = torch.zeros(1, 3, 64, 64)
    program = torch.onnx.export(
        network,
        (example,),
        dynamo=True,
        dynamic_shapes={"x": {0: dynamic, 2: dynamic, 3: dynamic}},
        input_names=[INPUT],
        output_names=[output],
        verbose=False,
    )
    proto = program.model_proto
    for key, value in (
        (METADATA_KEY, json.dumps(loaded.meta.to_dict())),
        (GRAPH_KEY, GRAPH_VERSION),
        (OUTPUT_KEY, output),
    ):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return atomic_write(path, lambda tmp: onnx.save(proto, str(tmp)))


def onnx_properties(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, as a dict."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {entry.key: entry.value for entry in proto.metadata_props}


def read_onnx_metadata(path: str | Path, props: dict[str, str] | None = None) -> WeightsMetadata:
    """The weights' metadata an export carries (raises ``WeightsError`` if it has none);
    ``props``: its ``onnx_properties``, when already read."""
    props = onnx_properties(path) if props is None else props
    if METADATA_KEY not in props:
        raise WeightsError(f"{path}: an ONNX file without fcn metadata (not made by fcn-export)")
    return WeightsMetadata.from_dict(json.loads(props[METADATA_KEY]))


def cached_export(
    loaded: LoadedWeights, cache: str | Path | None = None, coarse: bool = True
) -> Path:
    """The ONNX export of ``loaded`` (``export_onnx``), made once per content hash and output
    and reused after; the file is named by the network, the hash and the output alone, so
    every tool that exports shares it. A file of an older graph version (``GRAPH_VERSION``)
    is exported again over."""
    meta = loaded.meta
    kind = "-coarse" if coarse else ""
    path = cache_dir(cache) / "onnx" / f"{meta.arch}-{meta.backbone}-{meta.sha256[:16]}{kind}.onnx"
    if path.is_file():
        try:
            props = onnx_properties(path)
            current = props.get(GRAPH_KEY) == GRAPH_VERSION
            if current and read_onnx_metadata(path, props).sha256 == meta.sha256:
                return path
        except Exception:  # protobuf's DecodeError, WeightsError, OSError: any unreadable file
            pass  # a broken, foreign or older file under our name: export again over it
    return export_onnx(loaded, path, coarse)


def label_agreement(
    onnx_path: str | Path, loaded: LoadedWeights, images: Sequence[np.ndarray]
) -> float:
    """Fraction of pixels whose ONNX Runtime label (finished as the inference core finishes
    it) equals PyTorch's on the model as loaded, over H x W x 3 images."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    coarse = onnx_properties(onnx_path).get(OUTPUT_KEY) == SCORES
    _, final = served_network(loaded.model, coarse)
    equal = total = 0
    model = loaded.model.eval().cpu()
    for image in images:
        x = loaded.meta.normalization(torch.from_numpy(image).permute(2, 0, 1)[None])
        with torch.inference_mode():
            ours = model(x).max(1).indices
            (out,) = session.run(None, {INPUT: x.numpy()})
            out = torch.from_numpy(out)
            theirs = final.labels(out, x.shape[-2:]) if final else out.max(1).indices
        equal += int((ours == theirs).sum())
        total += ours.numel()
    return equal / total


def read_photos(paths: Sequence[Path]) -> list[np.ndarray]:
    from PIL import Image, ImageOps

    photos = []
    for p in paths:
        with Image.open(p) as im:
            photos.append(np.array(ImageOps.exif_transpose(im).convert("RGB")))
    return photos


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fcn-export", description=__doc__)
    p.add_argument("--weights", required=True, help="a .safetensors weights file")
    p.add_argument("--output", type=Path, help="the .onnx file (default: the cache)")
    p.add_argument(
        "--check",
        type=Path,
        nargs="+",
        default=[],
        metavar="PHOTO",
        help="photos on which ONNX Runtime's labels must equal PyTorch's",
    )
    p.add_argument(
        "--full-logits",
        action="store_true",
        help="end the graph in full-resolution logits, for other runtimes (default: the "
        "coarse scores the service runs)",
    )
    p.add_argument(
        "--min-agreement", type=float, default=0.999, help="fail below this pixel agreement"
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        loaded = load_weights(args.weights, device="cpu")
        coarse = not args.full_logits
        path = (
            export_onnx(loaded, args.output, coarse)
            if args.output
            else cached_export(loaded, coarse=coarse)
        )
    except (FileNotFoundError, WeightsError) as exc:
        print(f"fcn-export: error: {exc}", file=sys.stderr)
        return 2
    print(f"{path} ({loaded.meta.arch}/{loaded.meta.backbone}, {loaded.meta.num_classes} classes)")
    if args.check:
        agreement = label_agreement(path, loaded, read_photos(args.check))
        print(f"labels equal to PyTorch's on {agreement:.4%} of pixels ({len(args.check)} photos)")
        if agreement < args.min_agreement:
            print(f"fcn-export: below {args.min_agreement:.2%}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

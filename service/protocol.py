"""The Open Inference Protocol ("KServe v2", as spoken by Triton, KServe, MLServer and OpenVINO
Model Server) over HTTP/REST: its wire format, written from the public specification.

This module owns the bytes only: parsing an inference request (JSON tensors, and the binary
tensor data extension: ``Inference-Header-Content-Length``, ``binary_data_size``,
``binary_data_output``) into arrays, and writing responses and metadata. The routes
(``service/routes/v2.py``) run what it parses through the same stages, limits and batcher as
``POST /segment``.

A segmentation model here has two possible inputs, exactly one per request:

- ``IMAGES``: BYTES ``[N]``, encoded images (PNG, JPEG, WebP, ...). With the binary extension
  each element is a 4-byte little-endian length and the bytes (the protocol's BYTES layout);
  in JSON each element is the image in base64.
- ``PIXELS``: UINT8 ``[N, H, W, 3]``, RGB pixels.

and two outputs: ``LABELS`` UINT8 ``[N, H, W]``, each image's class map at its own size in the
top-left corner, padded with 255 (not a class) to the largest height and width of the request;
and ``SIZES`` INT32 ``[N, 2]``, each image's (height, width). Images of one size need no
padding, and the model metadata says all this in its ``parameters``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fcn_core.tiling import TILE_MODES, TileMode
from fcn_core.weights import WeightsMetadata

HEADER_LENGTH = "Inference-Header-Content-Length"
IMAGES, PIXELS, LABELS, SIZES = "IMAGES", "PIXELS", "LABELS", "SIZES"
PAD_LABEL = 255
EXTENSIONS = ["binary_tensor_data", "model_repository"]

DTYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}


class ProtocolError(Exception):
    """A request the protocol cannot take: answered ``{"error": message}`` with ``status``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    array: np.ndarray  # BYTES: a 1-D object array of bytes


@dataclass
class InferRequest:
    id: str | None
    inputs: list[Tensor]
    binary_outputs: dict[str, bool] = field(default_factory=dict)  # requested name -> binary
    binary_default: bool = False  # the request's binary_data_output
    tile: TileMode | None = None  # the request's "tile" parameter (as /segment's ?tile=)

    def wants_binary(self, name: str) -> bool:
        return self.binary_outputs.get(name, self.binary_default)

    def requested(self, available: list[str]) -> list[str]:
        """The outputs to send: those named, else all."""
        if not self.binary_outputs:
            return available
        unknown = sorted(set(self.binary_outputs) - set(available))
        if unknown:
            raise ProtocolError(f"unknown output {unknown}; this model has {available}")
        return [n for n in available if n in self.binary_outputs]


# -- requests ---------------------------------------------------------------------------------


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    """An inference request: JSON, or JSON followed by binary tensor data."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(
                f"{HEADER_LENGTH} must be an integer, not {header_length!r}"
            ) from None
        if not 0 <= n <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} {n} is outside the body's {len(body)} bytes")
        head, binary = body[:n], memoryview(body)[n:]
    else:
        head, binary = body, memoryview(b"")
    try:
        doc = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"the request is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise ProtocolError("an inference request is a JSON object with a list of 'inputs'")
    inputs, offset = [], 0
    for spec in doc["inputs"]:
        tensor, used = _input_tensor(spec, binary[offset:])
        inputs.append(tensor)
        offset += used
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes of binary data belong to no input")
    params = doc.get("parameters") or {}
    binary_outputs = {}
    for out in doc.get("outputs") or []:
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise ProtocolError("each requested output is an object with a 'name'")
        wanted = (out.get("parameters") or {}).get("binary_data")
        binary_outputs[out["name"]] = bool(
            wanted if wanted is not None else params.get("binary_data_output")
        )
    tile = params.get("tile")
    if tile is not None and tile not in TILE_MODES:
        raise ProtocolError(f"the 'tile' parameter is one of {list(TILE_MODES)}, not {tile!r}")
    return InferRequest(
        id=doc.get("id"),
        inputs=inputs,
        binary_outputs=binary_outputs,
        binary_default=bool(params.get("binary_data_output", False)),
        tile=tile,
    )


def _input_tensor(spec: Any, binary: memoryview) -> tuple[Tensor, int]:
    """One input and the bytes of binary data it used."""
    if not isinstance(spec, dict):
        raise ProtocolError("each input is a JSON object")
    name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
    if not isinstance(name, str) or datatype not in DTYPES:
        raise ProtocolError(f"input {name!r}: a name and one of the datatypes {list(DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ProtocolError(f"input {name!r}: shape must be a list of non-negative integers")
    count = math.prod(shape)
    size = (spec.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or size > len(binary):
            raise ProtocolError(f"input {name!r}: binary_data_size {size} exceeds the data sent")
        raw = bytes(binary[:size])
        if datatype == "BYTES":
            array = np.array([*deserialize_bytes(raw, name), None], dtype=object)[:-1]
        else:
            item = np.dtype(DTYPES[datatype]).itemsize
            if size != count * item:
                raise ProtocolError(
                    f"input {name!r}: {size} bytes of data for shape {shape} of {datatype}"
                )
            array = np.frombuffer(raw, dtype=DTYPES[datatype]).reshape(shape)
        if array.size != count:
            raise ProtocolError(f"input {name!r}: {array.size} elements for shape {shape}")
        return Tensor(name, datatype, shape, array), size
    if "data" not in spec:
        raise ProtocolError(f"input {name!r} has neither 'data' nor binary_data_size")
    return Tensor(name, datatype, shape, _json_tensor(name, datatype, shape, spec["data"])), 0


def _json_tensor(name: str, datatype: str, shape: list[int], data: Any) -> np.ndarray:
    flat = np.asarray(data, dtype=object).reshape(-1) if data != [] else np.array([], object)
    if flat.size != math.prod(shape):
        raise ProtocolError(f"input {name!r}: {flat.size} elements for shape {shape}")
    if datatype == "BYTES":
        try:
            items = [base64.b64decode(s, validate=True) for s in flat]
        except (TypeError, ValueError, binascii.Error):
            raise ProtocolError(
                f"input {name!r}: BYTES elements in JSON are base64 strings of the images"
            ) from None
        return np.array([*items, None], dtype=object)[:-1].reshape(shape)
    try:
        array = np.array(flat.tolist(), dtype=DTYPES[datatype])
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"input {name!r}: not {datatype} data: {exc}") from None
    if datatype.startswith("UINT") and flat.size and (np.asarray(flat.tolist()) < 0).any():
        raise ProtocolError(f"input {name!r}: negative values in {datatype} data")
    return array.reshape(shape)


def deserialize_bytes(raw: bytes, name: str = "") -> list[bytes]:
    """The protocol's BYTES layout: each element a 4-byte little-endian length, then bytes."""
    items, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise ProtocolError(f"input {name!r}: a BYTES element's length is cut short")
        (n,) = struct.unpack_from("<I", raw, i)
        if i + 4 + n > len(raw):
            raise ProtocolError(f"input {name!r}: a BYTES element runs past the data sent")
        items.append(raw[i + 4 : i + 4 + n])
        i += 4 + n
    return items


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


# -- the images of a request, and the answer ----------------------------------------------------


def request_images(request: InferRequest) -> tuple[str, list[bytes] | list[np.ndarray]]:
    """(input name, its images): encoded bytes for IMAGES, H x W x 3 arrays for PIXELS."""
    names = [t.name for t in request.inputs]
    if len(names) != 1 or names[0] not in (IMAGES, PIXELS):
        raise ProtocolError(f"send exactly one input, {IMAGES} or {PIXELS}; got {names}")
    (tensor,) = request.inputs
    if tensor.name == IMAGES:
        if tensor.datatype != "BYTES" or len(tensor.shape) != 1:
            raise ProtocolError(f"{IMAGES} is BYTES of shape [N] (encoded images)")
        return IMAGES, [bytes(b) for b in tensor.array.reshape(-1)]
    if tensor.datatype != "UINT8" or len(tensor.shape) != 4 or tensor.shape[3] != 3:
        raise ProtocolError(f"{PIXELS} is UINT8 of shape [N, H, W, 3] (RGB)")
    return PIXELS, [np.ascontiguousarray(a) for a in tensor.array]


def label_outputs(labels: list[np.ndarray]) -> dict[str, tuple[str, np.ndarray]]:
    """LABELS (padded with 255 to the largest size) and SIZES from per-image label maps."""
    h = max(lab.shape[0] for lab in labels)
    w = max(lab.shape[1] for lab in labels)
    out = np.full((len(labels), h, w), PAD_LABEL, dtype=np.uint8)
    for i, lab in enumerate(labels):
        out[i, : lab.shape[0], : lab.shape[1]] = lab
    sizes = np.array([lab.shape for lab in labels], dtype=np.int32).reshape(len(labels), 2)
    return {LABELS: ("UINT8", out), SIZES: ("INT32", sizes)}


def encode_response(
    model_name: str,
    model_version: str,
    request: InferRequest,
    outputs: dict[str, tuple[str, np.ndarray]],
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (binary outputs appended after the JSON)."""
    entries, blobs = [], []
    for name in request.requested(list(outputs)):
        datatype, array = outputs[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if request.wants_binary(name):
            blob = np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.reshape(-1).tolist()
        entries.append(entry)
    doc: dict[str, Any] = {
        "model_name": model_name,
        "model_version": model_version,
        "outputs": entries,
    }
    if request.id is not None:
        doc["id"] = request.id
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return head, {"Content-Type": "application/json"}
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
    return head + b"".join(blobs), headers


def model_metadata(name: str, version: str, meta: WeightsMetadata) -> dict[str, Any]:
    return {
        "name": name,
        "versions": [version],
        "platform": f"fcn-serve_{meta.arch}_{meta.backbone}",
        "inputs": [
            {"name": IMAGES, "datatype": "BYTES", "shape": [-1]},
            {"name": PIXELS, "datatype": "UINT8", "shape": [-1, -1, -1, 3]},
        ],
        "outputs": [
            {"name": LABELS, "datatype": "UINT8", "shape": [-1, -1, -1]},
            {"name": SIZES, "datatype": "INT32", "shape": [-1, 2]},
        ],
        "parameters": {
            "inputs": f"exactly one of {IMAGES} (encoded images; base64 strings in JSON) or "
            f"{PIXELS} (RGB)",
            "labels": f"{LABELS}[i] holds image i's class map at its own size, "
            f"{SIZES}[i] = (height, width), in the top-left corner; the rest is {PAD_LABEL}",
            "class_names": meta.class_names,
            "content_hash": meta.sha256,
        },
    }

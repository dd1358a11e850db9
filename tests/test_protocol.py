"""The Open Inference Protocol (``/v2``) against a real server on loopback, driven by the
clients users already have, unchanged: ``tritonclient[http]`` and the ``kserve`` package's
REST client. Label maps must equal ``/segment``'s for the same photos; errors come in the
protocol's shape; the wire format's corners are checked on their own."""

from __future__ import annotations

import asyncio
import io
import json
import struct

import httpx
import numpy as np
import pytest
from PIL import Image

from service import protocol
from tests.conftest import DEMO_PHOTOS, LiveServer, labels_from_png, predict

tritonclient_http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] missing")

PHOTOS = [DEMO_PHOTOS / "dog.jpg", DEMO_PHOTOS / "eagle.jpg"]  # two sizes: padded LABELS


def segment_labels(live: LiveServer, data: bytes) -> np.ndarray:
    answer = live.client.post("/segment", files={"image": ("x", data)})
    assert answer.status_code == 200, answer.text
    return labels_from_png(answer.content)[0]


def model_name(live: LiveServer) -> str:
    return live.client.get("/v1/model").json()["name"]


def unpad(labels: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    return [labels[i, :h, :w] for i, (h, w) in enumerate(sizes)]


def test_tritonclient_health_metadata_and_binary_inference(live: LiveServer) -> None:
    client = tritonclient_http.InferenceServerClient(live.url.removeprefix("http://"))
    name = model_name(live)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(name) and not client.is_model_ready("no-such-model")
    meta = client.get_model_metadata(name)
    assert meta["name"] == name and meta["versions"] == [
        live.client.get("/v1/model").json()["version"]
    ]
    assert {t["name"] for t in meta["inputs"]} == {"IMAGES", "PIXELS"}
    assert {t["name"] for t in meta["outputs"]} == {"LABELS", "SIZES"}

    blobs = [p.read_bytes() for p in PHOTOS]
    images = tritonclient_http.InferInput("IMAGES", [len(blobs)], "BYTES")
    images.set_data_from_numpy(np.array(blobs, dtype=np.object_), binary_data=True)
    outputs = [
        tritonclient_http.InferRequestedOutput(n, binary_data=True) for n in ("LABELS", "SIZES")
    ]
    result = client.infer(name, [images], outputs=outputs, request_id="r1")
    labels, sizes = result.as_numpy("LABELS"), result.as_numpy("SIZES")
    response = result.get_response()
    assert response["model_name"] == name and response["id"] == "r1"
    expected = [segment_labels(live, b) for b in blobs]
    assert [tuple(s) for s in sizes] == [e.shape for e in expected]
    assert labels.shape == (2, max(e.shape[0] for e in expected), max(e.shape[1] for e in expected))
    for got, want in zip(unpad(labels, sizes), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    # The padding is 255, never a class.
    h, w = sizes[1]
    assert (labels[1, h:, :] == protocol.PAD_LABEL).all() and (labels[1, :, w:] == 255).all()


def test_tritonclient_pixels_as_json_tensors(live: LiveServer, reference) -> None:
    client = tritonclient_http.InferenceServerClient(live.url.removeprefix("http://"))
    name = model_name(live)
    rgb = np.asarray(Image.open(PHOTOS[0]).convert("RGB").resize((96, 64)))
    pixels = tritonclient_http.InferInput("PIXELS", [1, *rgb.shape], "UINT8")
    pixels.set_data_from_numpy(rgb[None], binary_data=False)
    out = tritonclient_http.InferRequestedOutput("LABELS", binary_data=False)
    result = client.infer(name, [pixels], outputs=[out])
    assert result.as_numpy("SIZES") is None  # only what was asked for
    np.testing.assert_array_equal(result.as_numpy("LABELS")[0], predict(reference, rgb))


def test_kserve_rest_client_gives_the_segment_labels(live: LiveServer) -> None:
    kserve = pytest.importorskip("kserve", reason="the kserve package is missing")
    name = model_name(live)
    blob = PHOTOS[1].read_bytes()
    tensor = kserve.InferInput("IMAGES", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([blob], dtype=np.object_), binary_data=True)
    request = kserve.InferRequest(model_name=name, infer_inputs=[tensor])

    async def call():
        client = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2", retries=0))
        try:
            return await client.infer(live.url, request, model_name=name)
        finally:
            await client._client.aclose()

    response = asyncio.run(call())
    by_name = {o.name: o for o in response.outputs}
    labels, sizes = by_name["LABELS"].as_numpy(), by_name["SIZES"].as_numpy()
    assert response.model_name == name
    np.testing.assert_array_equal(unpad(labels, sizes)[0], segment_labels(live, blob))


def test_curl_style_json_and_the_version_routes(live: LiveServer) -> None:
    name = model_name(live)
    version = live.client.get("/v1/model").json()["version"]
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    body = {
        "id": "42",
        "inputs": [
            {
                "name": "PIXELS",
                "shape": [1, 2, 3, 3],
                "datatype": "UINT8",
                "data": rgb.ravel().tolist(),
            }
        ],
    }
    for path in (f"/v2/models/{name}/infer", f"/v2/models/{name}/versions/{version}/infer"):
        answer = live.client.post(path, json=body)
        assert answer.status_code == 200, answer.text
        doc = answer.json()
        assert (doc["id"], doc["model_name"], doc["model_version"]) == ("42", name, version)
        out = {o["name"]: o for o in doc["outputs"]}
        assert out["LABELS"]["shape"] == [1, 2, 3] and len(out["LABELS"]["data"]) == 6
        assert out["SIZES"]["data"] == [2, 3]
    assert live.client.get(f"/v2/models/{name}/versions/{version}/ready").status_code == 200
    server = live.client.get("/v2").json()
    assert server["name"] == "fcn-serve" and "binary_tensor_data" in server["extensions"]


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "words"),
    [
        ("/v2/models/nope/infer", {"inputs": []}, {}, 404, "unknown model 'nope'"),
        ("/v2/models/{m}/versions/0000/infer", None, {}, 404, "has version"),
        ("/v2/models/{m}/infer", b"not json", {}, 400, "not json"),
        (
            "/v2/models/{m}/infer",
            {"inputs": [{"name": "X", "datatype": "UINT8", "shape": [1], "data": [1]}]},
            {},
            400,
            "exactly one input",
        ),
        (
            "/v2/models/{m}/infer",
            {
                "inputs": [
                    {"name": "PIXELS", "datatype": "UINT8", "shape": [1, 2, 2, 3], "data": [1]}
                ]
            },
            {},
            400,
            "1 elements for shape [1, 2, 2, 3]",
        ),
        (
            "/v2/models/{m}/infer",
            {"inputs": [{"name": "IMAGES", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]},
            {},
            400,
            "base64",
        ),
        (
            "/v2/models/{m}/infer",
            {
                "inputs": [
                    {
                        "name": "IMAGES",
                        "datatype": "BYTES",
                        "shape": [1],
                        "data": ["bm90IGFuIGltYWdl"],
                    }
                ]
            },
            {},
            415,
            "not a recognised image",
        ),
        (
            "/v2/models/{m}/infer",
            b'{"inputs": []}',
            {protocol.HEADER_LENGTH: "999"},
            400,
            "outside the body",
        ),
    ],
)
def test_errors_come_in_the_protocols_shape(
    live: LiveServer, path: str, body: object, headers: dict, status: int, words: str
) -> None:
    name = model_name(live)
    if body is None:
        body = {
            "inputs": [
                {"name": "PIXELS", "datatype": "UINT8", "shape": [1, 1, 1, 3], "data": [0, 0, 0]}
            ]
        }
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    answer = live.client.post(path.replace("{m}", name), content=content, headers=headers)
    assert answer.status_code == status, answer.text
    assert set(answer.json()) == {"error"} and words.lower() in answer.json()["error"].lower()


def test_binary_layout_round_trips_and_rejects_cut_data() -> None:
    items = [b"", b"\x00\xff", b"abc" * 100]
    raw = protocol.serialize_bytes(items)
    assert protocol.deserialize_bytes(raw) == items
    assert raw[:4] == struct.pack("<I", 0)
    with pytest.raises(protocol.ProtocolError, match="cut short"):
        protocol.deserialize_bytes(raw + b"\x01\x00")
    with pytest.raises(protocol.ProtocolError, match="runs past"):
        protocol.deserialize_bytes(struct.pack("<I", 10) + b"abc")
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "IMAGES",
                    "datatype": "BYTES",
                    "shape": [3],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "LABELS", "parameters": {"binary_data": True}}],
        }
    ).encode()
    parsed = protocol.parse_request(head + raw, str(len(head)))
    assert list(parsed.inputs[0].array) == items and parsed.wants_binary("LABELS")
    with pytest.raises(protocol.ProtocolError, match="belong to no input"):
        protocol.parse_request(head + raw + b"extra", str(len(head)))


def test_binary_outputs_are_appended_after_the_json_header() -> None:
    request = protocol.InferRequest(id=None, inputs=[], binary_default=True)
    labels = [np.full((2, 3), 7, np.uint8), np.full((1, 1), 1, np.uint8)]
    body, headers = protocol.encode_response("m", "v", request, protocol.label_outputs(labels))
    n = int(headers[protocol.HEADER_LENGTH])
    doc = json.loads(body[:n])
    sizes = [o["parameters"]["binary_data_size"] for o in doc["outputs"]]
    assert sizes == [2 * 2 * 3, 2 * 2 * 4] and len(body) == n + sum(sizes)
    out = np.frombuffer(body[n : n + 12], np.uint8).reshape(2, 2, 3)
    assert (out[0, :2] == 7).all() and out[1, 0, 0] == 1 and (out[1, 1:] == 255).all()


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_images_and_pixels_give_the_same_labels(live: LiveServer) -> None:
    """The same pixels as an encoded PNG (IMAGES) and raw (PIXELS) are the same request."""
    name = model_name(live)
    rgb = np.asarray(Image.open(PHOTOS[1]).convert("RGB").resize((80, 48)))
    png = _png(rgb)
    head = {
        "inputs": [
            {
                "name": "IMAGES",
                "datatype": "BYTES",
                "shape": [1],
                "parameters": {"binary_data_size": len(png) + 4},
            }
        ]
    }
    encoded = json.dumps(head).encode()
    a = httpx.post(
        f"{live.url}/v2/models/{name}/infer",
        content=encoded + protocol.serialize_bytes([png]),
        headers={protocol.HEADER_LENGTH: str(len(encoded))},
    ).json()
    b = live.client.post(
        f"/v2/models/{name}/infer",
        json={
            "inputs": [
                {
                    "name": "PIXELS",
                    "datatype": "UINT8",
                    "shape": [1, 48, 80, 3],
                    "data": rgb.ravel().tolist(),
                }
            ]
        },
    ).json()
    assert a["outputs"][0]["data"] == b["outputs"][0]["data"]


def test_protocol_requests_count_in_the_models_metrics(live: LiveServer) -> None:
    name = model_name(live)
    before = live.metric("fcn_images_total", model=name)
    body = {
        "inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": [2, 4, 4, 3], "data": [0] * 96}]
    }
    assert live.client.post(f"/v2/models/{name}/infer", json=body).status_code == 200
    assert live.metric("fcn_images_total", model=name) - before == 2
    assert (
        live.metric(
            "fcn_request_duration_seconds_count", endpoint="/v2/models/{name}/infer", model=name
        )
        >= 1
    )

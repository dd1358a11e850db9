"""The LitServe peer: the same model served by LitServe, set up as its documentation recommends.

LitServe's guide to speeding up a server ("Speed up serving by 200x") starts on the CPU with
dynamic batching (``max_batch_size``, ``batch_timeout``) and more workers per device; its
``LitAPI`` names the request stages (decode, batch, predict, unbatch, encode). Here: one worker
process per core, batches of up to 4 gathered for 10 ms, and, as a competent user does once
they see several processes on few cores, one torch thread per worker (without it the workers'
intra-op threads contend and LitServe runs slower). Predictions use ``max(1).indices`` and the
answer is the same palette PNG at the service's compression level, so the comparison measures
the servers, not their argmax or zlib settings. Images come as LitServe's docs send them,
base64 in JSON (``{"image": "..."}``).

    python -m bench.litserve_server --weights weights/fcn8s-lite0-camvid.safetensors --port 8002
"""

from __future__ import annotations

import argparse
import base64
import io
import os
from pathlib import Path

import litserve as ls
import numpy as np
import torch
from fastapi import HTTPException, Response
from PIL import Image, UnidentifiedImageError

from fcn_client.wire import IMAGE_FIELD
from fcn_core.data.palettes import flat_palette
from fcn_core.weights import load_weights
from service.codecs import PNG_COMPRESS_LEVEL


class SegmentationAPI(ls.LitAPI):
    def __init__(self, weights: Path, threads: int, **batching: object) -> None:
        super().__init__(**batching)  # type: ignore[arg-type]
        self.weights = weights
        self.threads = threads

    def setup(self, device: str) -> None:
        torch.set_num_threads(self.threads)
        loaded = load_weights(self.weights, device)
        self.model, self.meta = loaded.model.eval(), loaded.meta
        self.palette = flat_palette(self.meta.palette)
        self.device = device

    def decode_request(self, request: dict) -> np.ndarray:
        # LitServe's documented image input: base64 in a JSON field (its workers are
        # processes, and a multipart upload cannot be pickled to them).
        try:
            data = base64.b64decode(request[IMAGE_FIELD], validate=True)
            return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        except (KeyError, TypeError, ValueError, UnidentifiedImageError, OSError) as exc:
            raise HTTPException(400, f"not a decodable image: {exc}") from exc

    def batch(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return inputs  # sizes may differ: stacked per size in predict

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(images)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(images):
            by_size.setdefault(im.shape, []).append(i)
        with torch.inference_mode():
            for members in by_size.values():
                x = torch.from_numpy(np.stack([images[i] for i in members])).to(self.device)
                x = self.meta.normalization(x.permute(0, 3, 1, 2))
                labels = self.model(x).max(1).indices.to(torch.uint8).cpu().numpy()
                for i, lab in zip(members, labels, strict=True):
                    out[i] = lab
        return out  # type: ignore[return-value]

    def unbatch(self, output: list[np.ndarray]) -> list[np.ndarray]:
        return output

    def encode_response(self, labels: np.ndarray) -> Response:
        img = Image.fromarray(labels)
        img.putpalette(self.palette)
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        return Response(buf.getvalue(), media_type="image/png")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8002)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=0, help="0: one per core on the CPU, else 1")
    p.add_argument("--max-batch-size", type=int, default=4)
    p.add_argument("--batch-timeout", type=float, default=0.01)
    a = p.parse_args(argv)
    cpu = a.device == "cpu"
    cores = len(os.sched_getaffinity(0))
    workers = a.workers or (cores if cpu else 1)
    api = SegmentationAPI(
        a.weights,
        threads=max(1, cores // workers) if cpu else torch.get_num_threads(),
        max_batch_size=a.max_batch_size,
        batch_timeout=a.batch_timeout,
        api_path="/segment",
    )
    server = ls.LitServer(
        api,
        accelerator="cpu" if cpu else "cuda",
        devices=1,
        workers_per_device=workers,
        healthcheck_path="/healthz",
    )
    server.run(host=a.host, port=a.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()

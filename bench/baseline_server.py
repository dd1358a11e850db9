"""The plain server users would otherwise write: the yardstick the service must beat.

One FastAPI endpoint, the same weights loaded with ``fcn_core.weights.load_weights``, one
forward pass per request inside the endpoint, no queue and no batching. It is a sync ``def``
endpoint, as most tutorials write it, so FastAPI runs it in its thread pool and concurrent
requests run concurrent forward passes. It takes the request the service takes (multipart
field ``image`` on ``POST /segment``) and answers the same palette PNG label map, so the load
generator measures both the same way. It is the best plain server, not a strawman: labels by
``max(1).indices`` (torch's CPU ``argmax`` over channels is 17-32 ms slower here) and the PNG
at the service's compression level, so the comparison measures serving, not those two.

    python -m bench.baseline_server --weights weights/fcn8s-lite0-camvid.safetensors --port 8001
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, File, HTTPException, UploadFile
from fastapi.responses import Response
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel

from fcn_core.data.palettes import flat_palette
from fcn_core.weights import load_weights
from service.codecs import PNG_COMPRESS_LEVEL


class Health(BaseModel):
    status: str


def create_app(weights: Path, device: str = "cpu") -> FastAPI:
    loaded = load_weights(weights, device)
    model, meta = loaded.model, loaded.meta
    palette = flat_palette(meta.palette)
    app = FastAPI(title="plain FCN server (benchmark baseline)")

    @app.get("/healthz")
    def healthz() -> Health:
        return Health(status="ok")

    @app.post("/segment", responses={200: {"content": {"image/png": {}}}})
    def segment(image: UploadFile = File(...)) -> Response:
        try:
            rgb = np.asarray(Image.open(image.file).convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise HTTPException(400, f"not a decodable image: {exc}") from exc
        x = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).to(device)
        with torch.inference_mode():
            labels = model(meta.normalization(x)).max(1).indices[0].to(torch.uint8).cpu().numpy()
        out = Image.fromarray(labels)
        out.putpalette(palette)  # L -> P: pixel values are class indices, colours for viewers
        buf = io.BytesIO()
        out.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        return Response(buf.getvalue(), media_type="image/png")

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    uvicorn.run(create_app(a.weights, a.device), host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()

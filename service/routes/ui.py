"""The demo page: ``/`` serves service/static/index.html, ``/static`` the files beside it."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

from service.errors import ServiceError

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
INDEX_HTML = STATIC_DIR / "index.html"

router = APIRouter()


@router.get("/", response_class=FileResponse, include_in_schema=False)
async def index() -> Response:
    if not INDEX_HTML.is_file():
        raise ServiceError(404, "the demo page is not installed (service/static/index.html)", None)
    return FileResponse(INDEX_HTML)


def mount_static(app: FastAPI) -> None:
    # check_dir=False: an install without the static files still serves the API (404s here).
    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")

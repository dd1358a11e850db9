"""Reading uploaded images: the body under the byte limit, then the image field(s) out of it.

The body is read from the stream chunk by chunk and refused with 413 the moment it passes
the limit (or at once, from ``Content-Length``), so an oversized upload is never held whole.
Multipart bodies are parsed from those bytes by replaying them to Starlette's parser, which
would otherwise read the stream itself, without a limit.
"""

from __future__ import annotations

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Message

from service.errors import ServiceError

# A form with more text fields than this is not one of ours; Starlette refuses it cheaply.
MAX_FORM_FIELDS = 100


async def read_images(request: Request, field: str, most: int, limit: int) -> list[bytes]:
    """Image bytes from multipart field(s) ``field``, or from a raw ``image/*`` body when
    only one image is expected (``most == 1``). The body may hold ``limit`` bytes."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    is_raw = content_type.startswith("image/") or content_type == "application/octet-stream"
    if content_type != "multipart/form-data" and not (is_raw and most == 1):
        how = f"multipart field '{field}'" + (
            " or as a raw body with an image/* Content-Type" if most == 1 else ""
        )
        raise ServiceError(
            415, f"Content-Type {content_type or '(none)'} not accepted: send the image as {how}"
        )
    body = await read_body(request, limit)
    if is_raw:
        return [body]
    return await multipart_files(request, body, field, most)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it passes ``limit`` (never stored whole)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ServiceError(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise ServiceError(
                413, f"body of {declared} bytes exceeds the {limit}-byte limit", "too_large"
            )
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ServiceError(413, f"body exceeds the {limit}-byte limit", "too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientDisconnect("during upload") from None
    return b"".join(chunks)


async def multipart_files(request: Request, body: bytes, field: str, most: int) -> list[bytes]:
    """The files of multipart field ``field`` (at most ``most``), parsed from ``body``."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    parser = Request(request.scope, replay)
    try:
        form = await parser.form(max_files=most, max_fields=MAX_FORM_FIELDS)
    except HTTPException as exc:
        raise ServiceError(400, f"malformed multipart body: {exc.detail}") from None
    try:
        values = form.getlist(field)
        if not values:
            found = ", ".join(sorted(set(form.keys()))) or "none"
            raise ServiceError(422, f"multipart field '{field}' is missing (fields sent: {found})")
        if not all(isinstance(v, UploadFile) for v in values):
            raise ServiceError(422, f"multipart field '{field}' must be a file, not text")
        return [await v.read() for v in values if isinstance(v, UploadFile)]
    finally:
        await form.close()

"""The names on the wire that the server and its clients share.

Enums for the query values, constants for the headers and the multipart form fields. The
server's routes, middleware and OpenAPI schema use these, so renaming one here renames it on
both ends at once. Standard library only: importing this must stay free for any client.
"""

from __future__ import annotations

from enum import Enum


# ``/segment?output=``: what the answer to one image is. (A comment: a docstring would
# become the enum's description in the server's OpenAPI schema.)
class Output(str, Enum):
    labels = "labels"
    overlay = "overlay"
    json = "json"


# ``/segment?format=``: how an overlay is encoded.
class ImageFormat(str, Enum):
    png = "png"
    jpeg = "jpeg"


# Headers. HTTP header names are case-insensitive; these are the spellings the server sends.
REQUEST_ID = "X-Request-ID"
"""Sent by a client to name its request (echoed if safe to log), else generated; on every answer."""
SERVER_TIMING = "Server-Timing"
"""Milliseconds per stage (``SERVER_TIMING_STAGES``, then ``total``) on every answer."""
RETRY_AFTER = "Retry-After"
"""Seconds to wait before retrying, on 503 (queue full, not ready, shutting down)."""
AUTHORIZATION = "Authorization"
"""``Bearer <key>`` when the server has an API key."""
MODEL_HEADER = "X-Model"
"""The name of the model that answered a ``/segment`` request."""
MODEL_VERSION_HEADER = "X-Model-Version"
"""Its version: the weights' content hash, short (the protocol's ``model_version``)."""
MODEL_PARAM = "model"
"""``/segment?model=``: the model to use (``GET /v1/models``); the default when omitted."""

# Server-Timing entries, in the order a request meets them; ``total`` always follows.
SERVER_TIMING_STAGES = ("read", "decode", "queue", "inference", "encode")

# Multipart form fields.
IMAGE_FIELD = "image"
"""``POST /segment``: the one image (a raw ``image/*`` body works too)."""
IMAGES_FIELD = "images"
"""``POST /segment/batch``: repeated, one per image, answered in the order sent."""

"""Compatibility only: the client moved to the ``fcn_client`` package.

``from service.client import SegmentationClient`` (and the other SDK names) keeps working,
and so does an ``fcn-segment`` script installed before the entry point moved to
``fcn_client.cli:main``. New code imports from ``fcn_client.sdk`` and ``fcn_client.cli``.
"""

from fcn_client.cli import main
from fcn_client.sdk import (
    DEFAULT_SERVER,
    AsyncSegmentationClient,
    RetryPolicy,
    SegmentationClient,
    SegmentationError,
    SegmentResult,
    parse_retry_after,
    parse_server_timing,
)

__all__ = [
    "DEFAULT_SERVER",
    "AsyncSegmentationClient",
    "RetryPolicy",
    "SegmentResult",
    "SegmentationClient",
    "SegmentationError",
    "main",
    "parse_retry_after",
    "parse_server_timing",
]

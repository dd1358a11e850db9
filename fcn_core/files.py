"""Writing files so that a crash never leaves a half-written file under the final name.

The one atomic-write helper of the project: weights, checkpoints, teacher labels, bulk and
client outputs all go through it. Standard library only, so the client package can use it
without torch.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], object] | bytes) -> Path:
    """Write ``path`` via a temporary file beside it, then rename it into place.

    ``write`` is the bytes to write, or a function that writes the file it is given.
    The temporary name is unique to this process and thread, so concurrent writers of the
    same path never mix their bytes: the last rename wins, whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        if isinstance(write, bytes):
            tmp.write_bytes(write)
        else:
            write(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

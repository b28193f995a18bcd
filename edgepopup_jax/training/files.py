"""Writing files so that a reader never sees half of one: write a temporary file, then rename."""
from __future__ import annotations

import json
import os

from etils import epath


def write_atomically(path, data: bytes) -> None:
    """Writes data to path via a temporary file in the same directory (local or gs://); the
    temporary name is per process, so processes sharing a directory do not collide."""
    path = epath.Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_bytes(data)
    tmp.replace(path)


def write_json_atomically(path, obj) -> None:
    write_atomically(path, json.dumps(obj, indent=2, default=str).encode())

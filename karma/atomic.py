"""Writing files so that a reader never sees half of one: temp file beside it, fsync, rename.

    write_text_atomic(run_dir / "train_summary.json", text)
    write_json_atomic(out / "metrics.json", metrics)

A crash (or kill -9) at any point leaves either the old file or the new one, plus at most a
stray `.<name>.tmp-<pid>` beside it. Directories (checkpoints, prepared datasets) are built in a
temp sibling and renamed the same way by their owners (karma.checkpoint, karma.data).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a temp file in the same directory and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """UTF-8 text version of `write_bytes_atomic`."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """`obj` as indented JSON plus a newline, written atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2) + "\n")

"""Writing files so that a reader never sees half of one: temp file beside it, fsync, rename.

    write_text_atomic(run_dir / "train_summary.json", text)
    write_json_atomic(out / "metrics.json", metrics)

A crash (or kill -9) at any point leaves either the old file or the new one, plus at most a
stray `.<name>.tmp-<pid>` beside it.

Output directories follow one policy: karma writes a marker file (`.karma-output`) into every
directory it creates, and never replaces, or writes into, a non-empty directory without it, nor
a directory holding the command's inputs. So a mistyped output path cannot delete a user's files.

    with replace_dir(out, "data.prepared_dir", inputs=[items_path]) as tmp:  # whole directory
        ...write into tmp...                 # renamed onto `out` when the block succeeds
    run_dir = ensure_output_dir(run_dir, "train.output_dir")   # a directory filled file by file
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from karma.errors import KarmaError


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


def write_tensor_atomic(path: str | Path, obj: Any) -> Path:
    """`torch.save(obj)` written atomically (a cache that a killed run must not leave torn)."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_bytes_atomic(path, buf.getvalue())


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """`obj` as indented JSON plus a newline, written atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Output directories: karma replaces or fills only directories it created itself.

OUTPUT_MARKER = ".karma-output"
_MARKER_TEXT = (
    "Written by karma. karma may replace this directory and everything in it; it never replaces\n"
    "a non-empty directory without this file.\n"
)


def is_karma_output(path: str | Path) -> bool:
    """True if `path` is a directory karma created (it holds the marker file)."""
    return (Path(path) / OUTPUT_MARKER).is_file()


def check_output_dir(
    path: str | Path, option: str, inputs: Iterable[str | Path | None] = ()
) -> Path:
    """Refuse `path` as an output directory unless karma may write (and replace) it.

    Allowed: a path that does not exist yet, an empty directory, or a directory holding the
    marker. Refused: a file, a symbolic link, a non-empty directory without the marker, and any
    directory that is, or holds, one of `inputs`. `option` names the setting to change in the
    message (e.g. "data.prepared_dir").
    """
    path = Path(path)
    if path.is_symlink():
        raise KarmaError(f"{path}: is a symbolic link; set {option} to a real directory")
    if path.exists() and not path.is_dir():
        raise KarmaError(f"{path}: exists and is not a directory; set {option} to a directory")
    resolved = path.resolve()
    for given in inputs:
        if not given:
            continue
        source = Path(given).resolve()
        if source == resolved or resolved in source.parents:
            raise KarmaError(
                f"{path}: holds the input {given}; karma never replaces a directory holding its "
                f"inputs: set {option} to a new directory"
            )
    if path.is_dir() and not is_karma_output(path) and any(path.iterdir()):
        raise KarmaError(
            f"{path}: not empty and not written by karma (no {OUTPUT_MARKER} file); karma never "
            f"overwrites what it did not create: set {option} to a new or empty directory (an "
            f"older karma's output: create an empty {path / OUTPUT_MARKER} to reuse it)"
        )
    return path


def ensure_output_dir(path: str | Path, option: str) -> Path:
    """Create (or reuse) an output directory that karma writes files into, and mark it as
    karma's. Refuses what `check_output_dir` refuses."""
    path = check_output_dir(path, option)
    path.mkdir(parents=True, exist_ok=True)
    if not is_karma_output(path):
        write_text_atomic(path / OUTPUT_MARKER, _MARKER_TEXT)
    return path


@contextmanager
def replace_dir(
    dest: str | Path, option: str, inputs: Iterable[str | Path | None] = ()
) -> Iterator[Path]:
    """Build a whole directory aside and rename it into place at `dest` when the block ends.

        with replace_dir(out, "data.prepared_dir", inputs=[items_path]) as tmp:
            write_json_atomic(tmp / "stats.json", stats)

    The block writes into a fresh temp sibling (marked as karma's); if it raises, `dest` is
    untouched and the sibling removed. `dest` is checked (`check_output_dir`) before the block
    and again just before the swap, so only a directory karma wrote is ever replaced. A crash
    leaves the old or the new directory at `dest`, or (between the two renames) the old one at
    `.<name>.old-<pid>` beside it.
    """
    dest = Path(dest)
    inputs = list(inputs)
    check_output_dir(dest, option, inputs)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        write_text_atomic(tmp / OUTPUT_MARKER, _MARKER_TEXT)
        yield tmp
        check_output_dir(dest, option, inputs)
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{os.getpid()}"
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)  # checked above: karma's own output
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # ours; gone already after a successful swap

"""Errors for bad input. The CLI prints them as one line (no traceback) and exits with status 2.

Every message names where the problem is: the file, the row, the field, or the config key, and
what to do about it. `user_message` is the one place that decides which exceptions are the
user's (a message) and which are karma's bugs (a traceback).
"""

from __future__ import annotations

import json


class KarmaError(ValueError):
    """Bad input from the user: a config, a data file, a request."""


class DataError(KarmaError):
    """A data file that breaks the data contract (message names file, row and field)."""


def utf8_error(path: object, line: int, exc: UnicodeDecodeError) -> str:
    """The message for a file that is not UTF-8: file, line and the offending byte."""
    byte = exc.object[exc.start]
    return (
        f"{path}: line {line} is not valid UTF-8 (byte 0x{byte:02x}); save the file as UTF-8"
    )


# What to do about an OS error, by kind; the message names the file.
_OS_HINTS: dict[type[OSError], str] = {
    FileNotFoundError: "check the path",
    PermissionError: "check the file's permissions",
    IsADirectoryError: "give a file, not a directory",
    NotADirectoryError: "give a directory, not a file",
}


def user_message(exc: BaseException) -> str | None:
    """One line for an error caused by the user's input or environment, None for a bug.

    Covered: every KarmaError, OS errors (missing, unreadable, not a file, disk full), and the
    format errors that reach here without a file name (not UTF-8, bad JSON, damaged weights).
    """
    if isinstance(exc, KarmaError):
        return str(exc)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename is not None else ""
        hint = next((h for kind, h in _OS_HINTS.items() if isinstance(exc, kind)), "")
        reason = exc.strerror or str(exc)
        return f"{where}{reason}" + (f"; {hint}" if hint else "")
    if isinstance(exc, UnicodeDecodeError):
        return f"an input file is not valid UTF-8 ({exc}); save it as UTF-8"
    if isinstance(exc, json.JSONDecodeError):
        return f"a JSON file is damaged ({exc}); restore or regenerate it"
    from safetensors import SafetensorError

    if isinstance(exc, SafetensorError):
        return f"a .safetensors weights file is damaged ({exc}); restore it or train again"
    return None

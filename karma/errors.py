"""Errors for bad input. The CLI prints them as one line (no traceback) and exits with status 2.

Every message names where the problem is: the file, the row, the field, or the config key.
"""


class KarmaError(ValueError):
    """Bad input from the user: a config, a data file, a request."""


class DataError(KarmaError):
    """A data file that breaks the data contract (message names file, row and field)."""

"""Error types the CLI turns into one readable line (no traceback)."""


class SraeError(Exception):
    """A user-facing error: bad input, bad config, missing data. The message is one line."""


class InputError(SraeError, ValueError):
    """Input data is invalid (NaN/inf, wrong shape, empty class, malformed file)."""

"""Error types the CLI turns into one readable line (no traceback)."""


class SraeError(Exception):
    """A user-facing error: bad input, bad config, missing data. The message is one line."""


class InputError(SraeError, ValueError):
    """Input data is invalid (NaN/inf, wrong shape, empty class, malformed file)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP: the terminal closed), raised in the main thread like Ctrl-C's
    KeyboardInterrupt, so cleanup runs (``finally`` blocks, context managers) before the
    command exits with status 128 + the signal number (143, 129)."""

    def __init__(self, signum: int = 15) -> None:
        super().__init__(signum)
        self.signum = signum

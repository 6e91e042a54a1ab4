"""A process-wide setting held by overlapping blocks, in any thread.

Some settings are global to the process (torch's TF32 flags, zarr's write_empty_chunks).
A block that needs one saves it, sets it and restores it on exit; but Prefect runs tasks in
parallel threads, and with a plain save/restore the first block to finish puts the old value
back while another block still depends on the new one. :class:`SharedSetting` counts its
holders instead: the first one in saves and sets, the last one out restores.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any


class SharedSetting:
    """``read()`` returns the current value, ``write(v)`` sets it; :meth:`held` keeps ``value``
    in force while any holder is inside. (Code that writes the setting itself while a block
    runs is not guarded against.)"""

    def __init__(self, read: Callable[[], Any], write: Callable[[Any], None], value: Any) -> None:
        self._read, self._write, self._value = read, write, value
        self._lock = threading.Lock()
        self._holders = 0
        self._saved: Any = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            if self._holders == 0:
                self._saved = self._read()
                self._write(self._value)
            self._holders += 1
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                if self._holders == 0:
                    self._write(self._saved)
                    self._saved = None

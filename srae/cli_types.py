"""argparse ``type=`` checkers shared by the subcommands: a bad value is a usage error
(exit status 2, one line naming the option) before any work starts."""

from __future__ import annotations

import argparse
import math
from urllib.parse import urlsplit


def count(minimum: int):
    """An integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return value

    return parse


def seconds(text: str) -> float:
    """A finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds > 0")
    return value


def http_url(text: str) -> str:
    """An http(s) URL with a host."""
    try:
        parts = urlsplit(text)
        host = parts.hostname
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http(s) URL with a host")
    return text


def md5(text: str) -> str:
    """32 hex digits, lower-cased (the rule of the config's ``dataset.md5``)."""
    from srae.config import md5_hex

    try:
        return md5_hex(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an md5 (32 hex digits)") from None


def device(text: str) -> str:
    """A device string (auto, cpu, mps, cuda, cuda:N)."""
    from srae.devices import check_device

    try:
        return check_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} {exc}") from None

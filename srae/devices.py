"""Device names the tool accepts, checked without torch or pydantic (the config, the CLIs and
the backbones share one rule)."""

from __future__ import annotations

import re


def check_device(v: str) -> str:
    """``v`` when it names a device (auto, cpu, mps, cuda, cuda:N), else ValueError."""
    if v in ("auto", "cpu", "mps") or re.fullmatch(r"cuda(:\d+)?", v):
        return v
    raise ValueError("must be auto, cpu, mps, cuda or cuda:N")

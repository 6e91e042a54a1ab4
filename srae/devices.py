"""Device names the tool accepts, checked without torch or pydantic (the config, the CLIs and
the backbones share one rule), and their resolution on this machine (torch imported lazily)."""

from __future__ import annotations

import re
from typing import Any


def check_device(v: str) -> str:
    """``v`` when it names a device (auto, cpu, mps, cuda, cuda:N), else ValueError."""
    if v in ("auto", "cpu", "mps") or re.fullmatch(r"cuda(:\d+)?", v):
        return v
    raise ValueError("must be auto, cpu, mps, cuda or cuda:N")


def device_unavailable(device: str) -> str | None:
    """Why this machine cannot run on ``device`` (a checked name other than ``auto``), e.g.
    ``"CUDA is not available on this machine"``; None when it can. Imports torch."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return "CUDA is not available on this machine"
        if dev.index is not None and dev.index >= count:
            return f"this machine has {count} CUDA device(s)"
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        return "MPS is not available on this machine"
    return None


def resolve_device(device: str | Any = "auto") -> Any:
    """``"auto"`` -> cuda when available, else cpu; anything else is checked (name, then this
    machine) and returned as a ``torch.device``; a bad one is an InputError in one line."""
    import torch

    from srae.errors import InputError

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        check_device(str(device))
    except ValueError:
        raise InputError(f"device {str(device)!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    reason = device_unavailable(str(device))
    if reason:
        raise InputError(f"device {device!r}: {reason}")
    return torch.device(device)

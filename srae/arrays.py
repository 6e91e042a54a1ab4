"""Array inputs as numpy, whatever the caller holds (numpy, lists, torch tensors)."""

from __future__ import annotations

from typing import Any

import numpy as np

from srae.errors import InputError


def as_numpy(x: Any, name: str) -> np.ndarray:
    """Return ``x`` (numpy array or torch tensor) as a numpy array without importing torch:
    a tensor is detached and copied to the host (bfloat16, which numpy lacks, as float32)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
        x = x.numpy()
    try:
        return np.asarray(x)
    except Exception as exc:  # noqa: BLE001 - anything unconvertible is a user error
        raise InputError(f"{name}: cannot be read as an array ({exc})") from exc

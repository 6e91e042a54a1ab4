"""Dataset download, readers (CUB-200-2011, ADE20K/Places365) and synthetic generators."""

from srae.datasets.common import DatasetIndex

__all__ = ["DatasetIndex"]

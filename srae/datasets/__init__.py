"""Dataset download, readers (CUB-200-2011, ADE20K/Places365), synthetic generators and their
counterfactual renders (:mod:`srae.datasets.counterfactual`: the same scene with one part
swapped; docs/design.md, "Causal ground truth")."""

from srae.datasets.common import DatasetIndex

__all__ = ["DatasetIndex"]

"""Per-category sample design (paper Sec. 4), CV folds and per-member minibatch streams."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from srae.errors import InputError


@dataclass(frozen=True)
class SampleDesign:
    """Rows (into the feature matrix) used to train and test one category's explainer."""

    category: int
    train_idx: np.ndarray
    train_pos: np.ndarray  # bool, aligned with train_idx
    test_idx: np.ndarray
    test_pos: np.ndarray

    def counts(self) -> dict[str, int]:
        return {
            "train_pos": int(self.train_pos.sum()),
            "train_neg": int((~self.train_pos).sum()),
            "test_pos": int(self.test_pos.sum()),
            "test_neg": int((~self.test_pos).sum()),
        }


def design_samples(
    labels: np.ndarray,
    category: int,
    *,
    n_pos: int,
    n_neg: int,
    n_test_neg: int,
    seed: int,
    splits: np.ndarray | None = None,
    category_name: str | None = None,
) -> SampleDesign:
    """Draw train = ``n_pos`` positives + ``n_neg`` negatives, test = the remaining positives +
    ``n_test_neg`` negatives (paper CUB: 50 + 8000 / rest + 2000).

    With ``splits`` (array of "train"/"test"), positives and negatives come from the dataset's own
    split instead of one pool. When a class has too few positives, about 5/6 go to training and at
    least one to test (if there are two or more). Negatives shrink proportionally when scarce,
    keeping at least one on each side that asks for any.
    """
    labels = np.asarray(labels)
    name = category_name or f"category {category}"
    rng = np.random.default_rng([int(seed), int(category)])
    pos_all = np.flatnonzero(labels == category)
    neg_all = np.flatnonzero(labels != category)
    if pos_all.size == 0:
        raise InputError(f"{name}: no positive samples (label {category} never occurs)")
    if neg_all.size == 0:
        raise InputError(f"{name}: no negative samples (every sample has label {category})")

    if splits is not None:
        splits = np.asarray(splits)
        tr_pos = rng.permutation(pos_all[splits[pos_all] == "train"])[:n_pos]
        te_pos = pos_all[splits[pos_all] != "train"]
        tr_neg_pool = rng.permutation(neg_all[splits[neg_all] == "train"])
        te_neg_pool = rng.permutation(neg_all[splits[neg_all] != "train"])
        tr_neg, te_neg = tr_neg_pool[:n_neg], te_neg_pool[:n_test_neg]
        if tr_pos.size == 0:
            raise InputError(f"{name}: no positive samples in the train split")
    else:
        perm = rng.permutation(pos_all)
        if perm.size > n_pos:
            k = n_pos
        elif perm.size >= 2:
            k = min(perm.size - 1, max(1, round(perm.size * 5 / 6)))
        else:
            k = perm.size
        tr_pos, te_pos = perm[:k], perm[k:]
        neg = rng.permutation(neg_all)
        want = n_neg + n_test_neg
        if neg.size < want:
            k_tr = int(math.floor(neg.size * n_neg / max(want, 1)))
            # Rounding must not leave either side empty: a model trained on positives alone
            # learns nothing about the class boundary (n_neg=5 beside n_test_neg=2000 gave 0).
            if n_neg > 0:
                k_tr = max(k_tr, 1)
            if n_test_neg > 0 and neg.size >= 2:
                k_tr = min(k_tr, neg.size - 1)
            tr_neg, te_neg = neg[:k_tr], neg[k_tr:]
        else:
            tr_neg, te_neg = neg[:n_neg], neg[n_neg:want]
    train_idx = np.concatenate([np.sort(tr_pos), np.sort(tr_neg)]).astype(np.int64)
    test_idx = np.concatenate([np.sort(te_pos), np.sort(te_neg)]).astype(np.int64)
    return SampleDesign(
        category=int(category),
        train_idx=train_idx,
        train_pos=labels[train_idx] == category,
        test_idx=test_idx,
        test_pos=labels[test_idx] == category,
    )


def stratified_folds(is_pos: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Split positions ``0..len-1`` into ``k`` folds, positives and negatives spread evenly."""
    rng = np.random.default_rng(int(seed))
    folds: list[list[np.ndarray]] = [[] for _ in range(k)]
    for cls in (True, False):
        pos = rng.permutation(np.flatnonzero(is_pos == cls))
        for f, part in enumerate(np.array_split(pos, k)):
            folds[f].append(part)
    return [np.sort(np.concatenate(f)).astype(np.int64) for f in folds]


def derive_seed(*parts: int) -> int:
    """A deterministic 31-bit seed from integers (independent of PYTHONHASHSEED)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0]) & 0x7FFFFFFF


def minibatch_stream(seed: int, n: int, batch: int) -> Iterator[np.ndarray]:
    """Endless minibatches of ``batch`` positions in ``0..n-1``: consecutive slices of
    concatenated random permutations drawn from a generator seeded with ``seed`` alone."""
    if batch > n:
        raise ValueError(f"minibatch of {batch} from only {n} samples")
    gen = torch.Generator().manual_seed(int(seed))
    buf = np.empty(0, dtype=np.int64)
    while True:
        while buf.size < batch:
            buf = np.concatenate([buf, torch.randperm(n, generator=gen).numpy()])
        out, buf = buf[:batch], buf[batch:]
        yield out

"""Blocked cosine search: each sample's k nearest neighbours and every pair above a threshold, never an N x N matrix."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Neighbours:
    """Result of `search`: (n, k) neighbour indices and cosines, and near-duplicate pairs (i < j)."""

    index: np.ndarray
    cosine: np.ndarray
    pairs: np.ndarray  # (m, 2) int64, i < j, most similar first
    pair_cosine: np.ndarray  # (m,) float32
    pairs_capped: bool


def unit_rows(embeddings: np.ndarray, center: bool = True) -> np.ndarray:
    """Rows scaled to unit length, after removing the mean row when `center`.

    Pooled features after a ReLU are all positive, so raw cosines of unrelated radiographs bunch near 1
    (0.9+ for an untrained ResNet); without the shared mean the cosine spreads over [-1, 1] and a
    threshold near 1 singles out real near-copies.
    """
    x = np.asarray(embeddings, dtype=np.float32)
    if center and len(x) > 1:
        x = x - x.mean(axis=0, keepdims=True, dtype=np.float64).astype(np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def search(
    unit: np.ndarray,
    *,
    k: int = 5,
    threshold: float = 0.98,
    device: str = "cpu",
    block_bytes: int = 256 << 20,
    max_pairs: int = 1_000_000,
) -> Neighbours:
    """k nearest neighbours (self excluded) and pairs with cosine >= threshold of unit-length rows.

    Rows are compared block by block: a (b, n) similarity block of at most `block_bytes` float32 values is
    one matrix multiply (on `device`: a GPU takes 500,000 x 512 in minutes), reduced to its top k and its
    above-threshold pairs before the next. At most `max_pairs` pairs are kept (`pairs_capped` says so).
    """
    import torch

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = len(unit)
    kk = min(k, max(n - 1, 0))
    index = np.zeros((n, kk), np.int64)
    cosine = np.zeros((n, kk), np.float32)
    found_pairs: list[np.ndarray] = []
    found_cos: list[np.ndarray] = []
    kept, capped = 0, False
    if n == 0:
        return Neighbours(index, cosine, np.zeros((0, 2), np.int64), np.zeros(0, np.float32), False)
    x = torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32)).to(device)
    block = max(1, min(n, block_bytes // (4 * n)))
    for start in range(0, n, block):
        stop = min(n, start + block)
        sims = x[start:stop] @ x.T  # (b, n)
        rows = torch.arange(stop - start, device=sims.device)
        sims[rows, rows + start] = -float("inf")  # a sample is not its own neighbour or duplicate
        if kk:
            values, columns = sims.topk(kk, dim=1)
            index[start:stop] = columns.cpu().numpy()
            cosine[start:stop] = values.cpu().numpy()
        if capped:
            continue
        hits = torch.nonzero(sims >= threshold)
        hits = hits[hits[:, 1] > hits[:, 0] + start]  # each pair once, as (i, j) with i < j
        if len(hits):
            found_cos.append(sims[hits[:, 0], hits[:, 1]].cpu().numpy())
            hits[:, 0] += start
            found_pairs.append(hits.cpu().numpy())
            kept += len(hits)
            if kept > max_pairs:
                capped = True
    pairs = np.concatenate(found_pairs) if found_pairs else np.zeros((0, 2), np.int64)
    pair_cosine = np.concatenate(found_cos) if found_cos else np.zeros(0, np.float32)
    order = np.argsort(-pair_cosine, kind="stable")[:max_pairs]
    return Neighbours(index, cosine, pairs[order].astype(np.int64), pair_cosine[order], capped)

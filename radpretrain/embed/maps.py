"""Embeddings -> a 2D map (PCA, or UMAP when umap-learn is installed) drawn as PNGs coloured by a label."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from radpretrain.errors import ConfigError

#: 2D projections `project` knows.
METHODS: tuple[str, ...] = ("pca", "umap")
#: Categories drawn in their own colour; the rest are grey "other".
TOP_CATEGORIES = 12


def project(embeddings: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """(n, F) -> (n, 2). PCA from the F x F covariance (memory independent of n); UMAP needs umap-learn."""
    check_method(method)
    x = np.asarray(embeddings, dtype=np.float32)
    if len(x) < 3:
        return np.zeros((len(x), 2), np.float32)
    if method == "umap":
        import umap

        return np.asarray(umap.UMAP(n_components=2, random_state=seed).fit_transform(x), dtype=np.float32)
    mean = x.mean(axis=0, dtype=np.float64)
    covariance = np.zeros((x.shape[1], x.shape[1]), np.float64)
    for start in range(0, len(x), 65536):
        chunk = x[start : start + 65536].astype(np.float64) - mean
        covariance += chunk.T @ chunk
    _, vectors = np.linalg.eigh(covariance)
    axes = vectors[:, ::-1][:, :2]
    # eigh's signs are arbitrary; fix them so the same data always draws the same picture
    axes *= np.where(axes[np.abs(axes).argmax(axis=0), [0, 1]] < 0, -1.0, 1.0)
    return ((x - mean) @ axes).astype(np.float32)


def check_method(method: str) -> None:
    """ConfigError unless `method` is known and, for UMAP, umap-learn is installed (checked before any work)."""
    if method not in METHODS:
        from radpretrain.registry import did_you_mean

        hint = did_you_mean(method, METHODS)
        raise ConfigError(f"Unknown map method '{method}'.{hint} Known: {', '.join(METHODS)}, or none")
    if method == "umap":
        try:
            import umap  # noqa: F401
        except ImportError:
            raise ConfigError(
                "--map umap needs the package umap-learn: pip install umap-learn (or use --map pca)"
            ) from None


def draw_map(xy: np.ndarray, labels: Sequence[str | None], field: str, path: Path, title: str) -> None:
    """A scatter PNG of `xy` coloured by `labels` (the TOP_CATEGORIES most common, the rest grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from radpretrain.files import atomic_path

    names = ["missing" if value is None else str(value) for value in labels]
    top = [name for name, _ in Counter(names).most_common(TOP_CATEGORIES)]
    figure, axis = plt.subplots(figsize=(8, 7), dpi=120)
    size = float(np.clip(2000.0 / max(len(names), 1), 0.5, 12.0))
    palette = plt.get_cmap("tab20")
    shown = set(top)
    rest = np.array([name not in shown for name in names])
    if rest.any():
        axis.scatter(xy[rest, 0], xy[rest, 1], s=size, c="lightgrey", label=f"other ({int(rest.sum())})", linewidths=0)
    for number, name in enumerate(top):
        mask = np.array([value == name for value in names])
        axis.scatter(
            xy[mask, 0],
            xy[mask, 1],
            s=size,
            color=palette(number % 20),
            label=f"{name} ({int(mask.sum())})",
            linewidths=0,
        )
    axis.set_title(title)
    axis.set_xticks([])
    axis.set_yticks([])
    axis.legend(
        title=field.replace("_", " "), loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=max(1.0, 4 / size)
    )
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)

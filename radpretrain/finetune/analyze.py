"""What finetuning changed in an encoder: per-stage linear CKA before vs after, and first-layer filters.

- [0] Similarity of Neural Network Representations Revisited, Kornblith, Norouzi, Lee, Hinton 2019,
  https://arxiv.org/abs/1905.00414 (linear CKA)
- [1] Transfusion: Understanding Transfer Learning for Medical Imaging, Raghu et al. 2019,
  https://arxiv.org/abs/1902.07208 (representation similarity per layer, first-layer filters)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch
from torch import nn

from radpretrain.errors import CohortError, ConfigError


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations of the same n examples [0].

    Args:
        x: (n, p) features.
        y: (n, q) features.

    Returns:
        ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) after centring each feature: 1 for representations that
        differ by an orthogonal transform and isotropic scaling, near 0 for unrelated ones.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same examples, got {x.shape[0]} and {y.shape[0]} rows")
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    denominator = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(cross / denominator) if denominator > 0 else float("nan")


def positions_as_examples(feature_map: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) -> (B * positions, C): channels are the neurons, each position a data point [1]."""
    return feature_map.flatten(2).transpose(1, 2).reshape(-1, feature_map.shape[1])


@torch.no_grad()
def stage_cka(before: nn.Module, after: nn.Module, images: torch.Tensor) -> list[float]:
    """Linear CKA between the two encoders' outputs of each stage on the same images."""
    before.eval()
    after.eval()
    maps_before = _intermediates(before, images)
    maps_after = _intermediates(after, images)
    if len(maps_before) != len(maps_after):
        raise ConfigError("the two encoders have different numbers of stages; compare the same architecture")
    return [
        linear_cka(positions_as_examples(a), positions_as_examples(b))
        for a, b in zip(maps_before, maps_after, strict=True)
    ]


def _intermediates(encoder: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    forward = cast(Callable[..., list[torch.Tensor]], encoder.forward_intermediates)
    return forward(images, intermediates_only=True)


def first_conv(encoder: nn.Module) -> torch.Tensor:
    """Weights (out, in, k, k) of the encoder's first convolution."""
    for module in encoder.modules():
        if isinstance(module, nn.Conv2d):
            return module.weight.detach().cpu()
    raise ConfigError(f"{type(encoder).__name__} has no Conv2d layer to picture")


def plot_cka(stages: list[float], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=120)
    ax.bar(range(len(stages)), stages, color="tab:blue")
    for i, value in enumerate(stages):
        ax.text(i, value + 0.01, f"{value:.2f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(stages)), [f"stage {i}" for i in range(len(stages))])
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("linear CKA (before vs after)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_filters(before: torch.Tensor, after: torch.Tensor, path: Path, max_filters: int = 64) -> Path:
    """Rows of first-layer filters: before and after on one symmetric colour scale, then their difference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(before.shape[0], max_filters)
    scale = float(max(before.abs().max(), after.abs().max()))
    diff = (after - before)[:n, 0]
    # Finetuning often moves first-layer filters little (Raghu et al.): the difference gets its own scale.
    diff_scale = max(float(diff.abs().max()), 1e-12)
    rows = [
        ("before", before[:n, 0], scale),
        ("after", after[:n, 0], scale),
        (f"after - before (colour scale x{scale / diff_scale:.1f})", diff, diff_scale),
    ]
    cols = min(n, 16)
    lines = -(-n // cols)
    fig, axes = plt.subplots(
        3 * lines, cols, figsize=(cols * 0.6 + 0.8, 3 * lines * 0.62 + 0.4), dpi=120, squeeze=False
    )
    for r, (label, filters, limit) in enumerate(rows):
        for i in range(lines * cols):
            ax = axes[r * lines + i // cols, i % cols]
            ax.set_axis_off()
            if i < n:
                ax.imshow(filters[i].numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        # Text instead of a title: a long title would make a layout engine shrink the first column.
        first = axes[r * lines, 0]
        first.text(0.0, 1.12, label, transform=first.transAxes, ha="left", va="bottom", fontsize=8)
    fig.suptitle("first-layer filters (input channel 0)", fontsize=9)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.8, wspace=0.12, hspace=0.55)
    fig.savefig(path)
    plt.close(fig)
    return path


def cohort_images(cohort_path: Path, images: int, size: int, structure: str | None = None) -> torch.Tensor:
    """The first `images` images of a 2D cohort, under the encoder intensity convention, as (N, 1, H, W)."""
    from radpretrain.data.cohorts import load_cohort
    from radpretrain.data.dataset import CohortDataset

    cohort = load_cohort(cohort_path, structure=structure)
    if cohort.spatial_dims != 2:
        raise CohortError("analyze compares 2D encoders; give a 2D cohort (images with masks or labels)")
    cases = [c for c in cohort.cases if c.target is not None][:images]
    if len(cases) < 2:
        raise CohortError("analyze needs at least two labeled images in the cohort")
    dataset = CohortDataset(cohort, cases, size, augment=False)
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


def analyze(
    before: Path,
    after: Path,
    cohort: Path,
    out: Path,
    *,
    images: int = 32,
    size: int = 224,
    structure: str | None = None,
) -> list[Path]:
    """Write cka.json, cka.png and filters.png comparing two exported encoders on a cohort's images."""
    from radpretrain.models.encoders import load_encoder, read_card

    enc_before, enc_after = load_encoder(before), load_encoder(after)
    names = read_card(before)["timm_name"], read_card(after)["timm_name"]
    if names[0] != names[1]:
        raise ConfigError(
            f"analyze compares one architecture before and after finetuning, got {names[0]} and {names[1]}"
        )
    batch = cohort_images(cohort, images, size, structure)
    values = stage_cka(enc_before, enc_after, batch)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "encoder": names[0],
        "images": int(batch.shape[0]),
        "size": size,
        "method": "linear CKA (Kornblith et al. 2019), spatial positions as examples",
        "stage_cka": values,
    }
    (out / "cka.json").write_text(json.dumps(record, indent=2) + "\n")
    files = [out / "cka.json"]
    files.append(plot_cka(values, out / "cka.png", f"{names[0]}: representation kept per stage (n={batch.shape[0]})"))
    files.append(plot_filters(first_conv(enc_before), first_conv(enc_after), out / "filters.png"))
    return files

"""Linear CKA against Kornblith et al.'s HSIC formula, and `radpretrain analyze` end to end."""

from __future__ import annotations

import json

import pytest
import torch

from radpretrain.cli import main
from radpretrain.errors import ConfigError
from radpretrain.finetune import analyze
from radpretrain.models.encoders import build_encoder, save_encoder


def hsic_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Slow, obvious reference: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with K = XX^T, L = YY^T, H = I - 11^T/n."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = x.double() @ x.double().T, y.double() @ y.double().T

    def hsic(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.trace(a @ h @ b @ h) / (n - 1) ** 2

    return float(hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l)))


def test_linear_cka_matches_the_hsic_formula_and_its_invariances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 12, generator=g)
    y = x @ torch.randn(12, 7, generator=g) + 0.5 * torch.randn(60, 7, generator=g)
    assert analyze.linear_cka(x, y) == pytest.approx(hsic_cka(x, y), rel=1e-9)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    assert analyze.linear_cka(x, 3.0 * x @ q + 1.0) == pytest.approx(1.0)
    assert analyze.linear_cka(x, x) == pytest.approx(1.0)
    unrelated = torch.randn(60, 12, generator=g)
    assert analyze.linear_cka(x, unrelated) < 0.35
    with pytest.raises(ValueError, match="same examples"):
        analyze.linear_cka(x, x[:10])


def test_positions_are_examples():
    maps = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    flat = analyze.positions_as_examples(maps)
    assert flat.shape == (8, 3)
    torch.testing.assert_close(flat[5], maps[1, :, 0, 1])


def test_stage_cka_is_one_for_the_same_encoder_and_drops_with_change():
    torch.manual_seed(0)
    encoder = build_encoder("test_resnet")
    images = torch.randn(6, 1, 32, 32)
    same = analyze.stage_cka(encoder, encoder, images)
    assert len(same) == 5 and all(v == pytest.approx(1.0) for v in same)
    changed = build_encoder("test_resnet")
    changed.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        for p in changed.layer4.parameters():
            p.add_(torch.randn_like(p))
    values = analyze.stage_cka(encoder, changed, images)
    assert values[:4] == pytest.approx([1.0] * 4) and values[4] < 0.99


def test_analyze_refuses_two_architectures(tmp_path):
    save_encoder(build_encoder("test_resnet"), tmp_path / "a", {})
    save_encoder(build_encoder("cbr_small"), tmp_path / "b", {})
    with pytest.raises(ConfigError, match="one architecture"):
        analyze.analyze(tmp_path / "a", tmp_path / "b", tmp_path, tmp_path / "out")
    assert (
        main(
            [
                "analyze",
                "--before",
                str(tmp_path / "a"),
                "--after",
                str(tmp_path / "nope"),
                "--cohort",
                "x",
                "--out",
                "y",
            ]
        )
        == 2
    )


def test_analyze_writes_cka_and_filter_pictures(tmp_path, lung_cohort, finetuned_run):
    before, after = finetuned_run
    out = tmp_path / "analysis"
    assert (
        main(
            [
                "analyze",
                "--before",
                str(before),
                "--after",
                str(after),
                "--cohort",
                str(lung_cohort),
                "--out",
                str(out),
                "--images",
                "8",
                "--size",
                "32",
                "--structure",
                "lungs",
            ]
        )
        == 0
    )
    record = json.loads((out / "cka.json").read_text())
    assert record["images"] == 8 and len(record["stage_cka"]) == 5
    assert all(0.0 <= v <= 1.0 + 1e-9 for v in record["stage_cka"])
    # Finetuning moved the encoder: not every stage kept its representation exactly.
    assert min(record["stage_cka"]) < 0.9999
    for name in ("cka.png", "filters.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"

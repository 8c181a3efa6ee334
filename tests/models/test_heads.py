"""Classifier = encoder + its global pool + linear head, for 2D images and inflated 3D volumes."""

from __future__ import annotations

import pytest
import torch

from radpretrain.errors import ConfigError
from radpretrain.models.encoders import build_encoder
from radpretrain.models.heads import Classifier
from radpretrain.models.inflate import inflate


@pytest.mark.parametrize(
    ("name", "spatial_dims"), [("test_resnet", 2), ("test_vit", 2), ("cbr_small", 2), ("cbr_small", 3)]
)
def test_logits_have_one_row_per_case(name: str, spatial_dims: int) -> None:
    encoder = build_encoder(name, img_size=32) if "vit" in name else build_encoder(name)
    if spatial_dims == 3:
        encoder = inflate(encoder)
    model = Classifier(encoder, 3, dropout=0.1)
    assert model.encoder is encoder and model.spatial_dims == spatial_dims
    size = 16 if spatial_dims == 3 else 32  # the CBR encoders reduce by 16
    logits = model(torch.randn(2, 1, *([size] * spatial_dims)))
    assert logits.shape == (2, 3)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    assert next(encoder.parameters()).grad is not None


def test_a_centre_inflated_classifier_agrees_with_the_2d_one_on_constant_depth() -> None:
    torch.manual_seed(0)
    model2d = Classifier(build_encoder("test_resnet"), 4).eval()
    model3d = Classifier(inflate(model2d.encoder, "centre"), 4).eval()
    model3d.head.load_state_dict(model2d.head.state_dict())
    image = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model3d(image[:, :, None].expand(2, 1, 32, 32, 32)), model2d(image), atol=1e-4, rtol=1e-4
        )


def test_bad_arguments_and_inputs_are_refused() -> None:
    encoder = build_encoder("test_resnet")
    with pytest.raises(ConfigError, match="num_classes must be a positive integer"):
        Classifier(encoder, 0)
    with pytest.raises(ConfigError, match="dropout must be in"):
        Classifier(encoder, 2, dropout=1.0)
    with pytest.raises(ConfigError, match="has no num_features"):
        Classifier(torch.nn.Conv2d(1, 2, 3), 2)
    model = Classifier(encoder, 2)
    with pytest.raises(ConfigError, match=r"takes \(B, C, H, W\) batches"):
        model(torch.randn(1, 1, 32, 32, 32))
    with pytest.raises(ConfigError, match="every side must be at least 32"):
        model(torch.randn(1, 1, 16, 16))

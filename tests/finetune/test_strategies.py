"""Transfer strategies: spec parsing and what each does to an encoder's weights and trainable set."""

from __future__ import annotations

import pytest
import torch

from radpretrain.errors import ConfigError
from radpretrain.finetune import strategies as st
from radpretrain.finetune.config import StrategyOptions
from radpretrain.models.encoders import build_encoder, encoder_stages


@pytest.fixture
def pretrained():
    torch.manual_seed(0)
    encoder = build_encoder("test_resnet")
    # Pretend pretraining moved the weights away from any fresh initialisation.
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.3 + 0.1 * torch.randn_like(p))
        for b in encoder.buffers():
            if b.is_floating_point():
                b.add_(0.5)
    return encoder


def ctx_for(encoder, **options) -> st.TransferContext:
    return st.TransferContext(stages=encoder_stages(encoder), options=StrategyOptions(**options), seed=0)


def changed(before: dict, encoder, prefixes) -> dict[str, bool]:
    after = encoder.state_dict()
    return {
        k: not torch.equal(before[k], after[k])
        for k in before
        if st.under(k, prefixes) and before[k].is_floating_point()
    }


def test_specs_parse_and_unknown_names_suggest():
    assert st.parse_spec("transfusion:2") == st.StrategySpec("transfusion", "2")
    assert st.parse_spec("weak+lp-ft") == st.StrategySpec("lp-ft", None, "then")
    assert st.parse_spec("weak-only") == st.StrategySpec("random", None, "only")
    assert str(st.parse_spec("weak+transfusion:1")) == "weak+transfusion:1"
    with pytest.raises(ConfigError, match=r"Unknown strategy 'ful'\. Did you mean 'full'\?"):
        st.parse_spec("ful")
    with pytest.raises(ConfigError, match=r"needs the number of stages to transfer, e.g. transfusion:2"):
        st.build_strategy("transfusion")
    with pytest.raises(ConfigError, match="needs the number of stages"):
        st.build_strategy("transfusion:two")
    with pytest.raises(ConfigError, match="takes no ':3' argument"):
        st.build_strategy("full:3")
    assert {"random", "full", "frozen", "partial", "transfusion", "meanvar", "lp-ft", "dwp"} <= set(st.STRATEGIES)


def test_random_is_he_initialised(pretrained):
    ctx = ctx_for(pretrained)
    before = {k: v.clone() for k, v in pretrained.state_dict().items()}
    st.build_strategy("random").init_encoder(pretrained, ctx)
    assert all(changed(before, pretrained, [""] + [p for s in ctx.stages for p in s]).values())
    weight = pretrained.layer2[0].conv2.weight  # 48 x 48 x 3 x 3: fan_out = 48 * 9
    assert weight.mean().abs() < 0.01
    assert weight.std().item() == pytest.approx((2.0 / (48 * 9)) ** 0.5, rel=0.1)
    assert torch.equal(pretrained.bn1.weight, torch.ones(32)) and pretrained.bn1.running_var.eq(1).all()


@pytest.mark.parametrize("k", [0, 2, 5])
def test_transfusion_keeps_the_first_k_stages(pretrained, k):
    ctx = ctx_for(pretrained)
    before = {name: v.clone() for name, v in pretrained.state_dict().items()}
    st.build_strategy(f"transfusion:{k}").init_encoder(pretrained, ctx)
    kept = [p for s in ctx.stages[:k] for p in s]
    redone = [p for s in ctx.stages[k:] for p in s]
    assert not any(changed(before, pretrained, kept).values())
    fresh = changed(before, pretrained, redone)
    assert all(fresh.values()) and (len(fresh) > 0) == (k < 5)
    with pytest.raises(ConfigError, match="transfusion:6 asks for 6 stages but the encoder has 5"):
        st.build_strategy("transfusion:6").init_encoder(pretrained, ctx)


def test_meanvar_keeps_each_tensors_mean_and_variance_only(pretrained):
    before = {name: p.detach().clone() for name, p in pretrained.named_parameters()}
    st.build_strategy("meanvar").init_encoder(pretrained, ctx_for(pretrained))
    for name, p in pretrained.named_parameters():
        old = before[name]
        if old.numel() < 500:
            continue
        assert p.mean().item() == pytest.approx(old.mean().item(), abs=4 * old.std().item() / old.numel() ** 0.5)
        assert p.std().item() == pytest.approx(old.std().item(), rel=0.1)
        # i.i.d. draws: no memory of where each pretrained value was.
        assert abs(torch.corrcoef(torch.stack([p.detach().flatten(), old.flatten()]))[0, 1]) < 0.15
    assert pretrained.bn1.running_mean.eq(0).all()


def test_phases_freeze_the_right_parameters(pretrained):
    ctx = ctx_for(pretrained, partial_ends=1, lp_fraction=0.3, ft_lr_scale=0.2)
    assert st.build_strategy("full").phases(ctx) == [st.Phase("train", 1.0)]
    assert st.build_strategy("frozen").phases(ctx) == [st.Phase("train", 1.0, ("encoder",))]
    (partial,) = st.build_strategy("partial").phases(ctx)
    assert partial.frozen == ("encoder.layer1", "encoder.layer2", "encoder.layer3")
    probe, finetune = st.build_strategy("lp-ft").phases(ctx)
    assert (probe.share, probe.frozen) == (0.3, ("encoder",))
    assert (finetune.share, finetune.frozen, finetune.lr_scale) == (pytest.approx(0.7), (), 0.2)
    with pytest.raises(ConfigError, match=r"nothing would be frozen; lower options\.partial_ends"):
        st.build_strategy("partial").phases(ctx_for(pretrained, partial_ends=3))
    assert st.under("encoder.layer1.0.conv1.weight", ("encoder.layer1",))
    assert not st.under("encoder.layer10.weight", ("encoder.layer1",))

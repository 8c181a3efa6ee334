"""Deep weight prior: kernel VAEs, the variational convolution and the KL upper bound against references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from radpretrain.errors import ConfigError
from radpretrain.finetune import dwp
from radpretrain.finetune.config import DwpConfig
from radpretrain.models.encoders import build_encoder, encoder_stages


def structured_kernels(n: int, seed: int = 0) -> torch.Tensor:
    """3x3 kernels that live near a 2D subspace: edge and blob detectors with random gains, plus noise."""
    g = torch.Generator().manual_seed(seed)
    edge = torch.tensor([[-1.0, 0.0, 1.0]] * 3).flatten()
    blob = torch.tensor([[0.0, 1.0, 0.0], [1.0, 2.0, 1.0], [0.0, 1.0, 0.0]]).flatten()
    gains = torch.randn(n, 2, generator=g) * 0.2
    return gains[:, :1] * edge + gains[:, 1:] * blob + 0.01 * torch.randn(n, 9, generator=g)


def iw_log_prob(vae: dwp.KernelVAE, w: torch.Tensor, samples: int) -> torch.Tensor:
    """Slow reference: importance-weighted estimate of log p(w) with r(z|w) as proposal (tight for many samples)."""
    z_mean, z_log_var = vae.encode(w)
    z = z_mean + (0.5 * z_log_var).exp() * torch.randn(samples, *z_mean.shape)
    w_mean, w_log_var = vae.decode(z)
    log_weights = (
        dwp.gaussian_log_prob(w, w_mean, w_log_var)
        + dwp.gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))
        - dwp.gaussian_log_prob(z, z_mean, z_log_var)
    )
    return torch.logsumexp(log_weights, 0) - math.log(samples)


@pytest.fixture(scope="module")
def trained_prior():
    torch.manual_seed(0)
    kernels = {"stage0": structured_kernels(4000)}
    cfg = DwpConfig(vae_steps=600, vae_batch=256, hidden=32)
    before = dwp.KernelPrior({"stage0": 9}, cfg.latent, cfg.hidden)
    return kernels, before, dwp.train_prior(kernels, cfg, seed=0)


def test_gaussian_log_prob_matches_torch():
    x, mean, log_var = torch.randn(5, 9), torch.randn(5, 9), torch.randn(5, 9)
    ref = torch.distributions.Normal(mean, (0.5 * log_var).exp()).log_prob(x).sum(-1)
    torch.testing.assert_close(dwp.gaussian_log_prob(x, mean, log_var), ref)


def test_training_raises_the_elbo_and_the_elbo_bounds_log_p(trained_prior):
    kernels, untrained, prior = trained_prior
    held_out = structured_kernels(500, seed=1)
    vae = prior.vae("stage0")
    assert vae is not None and vae.latent == 6
    with torch.no_grad():
        elbo_before = untrained.vae("stage0").elbo(held_out).mean()
        elbo_after = vae.elbo(held_out).mean()
        # Held-out kernels of the same family: log-density far above that of an untrained VAE.
        assert elbo_after > elbo_before + 10
        # The ELBO is a lower bound of log p(w); the importance-weighted estimate is tighter.
        elbo = torch.stack([vae.elbo(held_out) for _ in range(20)]).mean(0)
        iw = iw_log_prob(vae, held_out, 512)
        assert (elbo <= iw + 0.05).float().mean() > 0.95
        # Kernels unlike the sources (e.g. a diagonal detector at the same scale) are less likely.
        odd = torch.eye(3).flatten().repeat(500, 1) * 0.3
        assert vae.elbo(odd).mean() < elbo_after - 10
        # Samples resemble the sources: same mean magnitude.
        samples = vae.sample(2000, torch.Generator().manual_seed(0))
        assert samples.abs().mean() == pytest.approx(kernels["stage0"].abs().mean(), rel=0.25)


def test_variational_conv_moments_match_sampling_kernels():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=True)
    layer = dwp.VariationalConv(conv, init_log_var=math.log(0.05**2))
    x = torch.randn(1, 2, 6, 6)
    layer.eval()
    torch.testing.assert_close(layer(x), conv(x))
    layer.train()
    draws = torch.stack([layer(x) for _ in range(3000)])
    # Slow reference: sample whole kernels from q and convolve.
    std = (0.5 * layer.log_var).exp()
    ref = torch.stack(
        [F.conv2d(x, layer.weight + std * torch.randn_like(std), layer.bias, padding=1) for _ in range(3000)]
    )
    torch.testing.assert_close(draws.mean(0), conv(x).detach(), atol=0.02, rtol=0)
    torch.testing.assert_close(draws.var(0), ref.var(0), atol=0.01, rtol=0.15)


def test_kl_bound_is_an_upper_bound_and_its_subsample_is_unbiased(trained_prior):
    _, _, prior = trained_prior
    torch.manual_seed(0)
    vae = prior.vae("stage0")
    encoder = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1))
    with torch.no_grad():
        encoder[0].weight.copy_(vae.sample(32).reshape(8, 4, 3, 3))
    stages = [["0"]]
    layers = dwp.make_variational(encoder, prior, stages, DwpConfig(init_log_var=math.log(0.02**2)))
    assert layers == {"0": "stage0"} and isinstance(encoder[0], dwp.VariationalConv)
    with torch.no_grad():
        full = torch.stack([dwp.kl_bound(encoder, layers, prior) for _ in range(200)]).mean()
        sub = torch.stack([dwp.kl_bound(encoder, layers, prior, kernel_sample=8) for _ in range(800)]).mean()
        # Monte Carlo KL(q || p) with the tight importance-weighted log p(w): the bound lies above it.
        layer = encoder[0]
        mean, log_var = dwp.flat_kernels(layer.weight), dwp.flat_kernels(layer.log_var)
        terms = []
        for _ in range(10):
            w = mean + (0.5 * log_var).exp() * torch.randn_like(mean)
            terms.append((dwp.gaussian_log_prob(w, mean, log_var) - iw_log_prob(vae, w, 256)).sum())
        kl = torch.stack(terms).mean()
    assert full >= kl - 1.0
    assert sub == pytest.approx(float(full), rel=0.05, abs=5.0)
    # Gradients of the bound reach the posterior means and variances, not the frozen prior.
    dwp.kl_bound(encoder, layers, prior).backward()
    assert encoder[0].weight.grad is not None and encoder[0].log_var.grad.abs().sum() > 0
    assert all(p.grad is None for p in prior.parameters())


def test_encoder_kernels_grouped_by_stage_and_made_variational(tmp_path):
    torch.manual_seed(0)
    sources = [build_encoder("test_resnet") for _ in range(2)]
    stages = encoder_stages(sources[0])
    kernels = dwp.collect_kernels(sources, stages, "stage")
    assert set(kernels) == {f"stage{i}" for i in range(5)}
    # layer1 of test_resnet: two 32x32 3x3 convolutions per source encoder.
    assert kernels["stage1"].shape == (2 * 2 * 32 * 32, 9)
    by_layer = dwp.collect_kernels(sources, stages, "layer")
    assert "layer1.0.conv1" in by_layer and "layer3.0.conv1" not in by_layer  # a 1x1 convolution
    cfg = DwpConfig(vae_steps=5, vae_batch=64, hidden=8, cache=tmp_path / "priors")
    prior = dwp.load_or_train_prior(kernels, cfg, seed=0)
    assert prior is dwp.load_or_train_prior(kernels, cfg, seed=0)
    dwp._MEMORY.clear()
    reloaded = dwp.load_or_train_prior(kernels, cfg, seed=0)
    assert reloaded is not prior
    torch.testing.assert_close(reloaded.state_dict(), prior.state_dict())

    target = build_encoder("test_resnet")
    reference = {k: v.clone() for k, v in target.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    layers = dwp.make_variational(target, reloaded, stages, DwpConfig(init="paper"), generator=generator)
    # 3 stem + 2 + 2 + 1 (the bottleneck's middle) + 2 three-by-three convolutions.
    assert len(layers) == 10 and layers["layer2.0.conv2"] == "stage2"
    assert not torch.equal(target.layer1[0].conv1.weight, reference["layer1.0.conv1.weight"])
    target.train()
    out = target(torch.randn(2, 1, 32, 32))
    loss = out.pow(2).mean() + dwp.kl_bound(target, layers, reloaded, kernel_sample=64) * 1e-4
    assert torch.isfinite(loss)
    loss.backward()
    assert target.layer4[0].conv2.log_var.grad is not None


def test_no_matching_layers_is_a_clear_error():
    prior = dwp.KernelPrior({"stage0": 25})
    with pytest.raises(ConfigError, match="no convolution of the target encoder matches"):
        dwp.make_variational(nn.Sequential(nn.Conv2d(1, 2, 3)), prior, [["0"]], DwpConfig())
    with pytest.raises(ConfigError, match="no convolutions with k x k kernels"):
        dwp.collect_kernels([nn.Sequential(nn.Conv2d(1, 2, 1))], [["0"]])


# --------------------------------------------------------------------------------------------------------------
# The two recipes (dwp.init): the paper's (separate sources, posterior from prior samples) and the encoder one.
# --------------------------------------------------------------------------------------------------------------


def _dwp_cfg(cohort, encoder, **dwp_options):
    from radpretrain.finetune.config import FinetuneConfig

    options = {"vae_steps": 5, "vae_batch": 64, "hidden": 8, "kernel_sample": 64, **dwp_options}
    return FinetuneConfig(
        cohort=cohort,
        structure="lungs",
        encoder=str(encoder),
        strategy="dwp",
        size=32,
        seed=3,
        cpu=True,
        dwp=DwpConfig(**options),
    )


@pytest.fixture(scope="module")
def source_models(tmp_path_factory):
    """Two separately 'trained' test_resnets: an exported encoder and a three-channel timm hub checkpoint."""
    import timm
    from timm.models._hub import save_for_hf

    from radpretrain.models.encoders import save_encoder

    out = tmp_path_factory.mktemp("dwp-sources")
    torch.manual_seed(11)
    exported = build_encoder("test_resnet")
    with torch.no_grad():
        for p in exported.parameters():
            p.mul_(1.0 + 0.2 * torch.randn_like(p))
    save_encoder(exported, out / "a", {"pretext_tasks": {"none": 1.0}})
    save_for_hf(timm.create_model("test_resnet", pretrained=False), str(out / "b"), safe_serialization=True)
    return [out / "a", out / "b"]


def test_paper_recipe_needs_separate_sources(lung_cohort, pretrained_encoder):
    from radpretrain.data.cohorts import load_cohort
    from radpretrain.finetune.build import build_model

    cohort = load_cohort(lung_cohort, structure="lungs")
    assert DwpConfig().init == "paper"
    with pytest.raises(ConfigError, match=r"learns its prior from separate source models: set dwp.sources"):
        build_model(_dwp_cfg(lung_cohort, pretrained_encoder), cohort)
    with pytest.raises(ConfigError, match="holds this run's own encoder weights"):
        build_model(_dwp_cfg(lung_cohort, pretrained_encoder, sources=[pretrained_encoder]), cohort)


def test_paper_recipe_starts_from_prior_samples_and_fresh_weights(lung_cohort, pretrained_encoder, source_models):
    from safetensors.torch import load_file

    from radpretrain.data.cohorts import load_cohort
    from radpretrain.finetune.build import build_model

    dwp._MEMORY.clear()
    cohort = load_cohort(lung_cohort, structure="lungs")
    cfg = _dwp_cfg(lung_cohort, pretrained_encoder, sources=source_models)
    built = build_model(cfg, cohort)
    encoder, strategy = built.model.encoder, built.strategy
    pretrained = load_file(str(pretrained_encoder / "encoder.safetensors"))
    # The prior learned from the two sources' kernels, not from the target's.
    sources = [built.ctx.sources[0], built.ctx.sources[1]]
    kernels = dwp.collect_kernels(sources, built.ctx.stages, "stage")
    assert dwp.prior_key(kernels, cfg.dwp, cfg.dwp.seed) in dwp._MEMORY
    # Posterior means: draws from the learned prior with the run's seed, in layer order; variances at init_log_var.
    generator = torch.Generator().manual_seed(cfg.seed)
    for name, group in strategy.layers.items():
        layer = encoder.get_submodule(name)
        n = dwp.flat_kernels(layer.weight).shape[0]
        expected = strategy.prior.vae(group).sample(n, generator).reshape(layer.weight.shape)
        torch.testing.assert_close(layer.weight.detach(), expected)
        assert torch.all(layer.log_var == cfg.dwp.init_log_var)
        assert not torch.equal(layer.weight.detach(), pretrained[f"{name}.weight"])
    # Every other weight starts fresh (He init, as in `random`): the target fixes the architecture only.
    assert torch.equal(encoder.conv1[1].weight, torch.ones_like(encoder.conv1[1].weight))
    assert not torch.equal(encoder.conv1[1].weight, pretrained["conv1.1.weight"])
    assert not torch.equal(encoder.layer3[0].conv1.weight, pretrained["layer3.0.conv1.weight"])  # a 1x1


def test_encoder_recipe_keeps_todays_behaviour(lung_cohort, pretrained_encoder, source_models):
    from safetensors.torch import load_file

    from radpretrain.data.cohorts import load_cohort
    from radpretrain.finetune.build import build_model

    cohort = load_cohort(lung_cohort, structure="lungs")
    pretrained = load_file(str(pretrained_encoder / "encoder.safetensors"))
    for sources in ([], source_models):
        built = build_model(_dwp_cfg(lung_cohort, pretrained_encoder, init="encoder", sources=sources), cohort)
        encoder = built.model.encoder
        if not sources:
            # No sources: the prior learns from a copy of the run's own pretrained encoder.
            (own,) = built.ctx.sources
            assert torch.equal(own.layer1[0].conv1.weight, pretrained["layer1.0.conv1.weight"])
        # Posterior means at the pretrained kernels, every other weight kept.
        for name in built.strategy.layers:
            assert torch.equal(encoder.get_submodule(name).weight.detach(), pretrained[f"{name}.weight"])
        assert torch.equal(encoder.conv1[1].weight, pretrained["conv1.1.weight"])


def test_sources_of_another_architecture_are_refused(lung_cohort, pretrained_encoder, tmp_path):
    import timm
    from timm.models._hub import save_for_hf

    from radpretrain.data.cohorts import load_cohort
    from radpretrain.finetune.build import build_model

    save_for_hf(timm.create_model("resnet18", pretrained=False), str(tmp_path / "r18"), safe_serialization=True)
    cfg = _dwp_cfg(lung_cohort, pretrained_encoder, sources=[tmp_path / "r18"])
    with pytest.raises(ConfigError, match="are for 'resnet18', the encoder is 'test_resnet'"):
        build_model(cfg, load_cohort(lung_cohort, structure="lungs"))

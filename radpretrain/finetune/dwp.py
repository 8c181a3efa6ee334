"""The deep weight prior: kernel VAEs trained on source filters, variational convolutions and the KL bound.

- [0] The Deep Weight Prior, Atanov, Ashukha, Struminsky, Vetrov, Welling 2018 (ICLR 2019),
  https://arxiv.org/abs/1810.06943
- [1] Bayesian Generative Models for Knowledge Transfer in MRI Semantic Segmentation Problems, Kuzina,
  Egorov, Burnaev 2019, https://arxiv.org/abs/1906.12281 (3D MRI segmentation, latent size 6)

Source kernels (every k x k slice of a convolution with k > 1) are grouped by encoder stage or by layer;
one small VAE per group learns p(w) = ∫ p(w|z) p(z) dz. The target model's convolutions in those groups
become Gaussian variational layers q(w) = N(mu, sigma^2) (local reparameterisation in the forward
pass), and training minimises the task loss plus the paper's upper bound on KL(q(w) || p(w)):

    KL(q || p) <= E_q(w)[ log q(w) - E_r(z|w)[ log p(w|z) + log p(z) - log r(z|w) ] ],

where r(z|w), the VAE's encoder, is the auxiliary inference model. The entropy of q is exact; the
cross term is estimated with one (w, z) sample on a random subset of kernels per layer, scaled to an
unbiased estimate of the whole layer.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from radpretrain.errors import ConfigError
from radpretrain.files import atomic_path, write_text
from radpretrain.finetune.config import DwpConfig

log = logging.getLogger(__name__)

LOG_2PI = math.log(2.0 * math.pi)
#: Bounds on the VAE decoder's log variance: keeps log p(w|z) finite for kernels the prior never saw.
MIN_LOG_VAR, MAX_LOG_VAR = -14.0, 4.0


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(n_in, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU(), nn.Linear(hidden, n_out)
    )


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, exp(log_var)) summed over the last dimension."""
    return -0.5 * (LOG_2PI + log_var + (x - mean) ** 2 / log_var.exp()).sum(-1)


class KernelVAE(nn.Module):
    """A VAE over flattened convolution kernels: the learned prior of one group of layers [0].

    Args:
        kernel_dim: Values per kernel (9 for 3x3).
        latent: Latent size (6 as in [1]).
        hidden: Width of the two hidden layers of the encoder r(z|w) and decoder p(w|z).

    Shapes: kernels are (N, kernel_dim); `elbo` returns (N,).
    """

    def __init__(self, kernel_dim: int, latent: int = 6, hidden: int = 64) -> None:
        super().__init__()
        if kernel_dim < 1 or latent < 1 or hidden < 1:
            raise ValueError(f"kernel_dim, latent and hidden must be >= 1, got {kernel_dim}, {latent}, {hidden}")
        self.kernel_dim = kernel_dim
        self.latent = latent
        self.hidden = hidden
        self.encoder = _mlp(kernel_dim, hidden, 2 * latent)
        self.decoder = _mlp(latent, hidden, 2 * kernel_dim)

    def encode(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log variance of r(z|w)."""
        mean, log_var = self.encoder(w).chunk(2, dim=-1)
        return mean, log_var.clamp(MIN_LOG_VAR, MAX_LOG_VAR)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log variance of p(w|z)."""
        mean, log_var = self.decoder(z).chunk(2, dim=-1)
        return mean, log_var.clamp(MIN_LOG_VAR, MAX_LOG_VAR)

    def elbo(self, w: torch.Tensor) -> torch.Tensor:
        """One-sample estimate of log p(w|z) + log p(z) - log r(z|w), z ~ r(z|w): a lower bound of log p(w)."""
        z_mean, z_log_var = self.encode(w)
        z = z_mean + (0.5 * z_log_var).exp() * torch.randn_like(z_mean)
        w_mean, w_log_var = self.decode(z)
        log_p_w = gaussian_log_prob(w, w_mean, w_log_var)
        log_p_z = gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))
        log_r_z = gaussian_log_prob(z, z_mean, z_log_var)
        return log_p_w + log_p_z - log_r_z

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw n kernels from the prior: z ~ N(0, I), w ~ p(w|z)."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent, generator=generator, device=device)
        mean, log_var = self.decode(z)
        return mean + (0.5 * log_var).exp() * torch.randn(mean.shape, generator=generator, device=device)


def flat_kernels(weight: torch.Tensor) -> torch.Tensor:
    """(out, in, [d,] k, k) -> (N, k*k): every spatial k x k slice is one kernel (3D kernels slice-wise)."""
    return weight.reshape(-1, weight.shape[-2] * weight.shape[-1])


def is_kernel_conv(module: nn.Module) -> bool:
    """Plain convolutions with spatial kernels (k > 1); 1x1 projections have no shape to learn a prior of."""
    if type(module) not in (nn.Conv2d, nn.Conv3d):
        return False
    assert isinstance(module, nn.Conv2d | nn.Conv3d)
    shape = module.weight.shape
    return module.padding_mode == "zeros" and shape[-1] > 1 and shape[-2] > 1


def group_of(name: str, stages: list[list[str]], mode: str) -> str | None:
    """The prior group of a layer of the encoder: `stage<i>` or the layer's own name."""
    if mode == "layer":
        return name
    for index, prefixes in enumerate(stages):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return f"stage{index}"
    return None


def collect_kernels(
    encoders: Iterable[nn.Module], stages: list[list[str]], mode: str = "stage"
) -> dict[str, torch.Tensor]:
    """Flattened kernels of every source encoder, grouped by stage or layer; groups keep one kernel size."""
    found: dict[str, list[torch.Tensor]] = {}
    for encoder in encoders:
        for name, module in encoder.named_modules():
            if not is_kernel_conv(module):
                continue
            group = group_of(name, stages, mode)
            if group is None:
                continue
            kernels = flat_kernels(module.weight.detach().float().cpu())
            if found.get(group) and found[group][0].shape[1] != kernels.shape[1]:
                # One VAE models one kernel size; a stage mixing sizes keeps its first.
                continue
            found.setdefault(group, []).append(kernels)
    if not found:
        raise ConfigError("the source encoders have no convolutions with k x k kernels (k > 1) to learn a prior from")
    return {group: torch.cat(parts) for group, parts in found.items()}


class KernelPrior(nn.Module):
    """One frozen `KernelVAE` per group of layers."""

    def __init__(self, kernel_dims: dict[str, int], latent: int = 6, hidden: int = 64) -> None:
        super().__init__()
        self.kernel_dims = dict(kernel_dims)
        self.latent = latent
        self.hidden = hidden
        # ModuleDict keys may not contain dots (layer-mode groups are module paths).
        self.vaes = nn.ModuleDict({_key(g): KernelVAE(k, latent, hidden) for g, k in kernel_dims.items()})

    def vae(self, group: str) -> KernelVAE | None:
        # ModuleDict has no .get().
        vae = dict(self.vaes.items()).get(_key(group))
        return vae if isinstance(vae, KernelVAE) else None

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # Weights first, each file whole: a prior.json (what `load_or_train_prior` looks for) means a whole prior.
        with atomic_path(folder / "prior.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp))
        meta = {"kernel_dims": self.kernel_dims, "latent": self.latent, "hidden": self.hidden}
        write_text(folder / "prior.json", json.dumps(meta, indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> KernelPrior:
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            meta = json.loads((folder / "prior.json").read_text())
            prior = cls(meta["kernel_dims"], meta["latent"], meta["hidden"])
            prior.load_state_dict(load_file(str(folder / "prior.safetensors")), strict=True)
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            raise ConfigError(
                f"the deep weight prior in {folder} cannot be read ({exc}); delete it to retrain"
            ) from None
        return prior


def _key(group: str) -> str:
    return group.replace(".", "__")


def train_prior(
    kernels: dict[str, torch.Tensor], cfg: DwpConfig, *, seed: int = 0, device: str | torch.device = "cpu"
) -> KernelPrior:
    """Fit one VAE per group to its source kernels by maximising the ELBO (Adam, minibatches of kernels)."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    prior = KernelPrior({g: k.shape[1] for g, k in kernels.items()}, cfg.latent, cfg.hidden).to(device)
    for group, data in tqdm(sorted(kernels.items()), desc="dwp: kernel VAEs", unit="group", leave=False):
        vae = prior.vae(group)
        assert vae is not None
        data = data.to(device)
        optimiser = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
        for _ in range(cfg.vae_steps):
            index = torch.randint(0, data.shape[0], (min(cfg.vae_batch, data.shape[0]),), generator=generator)
            loss = -vae.elbo(data[index.to(device)]).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        vae.zero_grad(set_to_none=True)
        log.debug("dwp prior %s: %d kernels of %d values, final -ELBO %.3f", group, *data.shape, loss.item())
    prior.requires_grad_(False)
    return prior.eval()


_MEMORY: dict[str, KernelPrior] = {}


def prior_key(kernels: dict[str, torch.Tensor], cfg: DwpConfig, seed: int) -> str:
    """A digest of the source kernels and the VAE settings: equal keys give the same prior."""
    digest = hashlib.sha256()
    for group in sorted(kernels):
        digest.update(group.encode())
        digest.update(kernels[group].contiguous().numpy().tobytes())
    settings = {k: v for k, v in asdict(cfg).items() if k in ("latent", "hidden", "vae_steps", "vae_batch", "vae_lr")}
    digest.update(json.dumps({**settings, "seed": seed}, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def load_or_train_prior(
    kernels: dict[str, torch.Tensor], cfg: DwpConfig, *, seed: int = 0, device: str | torch.device = "cpu"
) -> KernelPrior:
    """Reuse a prior trained on the same kernels with the same settings (memory, then `cfg.cache`)."""
    key = prior_key(kernels, cfg, seed)
    if key in _MEMORY:
        return _MEMORY[key].to(device)
    folder = Path(cfg.cache) / key if cfg.cache is not None else None
    if folder is not None and (folder / "prior.json").is_file():
        prior = KernelPrior.load(folder)
        prior.requires_grad_(False)
        prior.eval()
    else:
        prior = train_prior(kernels, cfg, seed=seed, device="cpu")
        if folder is not None:
            prior.save(folder)
    _MEMORY[key] = prior
    return prior.to(device)


class VariationalConv(nn.Module):
    """A convolution with a factorised Gaussian posterior over its kernel, N(weight, exp(log_var)).

    Training draws the output with the local reparameterisation trick (Kingma et al. 2015,
    https://arxiv.org/abs/1506.02557): the pre-activation is Gaussian with mean conv(x, mu) and variance
    conv(x^2, sigma^2), which gives lower-variance gradients than sampling one kernel per batch. Eval
    uses the posterior mean. `weight` keeps its name so stage prefixes and state-dict keys still match.
    """

    def __init__(self, conv: nn.Conv2d | nn.Conv3d, init_log_var: float = -10.0) -> None:
        super().__init__()
        if not is_kernel_conv(conv):
            raise ValueError(f"VariationalConv wraps plain zero-padded Conv2d/Conv3d layers, got {conv}")
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.log_var = nn.Parameter(torch.full_like(conv.weight.detach(), init_log_var))
        self.bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self._conv = F.conv2d if isinstance(conv, nn.Conv2d) else F.conv3d

    def _apply_conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = self._apply_conv(x, self.weight, self.bias)
        if not self.training:
            return mean
        var = self._apply_conv(x * x, self.log_var.exp(), None)
        return mean + var.clamp_min(1e-16).sqrt() * torch.randn_like(mean)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, variational"


def make_variational(
    encoder: nn.Module,
    prior: KernelPrior,
    stages: list[list[str]],
    cfg: DwpConfig,
    *,
    generator: torch.Generator | None = None,
) -> dict[str, str]:
    """Replace the encoder's convolutions that have a prior by `VariationalConv`; returns layer -> group.

    With `cfg.init == "paper"` the posterior means start from kernels sampled from the prior (Atanov et al.'s
    code, `--init_list vae`; Kuzina et al. likewise), with `"encoder"` from the encoder's (pretrained) kernels.
    The log variances start at `cfg.init_log_var` either way.
    """
    layers: dict[str, str] = {}
    for name, module in list(encoder.named_modules()):
        if not is_kernel_conv(module):
            continue
        group = group_of(name, stages, cfg.groups)
        vae = prior.vae(group) if group is not None else None
        if vae is None or vae.kernel_dim != module.weight.shape[-1] * module.weight.shape[-2]:
            continue
        layer = VariationalConv(module, cfg.init_log_var)
        if cfg.init == "paper":
            with torch.no_grad():
                n = flat_kernels(layer.weight).shape[0]
                layer.weight.copy_(vae.sample(n, generator).cpu().reshape(layer.weight.shape))
        encoder.set_submodule(name, layer)
        layers[name] = str(group)
    if not layers:
        raise ConfigError("no convolution of the target encoder matches a deep-weight-prior group; check dwp.sources")
    return layers


def kl_bound(encoder: nn.Module, layers: dict[str, str], prior: KernelPrior, *, kernel_sample: int = 0) -> torch.Tensor:
    """Stochastic upper bound of KL(q(w) || p(w)) summed over the variational layers (nats).

    Per layer: -H(q) exactly, minus the VAE's ELBO of weights drawn from q (simple reparameterisation) on
    `kernel_sample` random kernels (0: all), scaled by (kernels in layer / kernels drawn).
    """
    total = torch.zeros((), device=next(encoder.parameters()).device)
    for name, group in layers.items():
        layer = encoder.get_submodule(name)
        vae = prior.vae(group)
        assert isinstance(layer, VariationalConv) and vae is not None
        mean, log_var = flat_kernels(layer.weight), flat_kernels(layer.log_var)
        n = mean.shape[0]
        if 0 < kernel_sample < n:
            index = torch.randperm(n, device=mean.device)[:kernel_sample]
            mean, log_var = mean[index], log_var[index]
        w = mean + (0.5 * log_var).exp() * torch.randn_like(mean)
        neg_entropy = -0.5 * (LOG_2PI + 1.0 + layer.log_var).sum()
        cross = -vae.elbo(w).sum() * (n / mean.shape[0])
        total = total + neg_entropy + cross
    return total


def to_deterministic(module: nn.Module) -> nn.Module:
    """A copy with every `VariationalConv` replaced by a plain convolution holding the posterior mean,
    so that a DWP-finetuned encoder exports and loads like any other."""
    module = copy.deepcopy(module)
    for name, layer in list(module.named_modules()):
        if not isinstance(layer, VariationalConv):
            continue
        conv_type = nn.Conv2d if layer.weight.dim() == 4 else nn.Conv3d
        conv = conv_type(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,  # type: ignore[arg-type]
            stride=layer.stride,  # type: ignore[arg-type]
            padding=layer.padding,  # type: ignore[arg-type]
            dilation=layer.dilation,  # type: ignore[arg-type]
            groups=layer.groups,
            bias=layer.bias is not None,
        )
        with torch.no_grad():
            conv.weight.copy_(layer.weight)
            if layer.bias is not None and conv.bias is not None:
                conv.bias.copy_(layer.bias)
        module.set_submodule(name, conv)
    return module

"""2D -> 3D inflation of a whole timm encoder: every layer replaced by its 3D twin, kernels inflated."""

from __future__ import annotations

import copy
import itertools
from typing import Any, cast

import torch
from torch import nn

from radpretrain.errors import ConfigError
from radpretrain.registry import did_you_mean

#: How a k x k kernel becomes d x k x k: "centre" puts it in the middle depth slice (zeros elsewhere), so
#: that a volume constant along depth gives the 2D output at every depth; "average" repeats it over depth
#: divided by d (Carreira & Zisserman 2017, I3D), which gives the same response to constant depth away
#: from the depth borders.
METHODS = ("centre", "average")

# Modules whose own forward only does rank-agnostic work (elementwise ops, calls to children, flatten
# from dim 1, `x.shape[0]`): they run unchanged on (B, C, D, H, W) once their 2D children are replaced.
# Listed by qualified class name so that a subclass with its own forward is never trusted by accident.
RANK_AGNOSTIC: set[str] = {
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.container.ModuleList",
    "torch.nn.modules.container.ModuleDict",
    "torch.nn.modules.linear.Identity",
    "torch.nn.modules.linear.Linear",
    "torch.nn.modules.flatten.Flatten",
    "torch.nn.modules.dropout.Dropout",
    "torch.nn.modules.normalization.GroupNorm",
    "torch.nn.modules.normalization.LayerNorm",
    "timm.layers.drop.DropPath",
    "timm.layers.classifier.ClassifierHead",
    "timm.models.resnet.ResNet",
    "timm.models.resnet.BasicBlock",
    "timm.models.resnet.Bottleneck",
    "radpretrain.models.cbr.CBRNet",
    "radpretrain.models.cbr.CBRBlock",
}

# Why some well-known 2D-only layers cannot be inflated, for the error message.
REFUSED: dict[str, str] = {
    "PatchEmbed": "vision transformers have a 2D patch grid and 2D position embeddings",
    "Conv2dSame": "TF-style 'same' padding is computed from height and width only",
    "MaxPool2dSame": "TF-style 'same' padding is computed from height and width only",
    "AvgPool2dSame": "TF-style 'same' padding is computed from height and width only",
    "LayerNorm2d": "it permutes 4D tensors to channels-last",
    "SEModule": "squeeze-excitation pools over height and width only",
    "SqueezeExcite": "squeeze-excitation pools over height and width only",
    "BatchNormAct2d": "it asserts 4D input",
    "DropBlock2d": "its blocks are drawn in 2D",
    "BlurPool2d": "its filter is 2D",
}


def inflate(encoder2d: nn.Module, method: str = "centre", depth_kernel: int = 3) -> nn.Module:
    """A 3D copy of a 2D encoder: same class, same forward code, 3D layers with inflated weights.

    The copy's `forward`, `forward_features` and `forward_intermediates` take (B, C, D, H, W) and give
    (B, num_features) and (B, C_i, D_i, H_i, W_i) maps; `.num_features` and `.feature_info` are kept
    (reductions are per axis). The input encoder is not changed.

    Depth rule: every layer treats depth like height (isotropic). A conv with a k x k kernel (k > 1)
    gets `depth_kernel` taps in depth (1 x 1 convs stay 1 x 1 x 1), padding `depth_kernel // 2` and the
    height stride; pools take the height kernel, stride and padding in depth too, so a (D, H, W) volume
    is reduced like an H x H image along depth, and a constant-depth volume passed through a "centre"
    inflation reproduces the 2D encoder at every kept depth slice exactly (train or eval mode). Global
    pools average over depth, height and width. Like images, volumes need every side (depth included)
    of at least the encoder's total reduction (32 for ResNets, 16 for most CBRs); the models check it.

    Supported: the ResNet family and the CBR family (and plain Sequential stacks of Conv2d, BatchNorm2d,
    InstanceNorm2d, GroupNorm, pools and activations). Any other layer type is refused with a
    ConfigError naming it rather than guessed at; register a rank-agnostic class in `RANK_AGNOSTIC`.

    - [0] I3D: Quo Vadis, Action Recognition?, Carreira & Zisserman 2017, https://arxiv.org/abs/1705.07750

    Args:
        encoder2d: A timm encoder (e.g. from `radpretrain.models.encoders.build_encoder`).
        method: "centre" or "average" (see `METHODS`).
        depth_kernel: Depth of inflated k x k kernels (k > 1); an odd number >= 1.

    Returns:
        The inflated copy, with `radpretrain_inflation = {"method", "depth_kernel"}` set.
    """
    _check_method(method)
    if isinstance(depth_kernel, bool) or not isinstance(depth_kernel, int) or depth_kernel < 1 or depth_kernel % 2 == 0:
        raise ConfigError(f"depth_kernel must be an odd integer >= 1 (e.g. 3), got {depth_kernel!r}")
    if spatial_dims_of(encoder2d) != 2:
        raise ConfigError("this encoder is already 3D; inflate the 2D encoder once")
    for path, module in encoder2d.named_modules():
        if type(module).__name__ in REFUSED:
            _refuse(f"layer '{path}'" if path else "the encoder", module)
    encoder3d = copy.deepcopy(encoder2d)
    _check_forward(encoder3d, "the encoder")
    _inflate_children(encoder3d, "", method, depth_kernel)
    encoder3d.radpretrain_inflation = {"method": method, "depth_kernel": depth_kernel}  # type: ignore[assignment]
    return encoder3d


def inflate_kernel(weight: torch.Tensor, depth: int, method: str) -> torch.Tensor:
    """(O, I, kh, kw) -> (O, I, depth, kh, kw) by `method`; both sum to the 2D kernel over depth."""
    _check_method(method)
    if method == "centre":
        out = weight.new_zeros((*weight.shape[:2], depth, *weight.shape[2:]))
        out[:, :, depth // 2] = weight
        return out
    return weight.unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth


def spatial_dims_of(model: nn.Module) -> int:
    """2 or 3: the rank of the first convolution (the stem) of a model."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return 2
        if isinstance(module, nn.Conv3d):
            return 3
    raise ConfigError(f"{type(model).__name__} has no 2D or 3D convolution; use a CNN or ViT encoder from timm")


def check_input(encoder: nn.Module, x: torch.Tensor, spatial_dims: int, min_side: int) -> None:
    """Refuse a batch the encoder cannot take, with a message that says what would work."""
    if x.ndim != spatial_dims + 2:
        layout = "(B, C, H, W)" if spatial_dims == 2 else "(B, C, D, H, W)"
        raise ConfigError(f"a {spatial_dims}D model takes {layout} batches, got shape {tuple(x.shape)}")
    sides = tuple(int(s) for s in x.shape[2:])
    shown = "x".join(str(s) for s in sides)
    patch = getattr(encoder, "patch_embed", None)
    fixed = getattr(patch, "img_size", None)
    if fixed is not None and getattr(patch, "strict_img_size", False) and tuple(fixed) != sides:
        raise ConfigError(
            f"this ViT encoder takes {'x'.join(str(s) for s in fixed)} inputs, got {shown}; set the cohort "
            "size to match or build the encoder with that img_size"
        )
    if min(sides) < min_side:
        raise ConfigError(
            f"input {shown} is too small for this encoder: every side must be at least {min_side} "
            "(its total reduction); use a larger size"
        )


def _check_method(method: str) -> None:
    if method not in METHODS:
        known = ", ".join(METHODS)
        raise ConfigError(f"Unknown inflation method '{method}'.{did_you_mean(method, METHODS)} Known: {known}")


# --------------------------------------------------------------------------------------------------------------
# Layer by layer.
# --------------------------------------------------------------------------------------------------------------


def _inflate_children(parent: nn.Module, prefix: str, method: str, depth_kernel: int) -> None:
    for name, child in parent.named_children():
        path = f"{prefix}{name}"
        new = _twin(child, method, depth_kernel)
        if new is not None:
            new.train(child.training)
            setattr(parent, name, new)
            continue
        _check_forward(child, f"layer '{path}'")
        _inflate_children(child, f"{path}.", method, depth_kernel)


def _check_forward(module: nn.Module, what: str) -> None:
    cls = type(module)
    if f"{cls.__module__}.{cls.__qualname__}" in RANK_AGNOSTIC or _is_activation(module):
        return
    _refuse(what, module)


def _refuse(what: str, module: nn.Module) -> None:
    cls = type(module)
    reason = REFUSED.get(cls.__name__, "its forward is not known to work on 3D tensors")
    raise ConfigError(
        f"cannot inflate {what} ({cls.__name__}): {reason}. 3D transfer supports the ResNet and CBR "
        "encoders (e.g. resnet18, resnet50, test_resnet, cbr_small); use one of them, or a from-scratch "
        "3D baseline (radpretrain.models.baselines3d.MODELS)"
    )


def _is_activation(module: nn.Module) -> bool:
    # Elementwise by definition; torch and timm keep every activation class in these modules.
    return type(module).__module__ in ("torch.nn.modules.activation", "timm.layers.activations")


def _depth(value: Any) -> tuple[int, int, int]:
    """A 2D size (int or (h, w)) as (d, h, w) with depth following height."""
    h, w = (value, value) if isinstance(value, int) else tuple(value)
    return (h, h, w)


def _twin(module: nn.Module, method: str, depth_kernel: int) -> nn.Module | None:
    """The 3D twin of a 2D layer, or None when the module is not a 2D layer with a twin."""
    kind = type(module)
    # Exact types: a subclass (e.g. timm's Conv2dSame) may compute its own 2D-only geometry.
    if kind is nn.Conv2d:
        return _conv3d(cast(nn.Conv2d, module), method, depth_kernel)
    if kind in (nn.BatchNorm2d, nn.InstanceNorm2d):
        return _copy_norm(cast(nn.modules.batchnorm._NormBase, module))
    if kind is nn.MaxPool2d:
        mp = cast(nn.MaxPool2d, module)
        return nn.MaxPool3d(
            _depth(mp.kernel_size),
            _depth(mp.stride),
            _depth(mp.padding),
            _depth(mp.dilation),
            return_indices=mp.return_indices,
            ceil_mode=mp.ceil_mode,
        )
    if kind is nn.AvgPool2d:
        ap = cast(nn.AvgPool2d, module)
        return nn.AvgPool3d(
            _depth(ap.kernel_size),
            _depth(ap.stride),
            _depth(ap.padding),
            ceil_mode=ap.ceil_mode,
            count_include_pad=ap.count_include_pad,
            divisor_override=ap.divisor_override,
        )
    if kind is nn.AdaptiveAvgPool2d:
        return nn.AdaptiveAvgPool3d(_output_size(cast(nn.AdaptiveAvgPool2d, module).output_size))
    if kind is nn.AdaptiveMaxPool2d:
        amp = cast(nn.AdaptiveMaxPool2d, module)
        return nn.AdaptiveMaxPool3d(_output_size(amp.output_size), return_indices=amp.return_indices)
    if kind is nn.Dropout2d:
        drop = cast(nn.Dropout2d, module)
        return nn.Dropout3d(drop.p, drop.inplace)
    if f"{kind.__module__}.{kind.__qualname__}" == "timm.layers.adaptive_avgmax_pool.SelectAdaptivePool2d":
        pool = cast(nn.Module, module.pool)
        if getattr(pool, "output_size", 1) not in (1, (1, 1)):
            raise ConfigError("only global pools (output size 1) of timm's SelectAdaptivePool2d can be inflated")
        # timm's "fast" pools flatten inside the pool module instead of a Flatten child.
        flatten = not isinstance(module.flatten, nn.Identity) or bool(getattr(pool, "flatten", False))
        return GlobalPool3d(str(module.pool_type), flatten=flatten)
    return None


def _output_size(size: Any) -> tuple[int | None, int | None, int | None]:
    h, w = (size, size) if size is None or isinstance(size, int) else tuple(size)
    return (h, h, w)


def _conv3d(conv: nn.Conv2d, method: str, depth_kernel: int) -> nn.Conv3d:
    kh, kw = conv.kernel_size
    kd = 1 if (kh, kw) == (1, 1) else depth_kernel
    padding: str | tuple[int, int, int]
    padding = conv.padding if isinstance(conv.padding, str) else (kd // 2, *_depth(conv.padding)[1:])
    weight = conv.weight
    new = nn.Conv3d(
        conv.in_channels,
        conv.out_channels,
        (kd, kh, kw),
        stride=_depth(conv.stride),
        padding=padding,
        dilation=(1, *conv.dilation),  # type: ignore[arg-type]
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(inflate_kernel(weight.detach(), kd, method))
        if conv.bias is not None and new.bias is not None:
            new.bias.copy_(conv.bias.detach())
    new.weight.requires_grad_(weight.requires_grad)
    if conv.bias is not None and new.bias is not None:
        new.bias.requires_grad_(conv.bias.requires_grad)
    return new


def _copy_norm(norm: nn.modules.batchnorm._NormBase) -> nn.Module:
    cls = nn.BatchNorm3d if isinstance(norm, nn.BatchNorm2d) else nn.InstanceNorm3d
    new = cls(norm.num_features, eps=norm.eps, affine=norm.affine, track_running_stats=norm.track_running_stats)
    new.momentum = norm.momentum
    new.load_state_dict(norm.state_dict())
    reference = next(itertools.chain(norm.parameters(), norm.buffers()), None)
    if reference is not None:
        new.to(reference.device, reference.dtype)
    for name, param in norm.named_parameters(recurse=False):
        getattr(new, name).requires_grad_(param.requires_grad)
    return new


class GlobalPool3d(nn.Module):
    """timm's SelectAdaptivePool2d over depth, height and width: (B, C, D, H, W) -> (B, C[, 1, 1, 1]).

    Args:
        pool_type: "avg", "max", "avgmax" (mean of both), "catavgmax" (both, concatenated on channels),
            any of them with timm's "fast" prefix, or "" (no pooling).
        flatten: Return (B, C) instead of (B, C, 1, 1, 1).
    """

    def __init__(self, pool_type: str = "avg", flatten: bool = True) -> None:
        super().__init__()
        kind = pool_type.lower().removeprefix("fast") or ("avg" if pool_type else "")
        if kind not in ("", "avg", "max", "avgmax", "catavgmax"):
            raise ConfigError(f"global pool type '{pool_type}' cannot be inflated; use avg, max, avgmax or catavgmax")
        self.pool_type = kind
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.pool_type:
            return x.flatten(1) if self.flatten else x
        dims = tuple(range(2, x.ndim))
        keep = not self.flatten
        if self.pool_type == "avg":
            return x.mean(dims, keepdim=keep)
        if self.pool_type == "max":
            return x.amax(dims, keepdim=keep)
        avg, peak = x.mean(dims, keepdim=keep), x.amax(dims, keepdim=keep)
        return 0.5 * (avg + peak) if self.pool_type == "avgmax" else torch.cat((avg, peak), 1)

    def is_identity(self) -> bool:
        return not self.pool_type

    def feat_mult(self) -> int:
        return 2 if self.pool_type == "catavgmax" else 1

"""DINO: a student matches a momentum teacher's centred, sharpened output across global and local crops."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from torch import nn

from radpretrain.errors import ConfigError
from radpretrain.pretrain.tasks.base import check_fraction, check_positive, is_vit, register_task
from radpretrain.pretrain.tasks.momentum import MomentumTask
from radpretrain.shards.format import LOCAL_VIEWS, STRONG_VIEWS


@register_task("dino")
class DINO(MomentumTask):
    """Self-distillation with multi-crop: lightly's DINO head and loss, teacher = EMA of the student.

    The student sees the two global views ("view0", "view1") and `local_views` small local crops
    ("local0".., the `augment.local` policy at `augment.local_size`); the teacher sees only the global
    views. The loss is the cross-entropy between the teacher's softmax (centred by a running mean of its
    outputs, synchronised across processes, and sharpened by a low temperature) and the student's, over
    every pair of different views. This is the method behind RAD-DINO (DINOv2 on chest radiographs).

    Works on CNNs and ViTs. A ViT must take the local crops' smaller size: build it with
    `encoder.options={dynamic_img_size: true}` (timm then resamples the position embeddings per input,
    as DINO's `interpolate_pos_encoding` does); the local size must be a multiple of its patch size.

    - [0] DINO, 2021, https://arxiv.org/abs/2104.14294
    - [1] https://github.com/facebookresearch/dino
    - [2] RAD-DINO, 2024, https://arxiv.org/abs/2401.10815

    Options:
        local_views: Local crops per image, 0 to 8 (DINO: 8 at 96 px with 224 px global views).
        output_dim: Prototypes K of the head's last layer (DINO: 65536).
        hidden_dim: Head MLP width (2048).
        bottleneck_dim: Head bottleneck before the weight-normalised last layer (256).
        batch_norm: Batch norm in the head's MLP (DINO: off; it was tried for ResNets).
        norm_last_layer: Fix the last layer's weight norm at 1 (DINO: on; off is better but less stable).
        student_temp: Student softmax temperature (0.1).
        teacher_temp: Teacher temperature after the warm-up (DINO ViT-S/16: 0.07; lower it if training is unstable).
        warmup_teacher_temp: Teacher temperature at the first step (0.04).
        teacher_temp_warmup: Fraction of the run over which the teacher temperature rises linearly (DINO: 30
            of 100 epochs, 0.3).
        center_momentum: EMA momentum of the teacher-output centre (0.9).
        momentum, momentum_end: Teacher EMA momentum, cosine-scheduled from the first to the second (0.996 -> 1).
        freeze_last_layer_steps: Steps during which the head's last layer gets a zero gradient (DINO: its
            first epoch; about 1250 steps of 1024 images), which keeps early training from collapsing.

    Logs: "teacher_temp", "momentum", "teacher_entropy" (mean entropy of the teacher's distribution over
    the prototypes; it falls towards 0 when the teacher collapses to one prototype and stays at log K
    when it collapses to uniform).
    """

    views = (*STRONG_VIEWS, *LOCAL_VIEWS)
    defaults: ClassVar[dict[str, Any]] = {
        "local_views": 8,
        "output_dim": 65536,
        "hidden_dim": 2048,
        "bottleneck_dim": 256,
        "batch_norm": False,
        "norm_last_layer": True,
        "student_temp": 0.1,
        "teacher_temp": 0.07,
        "warmup_teacher_temp": 0.04,
        "teacher_temp_warmup": 0.3,
        "center_momentum": 0.9,
        "momentum": 0.996,
        "momentum_end": 1.0,
        "freeze_last_layer_steps": 1250,
    }

    teacher_temp: torch.Tensor
    steps_done: torch.Tensor
    projection_head: DINOProjectionHead

    def __init__(
        self, encoder: nn.Module, num_features: int, options: Mapping[str, Any], vocab: Mapping[str, list[str]]
    ) -> None:
        super().__init__(encoder, num_features, options, vocab)
        opts = self.options
        check_positive(self.name, opts, "output_dim", "hidden_dim", "bottleneck_dim")
        check_positive(self.name, opts, "student_temp", "teacher_temp", "warmup_teacher_temp")
        check_fraction(self.name, opts, "center_momentum")
        if not 0.0 <= opts["teacher_temp_warmup"] <= 1.0:
            raise ConfigError(
                f"task_options.dino.teacher_temp_warmup is a fraction of the run within [0, 1], "
                f"got {opts['teacher_temp_warmup']}"
            )
        if not 0 <= opts["local_views"] <= len(LOCAL_VIEWS):
            raise ConfigError(
                f"task_options.dino.local_views must be within 0..{len(LOCAL_VIEWS)}, got {opts['local_views']}"
            )
        if opts["freeze_last_layer_steps"] < 0:
            raise ConfigError(
                f"task_options.dino.freeze_last_layer_steps must be >= 0, got {opts['freeze_last_layer_steps']}"
            )
        self.local_names = LOCAL_VIEWS[: opts["local_views"]]
        self.views = (*STRONG_VIEWS, *self.local_names)
        self.patch_size = 0
        if is_vit(encoder) and self.local_names:
            if not getattr(encoder, "dynamic_img_size", False):
                raise ConfigError(
                    "dino's local crops are smaller than data.image_size and this ViT takes one input size: "
                    "build it with encoder.options={dynamic_img_size: true} (or set task_options.dino.local_views=0)"
                )
            patch = getattr(getattr(encoder, "patch_embed", None), "patch_size", 16)
            self.patch_size = int(max(patch) if isinstance(patch, (tuple, list)) else patch)
        with warnings.catch_warnings():  # lightly's old-style weight_norm, replaced at once below
            warnings.filterwarnings("ignore", message=".*weight_norm.* is deprecated", category=FutureWarning)
            self.projection_head = DINOProjectionHead(
                num_features,
                opts["hidden_dim"],
                opts["bottleneck_dim"],
                opts["output_dim"],
                batch_norm=opts["batch_norm"],
                norm_last_layer=opts["norm_last_layer"],
            )
        self.projection_head.last_layer = weight_normed_layer(self.projection_head.last_layer, opts["norm_last_layer"])
        # The schedule lives in the loss call (teacher_temp=...), not in lightly's per-epoch table.
        self.criterion = DINOLoss(
            output_dim=opts["output_dim"],
            teacher_temp=opts["teacher_temp"],
            student_temp=opts["student_temp"],
            center_momentum=opts["center_momentum"],
            warmup_teacher_temp_epochs=1,
        )
        self.init_momentum(encoder)
        # Buffers, so a resumed run continues the schedule and the freeze where it stopped.
        first = opts["warmup_teacher_temp"] if opts["teacher_temp_warmup"] > 0 else opts["teacher_temp"]
        self.register_buffer("teacher_temp", torch.tensor(float(first)))
        self.register_buffer("steps_done", torch.tensor(0))
        # Registered after init_momentum copied the head: the teacher's copy has no gradients to freeze.
        for param in self.projection_head.last_layer.parameters():
            if param.requires_grad:
                param.register_hook(self._last_layer_grad)

    def teacher_temperature(self, step: int, total_steps: int) -> float:
        """DINO's teacher temperature at `step` (steps done) of `total_steps`: a linear warm-up, then constant."""
        start, end = self.options["warmup_teacher_temp"], self.options["teacher_temp"]
        warmup = round(self.options["teacher_temp_warmup"] * total_steps)
        if step >= warmup:
            return float(end)
        return float(start + (end - start) * step / warmup)

    def _last_layer_grad(self, grad: torch.Tensor) -> torch.Tensor:
        # A zero gradient (not None) keeps DDP's every-parameter contract; a tensor test needs no GPU sync.
        return grad * (self.steps_done >= self.options["freeze_last_layer_steps"]).to(grad.dtype)

    def forward(self, encoder: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        global_views = torch.cat([batch[name] for name in STRONG_VIEWS])
        student = list(self.projection_head(encoder(global_views)).chunk(len(STRONG_VIEWS)))
        if self.local_names:
            # One pass per resolution (DINO's MultiCropWrapper): all local crops share a size.
            local_views = torch.cat([batch[name] for name in self.local_names])
            side = local_views.shape[-1]
            if self.patch_size and side % self.patch_size:
                raise ConfigError(
                    f"dino's {side} px local crops do not fit the ViT's {self.patch_size} px patches: set "
                    f"augment.local_size to a multiple of {self.patch_size}"
                )
            student += list(self.projection_head(encoder(local_views)).chunk(len(self.local_names)))
        teacher = self.momentum_projection(global_views).float().chunk(len(STRONG_VIEWS))
        with torch.no_grad():  # before the loss moves the centre: the distribution this step's loss uses
            p = torch.softmax((torch.stack(teacher) - self.criterion.center) / self.teacher_temp, dim=-1)
            entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()
        # Softmaxes over K prototypes at temperature 0.04 in float32 even under autocast.
        with torch.autocast(global_views.device.type, enabled=False):
            loss = self.criterion(list(teacher), [s.float() for s in student], teacher_temp=float(self.teacher_temp))
        return {
            "loss": loss,
            "teacher_temp": self.teacher_temp.detach().clone(),
            "momentum": self.momentum.detach().clone(),
            "teacher_entropy": entropy,
        }

    @torch.no_grad()
    def after_step(self, encoder: nn.Module, step: int, total_steps: int) -> None:
        super().after_step(encoder, step, total_steps)
        self.steps_done.fill_(step)
        self.teacher_temp.fill_(self.teacher_temperature(step, total_steps))


def weight_normed_layer(layer: nn.Module, norm_last_layer: bool) -> nn.Module:
    """lightly's last layer (old-style `weight_norm`, gain 1) as the same map with torch's weight-norm parametrization.

    The old hooks keep a computed weight on the module that `copy.deepcopy` refuses (pytorch#103001), so
    the momentum copy could not be made; the parametrization copies, and is what torch recommends.
    """
    gain, direction = layer.get_parameter("weight_g").detach(), layer.get_parameter("weight_v").detach()
    weight = gain * direction / direction.norm(dim=1, keepdim=True)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    linear = nn.utils.parametrizations.weight_norm(linear)
    if norm_last_layer:  # the gain stays at 1: only the direction learns
        linear.parametrizations.weight.original0.requires_grad_(False)
    return linear

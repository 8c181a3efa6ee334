"""Run under torchrun by test_gather.py: NT-Xent gradients and MoCo's Shuffle-BN on two processes vs. one."""

from __future__ import annotations

import json
import sys

import lightly.utils.dist as lightly_dist
import torch
import torch.distributed as dist
from lightly.loss import NTXentLoss
from torch import nn
from torch.nn.parallel import DistributedDataParallel

BATCH, TEMPERATURE = 8, 0.5


def encoder() -> nn.Module:
    """The same weights in every process; no BatchNorm, so splitting the batch changes nothing else."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 8))


def views() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 12, generator=g), torch.randn(BATCH, 12, generator=g)


class LocalGradientGather(torch.autograd.Function):
    """lightly < 1.5.4's GatherLayer: each rank keeps only the gradient of its own loss (lightly#1528)."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x)
        return tuple(out)

    @staticmethod
    def backward(ctx: object, *grads: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grads[dist.get_rank()]


def two_processes(gather: object) -> tuple[float, list[torch.Tensor]]:
    """Half the batch here, NT-Xent with gathered negatives, DDP's gradient average: (mean loss, gradients)."""
    model = DistributedDataParallel(encoder())
    x0, x1 = views()
    half = BATCH // dist.get_world_size()
    part = slice(dist.get_rank() * half, (dist.get_rank() + 1) * half)
    lightly_dist.gather = gather  # type: ignore[assignment]
    loss = NTXentLoss(temperature=TEMPERATURE, gather_distributed=True)(model(x0[part]), model(x1[part]))
    loss.backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    return float(mean) / dist.get_world_size(), [p.grad.clone() for p in model.parameters()]


def shuffled_keys() -> dict[str, bool]:
    """MoCo's keys with lightly's cross-process shuffle: samples travel between ranks and come back in order."""
    from radpretrain.pretrain.tasks.moco import MoCo

    net = encoder()
    task = MoCo(net, 8, {"memory_bank_size": 0, "output_dim": 4}, {})
    seen: list[torch.Tensor] = []
    task.encoder_momentum.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    g = torch.Generator().manual_seed(2 + dist.get_rank())
    x = torch.randn(BATCH, 12, generator=g)
    keys = task.momentum_projection(x, shuffle=True)
    with torch.no_grad():
        in_order = task.projection_head_momentum(task.encoder_momentum(x))
    local = {tuple(row.tolist()) for row in x}
    foreign = sum(tuple(row.tolist()) not in local for row in torch.cat(seen))
    return {"keys_in_order": bool(torch.allclose(keys, in_order, atol=1e-6)), "saw_other_rank": foreign > 0}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    lightly_gather = lightly_dist.gather
    loss, grads = two_processes(lightly_gather)
    _, old_grads = two_processes(LocalGradientGather.apply)
    lightly_dist.gather = lightly_gather
    whole = encoder()
    x0, x1 = views()
    reference = NTXentLoss(temperature=TEMPERATURE)(whole(x0), whole(x1))
    reference.backward()
    ref_grads = [p.grad for p in whole.parameters()]
    shuffle = shuffled_keys()
    both = [None, None]
    dist.all_gather_object(both, shuffle)
    if dist.get_rank() == 0:
        result = {
            "shuffle": both,
            "loss": loss,
            "reference_loss": float(reference),
            "grad_diff": max(float((a - b).abs().max()) for a, b in zip(grads, ref_grads, strict=True)),
            "old_grad_diff": max(float((a - b).abs().max()) for a, b in zip(old_grads, ref_grads, strict=True)),
            "grad_size": max(float(g.abs().max()) for g in ref_grads),
        }
        with open(out, "w") as handle:
            json.dump(result, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

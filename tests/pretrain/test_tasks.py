"""Pretext tasks: every registered task trains the encoder; losses agree with slow, obvious references."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightly.loss import NTXentLoss
from lightly.models.utils import patchify
from torch import nn

from radpretrain.data.transforms import local_view_size
from radpretrain.errors import ConfigError
from radpretrain.models.encoders import build_encoder, encoder_stages
from radpretrain.pretrain.tasks import TASKS, build_objective
from radpretrain.pretrain.tasks.mae import random_patch_tokens
from radpretrain.pretrain.tasks.metadata import class_weights, focal_cross_entropy
from radpretrain.pretrain.tasks.moco import contrastive_v3
from radpretrain.pretrain.tasks.patch_ae import grid_to_patches, hide_patches, masked_patch_loss, random_patch_mask
from radpretrain.shards.format import LOCAL_VIEWS, VIEW_NAMES

VOCAB = {
    "body_part": ["chest", "hand", "knee", "unknown"],
    "age_bucket": ["0-1", "18-39", "40-64"],
    "sex": ["F", "M"],
    "view": ["PA", "AP", "LAT"],
}
TINY = {"cnn": "test_resnet", "vit": "test_vit"}
SIZE = 64


def make_batch(views: tuple[str, ...], b: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # local views (DINO's multi-crop) come at their own, smaller size, as the loader makes them
    sizes = {view: local_view_size(SIZE) if view in LOCAL_VIEWS else SIZE for view in views}
    batch = {view: torch.randn(b, 1, sizes[view], sizes[view], generator=g) for view in views}
    for label, classes in VOCAB.items():
        batch[label] = torch.randint(-1, len(classes), (b,), generator=g)
    batch["body_part"][0] = 0  # at least one known label of each kind
    batch["age_bucket"][0] = 1
    return batch


CASES = [(task, kind) for task in TASKS.names() for kind in TASKS.get(task).encoder_kinds]


@pytest.mark.parametrize(("task", "kind"), CASES, ids=[f"{t}-{k}" for t, k in CASES])
def test_every_registered_task_trains_the_shared_encoder(task: str, kind: str) -> None:
    torch.manual_seed(0)
    encoder = build_encoder(TINY[kind], img_size=SIZE)
    objective = build_objective(encoder, {task: 1.0}, {}, VOCAB)
    assert objective.views and set(objective.views) <= set(VIEW_NAMES)
    out = objective(encoder, make_batch(objective.views))
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert torch.equal(out[f"{task}/loss"], out["loss"].detach())
    assert all(not value.requires_grad for key, value in out.items() if key != "loss")
    out["loss"].backward()
    # DDP needs a gradient for every trainable parameter: the whole encoder and every head.
    missing = [n for n, p in encoder.named_parameters() if p.grad is None]
    missing += [n for n, p in objective.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    stem = encoder_stages(encoder)[0]
    stem_grads = [p.grad for n, p in encoder.named_parameters() if any(n.startswith(s) for s in stem)]
    assert any(float(g.abs().sum()) > 0 for g in stem_grads), "no gradient reaches the input layer"
    objective.after_step(encoder, 1, 10)
    # the encoder is shared, never owned: its weights are not inside the objective's state
    own = {id(p) for p in objective.parameters()}
    assert not any(id(p) in own for p in encoder.parameters())


def test_mae_refuses_a_cnn_with_a_fix() -> None:
    with pytest.raises(ConfigError, match="patch_ae"):
        build_objective(build_encoder("test_resnet"), {"mae": 1.0}, {}, VOCAB)


def slow_nt_xent(z0: torch.Tensor, z1: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss written out: for each of the 2N embeddings, -log softmax of its partner among the others."""
    z = torch.cat([z0, z1])
    z = z / z.norm(dim=1, keepdim=True)
    n = z0.shape[0]
    total = 0.0
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        others = [math.exp(float(z[i] @ z[k]) / temperature) for k in range(2 * n) if k != i]
        total += -math.log(math.exp(float(z[i] @ z[partner]) / temperature) / sum(others))
    return torch.tensor(total / (2 * n))


def test_nt_xent_matches_the_slow_reference() -> None:
    torch.manual_seed(1)
    z0, z1 = torch.randn(5, 7), torch.randn(5, 7)
    for temperature in (0.1, 0.5):
        fast = NTXentLoss(temperature=temperature, gather_distributed=True)(z0, z1)
        assert fast.item() == pytest.approx(slow_nt_xent(z0, z1, temperature).item(), rel=1e-5)


def test_simclr_task_loss_is_nt_xent_of_its_projections() -> None:
    torch.manual_seed(2)
    encoder = build_encoder("test_resnet")
    objective = build_objective(encoder, {"simclr": 1.0}, {"simclr": {"temperature": 0.2}}, VOCAB)
    batch = make_batch(("view0", "view1"), b=4)
    out = objective(encoder, batch)
    task = objective.tasks["simclr"]
    with torch.no_grad():
        z = task.projection_head(encoder(torch.cat([batch["view0"], batch["view1"]])))
    z0, z1 = z.chunk(2)
    assert out["loss"].item() == pytest.approx(slow_nt_xent(z0, z1, 0.2).item(), rel=1e-4)


def slow_masked_patch_loss(
    pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, p: int, norm_pix: bool
) -> float:
    b, _, _, w = images.shape
    grid = w // p
    errors = []
    for n in range(b):
        for k in range(grid * grid):
            if not mask[n, k]:
                continue
            row, col = divmod(k, grid)
            target = images[n, 0, row * p : (row + 1) * p, col * p : (col + 1) * p].reshape(-1)
            if norm_pix:
                target = (target - target.mean()) / (target.var() + 1e-6) ** 0.5
            errors.append(float(((pred[n, k] - target) ** 2).mean()))
    return sum(errors) / len(errors)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_patch_loss_matches_the_slow_reference(norm_pix: bool) -> None:
    torch.manual_seed(3)
    images = torch.randn(3, 1, 32, 32)
    mask = random_patch_mask(3, 4, 0.5, torch.device("cpu"))
    assert mask.sum(dim=1).tolist() == [8, 8, 8]
    pred = torch.randn(3, 16, 64)
    fast = masked_patch_loss(pred, images, mask, 8, norm_pix)
    assert fast.item() == pytest.approx(slow_masked_patch_loss(pred, images, mask, 8, norm_pix), rel=1e-5)
    # visible patches do not count: changing their prediction leaves the loss alone
    changed = pred.clone()
    changed[~mask] += 5.0
    assert masked_patch_loss(changed, images, mask, 8, norm_pix).item() == pytest.approx(fast.item(), rel=1e-6)


def test_hidden_patches_are_the_ones_scored() -> None:
    torch.manual_seed(4)
    images = torch.randn(2, 1, 32, 32) + 3.0
    mask = random_patch_mask(2, 4, 0.25, torch.device("cpu"))
    patches = patchify(hide_patches(images, mask, 8), 8)
    assert torch.all(patches[mask] == 0.0)
    assert torch.equal(patches[~mask], patchify(images, 8)[~mask])
    # the decoder's pixel layout is lightly's patchify layout
    unshuffled = nn.functional.pixel_unshuffle(images, 8)
    assert torch.equal(grid_to_patches(unshuffled, 8, 1), patchify(images, 8))


def test_mae_token_masks_partition_the_sequence_and_keep_prefix_tokens() -> None:
    keep, hidden = random_patch_tokens(4, 16, 1, 0.75, torch.device("cpu"))
    assert keep.shape == (4, 5) and hidden.shape == (4, 12)
    assert torch.all(keep[:, 0] == 0)
    for row in range(4):
        assert sorted(keep[row].tolist() + hidden[row].tolist()) == list(range(17))


def test_byol_momentum_update_is_an_exponential_average() -> None:
    torch.manual_seed(5)
    encoder = build_encoder("test_resnet")
    objective = build_objective(encoder, {"byol": 1.0}, {"byol": {"momentum": 0.9, "momentum_end": 1.0}}, VOCAB)
    task = objective.tasks["byol"]
    assert all(not p.requires_grad for p in task.encoder_momentum.parameters())
    before = next(task.encoder_momentum.parameters()).detach().clone()
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(1.0)
    online = next(encoder.parameters()).detach().clone()
    objective.after_step(encoder, 0, 100)  # step 0 of a cosine schedule: momentum 0.9
    after = next(task.encoder_momentum.parameters()).detach()
    torch.testing.assert_close(after, 0.9 * before + 0.1 * online)
    objective.after_step(encoder, 100, 100)  # the last step: momentum 1.0, nothing moves
    torch.testing.assert_close(next(task.encoder_momentum.parameters()).detach(), after)


def test_moco_scores_queries_against_the_bank_and_queues_the_keys() -> None:
    torch.manual_seed(9)
    encoder = build_encoder("test_resnet")
    # one BatchNorm group: the shuffled keys then equal keys of the batch in order (checked below)
    options = {"moco": {"memory_bank_size": 16, "output_dim": 8, "temperature": 0.5, "bn_splits": 1}}
    objective = build_objective(encoder, {"moco": 1.0}, options, VOCAB)
    task = objective.tasks["moco"]
    bank_before = task.criterion.memory_bank.bank.clone()  # (16, 8) unit rows
    batch = make_batch(("view0", "view1"), b=3)
    out = objective(encoder, batch)
    x = torch.cat([batch["view0"], batch["view1"]])
    with torch.no_grad():
        q0, q1 = task.projection_head(encoder(x)).chunk(2)
        k0, k1 = task.projection_head_momentum(task.encoder_momentum(x)).chunk(2)
    queries = nn.functional.normalize(torch.cat([q0, q1]), dim=1)
    keys = nn.functional.normalize(torch.cat([k1, k0]), dim=1)
    total = 0.0
    for q, k in zip(queries, keys, strict=True):
        positive = math.exp(float(q @ k) / 0.5)
        negatives = sum(math.exp(float(q @ n) / 0.5) for n in bank_before)
        total += -math.log(positive / (positive + negatives))
    assert out["loss"].item() == pytest.approx(total / 6, rel=1e-4)
    assert int(task.criterion.memory_bank.bank_ptr) == 6
    torch.testing.assert_close(task.criterion.memory_bank.bank[:6], keys)


def test_moco_keys_come_from_a_shuffled_batch_in_batchnorm_groups() -> None:
    torch.manual_seed(3)
    encoder = build_encoder("test_resnet")
    options = {"moco": {"memory_bank_size": 0, "output_dim": 8, "bn_splits": 2}}
    task = build_objective(encoder, {"moco": 1.0}, options, VOCAB).tasks["moco"]
    x = torch.cat(list(make_batch(("view0", "view1"), b=4).values())[:2])
    torch.manual_seed(5)
    keys = task.momentum_projection(x, shuffle=True, splits=2)
    torch.manual_seed(5)
    order = torch.randperm(len(x))  # what lightly's batch_shuffle draws

    def keys_of(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            parts = images.chunk(2)
            return torch.cat([task.projection_head_momentum(task.encoder_momentum(p)) for p in parts])

    torch.testing.assert_close(keys, keys_of(x[order])[torch.argsort(order)])
    # the groups' statistics changed: in order, the same two groups give other keys
    assert not torch.allclose(keys, keys_of(x), atol=1e-4)


def test_moco_forward_feeds_the_key_encoder_a_shuffled_batch() -> None:
    torch.manual_seed(4)
    encoder = build_encoder("test_resnet")
    objective = build_objective(encoder, {"moco": 1.0}, {"moco": {"memory_bank_size": 32}}, VOCAB)
    task = objective.tasks["moco"]
    assert task.options["momentum"] == 0.999  # MoCo v2
    assert task.bn_groups(12) == 2  # one process, BatchNorm: a shuffle needs groups to change statistics
    seen: list[torch.Tensor] = []
    task.encoder_momentum.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    batch = make_batch(("view0", "view1"), b=6)
    objective(encoder, batch)
    x = torch.cat([batch["view0"], batch["view1"]])
    fed = torch.cat(seen)
    assert len(seen) == 2 and fed.shape == x.shape
    flat, fed_flat = x.flatten(1), fed.flatten(1)
    position = [int((flat == row).all(1).nonzero()) for row in fed_flat]  # where each fed sample came from
    assert sorted(position) == list(range(len(x))) and position != list(range(len(x)))
    assert (
        build_objective(build_encoder("test_vit", img_size=SIZE), {"moco": 1.0}, {}, VOCAB).tasks["moco"].bn_groups(12)
        == 1
    )  # no BatchNorm, nothing to split


def slow_moco_v3(q: torch.Tensor, k: torch.Tensor, temperature: float) -> float:
    q, k = nn.functional.normalize(q, dim=1), nn.functional.normalize(k, dim=1)
    total = 0.0
    for i in range(len(q)):
        scores = [math.exp(float(q[i] @ k[j]) / temperature) for j in range(len(k))]
        total += -math.log(scores[i] / sum(scores))
    return total / len(q) * 2 * temperature


def test_moco_v3_trains_with_batch_keys_and_a_predictor() -> None:
    torch.manual_seed(6)
    encoder = build_encoder("test_resnet")
    objective = build_objective(encoder, {"moco": 1.0}, {"moco": {"version": 3, "output_dim": 16}}, VOCAB)
    task = objective.tasks["moco"]
    assert task.options["momentum"] == 0.99 and not any("bank" in k for k in task.state_dict())
    q, k = torch.randn(5, 16), torch.randn(5, 16)
    assert contrastive_v3(q, k, 0.3).item() == pytest.approx(slow_moco_v3(q, k, 0.3), rel=1e-5)
    batch = make_batch(("view0", "view1"), b=8)
    optimizer = torch.optim.SGD([*encoder.parameters(), *objective.parameters()], lr=0.05)
    losses = []
    for step in range(6):
        out = objective(encoder, batch)
        optimizer.zero_grad()
        out["loss"].backward()
        assert all(p.grad is not None for p in task.prediction_head.parameters())
        optimizer.step()
        objective.after_step(encoder, step + 1, 6)
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0]
    with pytest.raises(ConfigError, match="v3 has no queue"):
        build_objective(encoder, {"moco": 1.0}, {"moco": {"version": 3, "memory_bank_size": 8}}, VOCAB)
    with pytest.raises(ConfigError, match="version must be 2 or 3"):
        build_objective(encoder, {"moco": 1.0}, {"moco": {"version": 1}}, VOCAB)


def test_metadata_ignores_missing_labels_and_weights_rare_classes() -> None:
    torch.manual_seed(6)
    encoder = build_encoder("test_resnet")
    options = {"metadata": {"labels": ["body_part"], "balance": "none"}}
    objective = build_objective(encoder, {"metadata": 1.0}, options, VOCAB).eval()
    encoder.eval()
    batch = make_batch(("plain",), b=5)
    batch["body_part"] = torch.tensor([2, -1, -1, 0, -1])
    out = objective(encoder, batch)
    logits = objective.tasks["metadata"].heads["body_part"](encoder(batch["plain"]))
    expected = nn.functional.cross_entropy(logits[[0, 3]], torch.tensor([2, 0]))
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert "metadata/body_part/acc" in out
    batch["body_part"][:] = -1
    out = objective(encoder, batch)
    assert out["loss"].item() == 0.0 and "metadata/body_part/acc" not in out

    weights = class_weights(torch.tensor([90.0, 10.0]), "inverse")
    assert weights is not None
    torch.testing.assert_close(weights, torch.tensor([100 / 180, 100 / 20]))  # each class carries half
    logits, target = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    torch.testing.assert_close(
        focal_cross_entropy(logits, target, 0.0), nn.functional.cross_entropy(logits, target, reduction="none")
    )
    p = logits.softmax(1)[torch.arange(4), target]
    torch.testing.assert_close(focal_cross_entropy(logits, target, 2.0), -((1 - p) ** 2) * p.log())


def test_metadata_counts_from_manifest_or_from_training() -> None:
    encoder = build_encoder("test_resnet")
    given = {"body_part": {"chest": 50, "hand": 5, "knee": 1}, "age_bucket": {"18-39": 3}}
    task = build_objective(encoder, {"metadata": 1.0}, {"metadata": {"class_counts": given}}, VOCAB).tasks["metadata"]
    assert task.counts_body_part.tolist() == [50, 5, 1, 0]
    running = build_objective(encoder, {"metadata": 1.0}, {}, VOCAB).tasks["metadata"]
    batch = make_batch(("plain",), b=4)
    batch["body_part"] = torch.tensor([1, 1, -1, 3])
    running(encoder, batch)
    assert running.counts_body_part.tolist() == [0, 2, 0, 1]
    assert "counts_body_part" in running.state_dict()  # resumes with the checkpoint


def test_combined_objective_weights_and_view_union() -> None:
    torch.manual_seed(7)
    encoder = build_encoder("test_resnet")
    objective = build_objective(encoder, {"simclr": 1.0, "metadata": 0.5}, {}, VOCAB)
    assert objective.views == ("view0", "view1", "plain")
    out = objective(encoder, make_batch(objective.views))
    expected = out["simclr/loss"] + 0.5 * out["metadata/loss"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert {"simclr/pos_cosine", "metadata/body_part/loss", "metadata/age_bucket/loss"} <= set(out)
    shared = build_objective(encoder, {"simclr": 1.0, "metadata": 1.0}, {"metadata": {"view": "view0"}}, VOCAB)
    assert shared.views == ("view0", "view1")


def test_config_mistakes_are_refused_with_a_fix() -> None:
    encoder = build_encoder("test_resnet")
    with pytest.raises(ConfigError, match="Did you mean 'simclr'"):
        build_objective(encoder, {"simclar": 1.0}, {}, VOCAB)
    with pytest.raises(ConfigError, match="Did you mean 'temperature'"):
        build_objective(encoder, {"simclr": 1.0}, {"simclr": {"temprature": 0.2}}, VOCAB)
    with pytest.raises(ConfigError, match="temperature must be"):
        build_objective(encoder, {"simclr": 1.0}, {"simclr": {"temperature": "hot"}}, VOCAB)
    with pytest.raises(ConfigError, match="not in tasks"):
        build_objective(encoder, {"simclr": 1.0}, {"byol": {}}, VOCAB)
    with pytest.raises(ConfigError, match="weight must be a positive"):
        build_objective(encoder, {"simclr": 0.0}, {}, VOCAB)
    with pytest.raises(ConfigError, match="at least two classes"):
        build_objective(encoder, {"metadata": 1.0}, {}, {"body_part": ["chest"], "age_bucket": ["0-1", "2-11"]})
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        objective = build_objective(encoder, {"patch_ae": 1.0}, {"patch_ae": {"patch_size": 24}}, VOCAB)
        objective(encoder, make_batch(("plain",)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gathered_loss(rank: int, world: int, port: int, z0: torch.Tensor, z1: torch.Tensor, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        half = z0.shape[0] // world
        part = slice(rank * half, (rank + 1) * half)
        loss = NTXentLoss(temperature=0.3, gather_distributed=True)(z0[part], z1[part])
        out[rank] = float(loss)
    finally:
        dist.destroy_process_group()


def test_nt_xent_gathers_negatives_across_two_processes() -> None:
    torch.manual_seed(8)
    z0, z1 = torch.randn(6, 5), torch.randn(6, 5)
    out = mp.Manager().dict()
    # fork: the children need no fresh interpreter (spawn would re-import torch, seconds on two cores)
    mp.start_processes(_gathered_loss, args=(2, _free_port(), z0, z1, out), nprocs=2, join=True, start_method="fork")
    mean_of_ranks = (out[0] + out[1]) / 2
    assert mean_of_ranks == pytest.approx(slow_nt_xent(z0, z1, 0.3).item(), rel=1e-5)
    local_only = NTXentLoss(temperature=0.3)(z0[:3], z1[:3]).item()
    assert out[0] != pytest.approx(local_only, rel=1e-3)  # the other process's samples were negatives


def test_simclr_ntxent_runs_in_float32_under_bf16_autocast() -> None:
    """The projections reach NT-Xent in float32 and its logits are not recast: the loss is the float32 loss."""
    torch.manual_seed(0)
    encoder = build_encoder("test_resnet", img_size=32)
    simclr = build_objective(encoder, {"simclr": 1.0}).tasks["simclr"]
    seen: dict[str, torch.Tensor] = {}

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        seen["z0"], seen["z1"], seen["loss"] = inputs[0], inputs[1], output

    simclr.criterion.register_forward_hook(record)
    batch = {"view0": torch.randn(8, 1, 32, 32), "view1": torch.randn(8, 1, 32, 32)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = simclr(encoder, batch)
    assert seen["z0"].dtype == seen["z1"].dtype == torch.float32
    reference = NTXentLoss(temperature=0.1)(seen["z0"].detach(), seen["z1"].detach())  # float32, no autocast
    assert out["loss"].dtype == torch.float32
    torch.testing.assert_close(out["loss"].detach(), reference, rtol=1e-6, atol=1e-6)

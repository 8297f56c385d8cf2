"""Optimizer parameter groups, learning-rate schedules and the resumable training sampler."""

import pytest
import torch

from m2f.config import TrainConfig, get_config
from m2f.data.loader import TrainSampler
from m2f.model import build_model
from m2f.optim import build_optimizer, lr_factor


def group_of(optimizer, param):
    return next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))


def test_parameter_groups_follow_the_original():
    model = build_model(get_config("tiny"))
    cfg = TrainConfig(lr=1e-4, weight_decay=0.05, backbone_lr_mult=0.1)
    opt = build_optimizer(model, cfg)
    decoder = model.transformer_decoder
    cases = [
        (decoder.class_embed.weight, 1e-4, 0.05),
        (decoder.class_embed.bias, 1e-4, 0.05),  # biases keep weight decay, as in detectron2
        (decoder.decoder_norm.weight, 1e-4, 0.0),  # norms: no decay
        (decoder.query_embed.weight, 1e-4, 0.0),  # embeddings: no decay
        (model.pixel_decoder.transformer.level_embed, 1e-4, 0.05),  # a bare Parameter, not an Embedding
        (model.pixel_decoder.input_proj[0][1].weight, 1e-4, 0.0),  # GroupNorm
        (next(model.backbone.parameters()), 1e-5, 0.05),  # backbone x0.1
    ]
    for param, lr, wd in cases:
        group = group_of(opt, param)
        assert group["lr"] == pytest.approx(lr) and group["weight_decay"] == wd
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_step_schedule_drops_tenfold_at_90_and_95_percent():
    cfg = TrainConfig(max_iters=1000, lr_schedule="step", lr_steps=(0.9, 0.95))
    assert [lr_factor(i, cfg) for i in (0, 899, 900, 949, 950, 999)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_poly_schedule():
    cfg = TrainConfig(max_iters=100, lr_schedule="poly", poly_power=0.9)
    assert lr_factor(0, cfg) == 1.0
    assert lr_factor(50, cfg) == pytest.approx(0.5**0.9)


def test_sampler_is_resumable_and_shards_the_global_batch():
    def batches(start, rank=0, world=1, n=5):
        it = iter(TrainSampler(dataset_size=7, global_batch=4, rank=rank, world_size=world, seed=3, start_iter=start))
        return [next(it) for _ in range(n)]

    full = batches(0, n=6)
    assert batches(2, n=4) == full[2:]  # resume at iteration 2 continues the same stream
    two = [batches(0, rank=r, world=2, n=6) for r in (0, 1)]
    for it in range(6):
        assert two[0][it] + two[1][it] == full[it]  # ranks split each global batch
    # Each epoch is a permutation of the dataset.
    stream = [i for b in full for i, _ in b]
    assert sorted(stream[:7]) == list(range(7)) and sorted(stream[7:14]) == list(range(7))
    # Augmentation seeds are unique per stream position.
    seeds = [s for b in full for _, s in b]
    assert len(set(seeds)) == len(seeds)


def test_sampler_rejects_a_batch_that_does_not_split_over_processes():
    with pytest.raises(ValueError, match="divisible"):
        TrainSampler(dataset_size=7, global_batch=3, rank=0, world_size=2, seed=0)
    with pytest.raises(ValueError, match="empty"):
        TrainSampler(dataset_size=0, global_batch=2, rank=0, world_size=1, seed=0)


def test_lr_schedule_applies_to_every_group():
    model = torch.nn.Linear(2, 2)
    from m2f.optim import build_scheduler
    cfg = TrainConfig(max_iters=10, lr=1.0, lr_steps=(0.5,))
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    for _ in range(5):
        opt.step()
        sched.step()
    assert all(g["lr"] == pytest.approx(0.1) for g in opt.param_groups)

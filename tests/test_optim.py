"""The optimisation helpers called by the training loop: the EMA update and its decay, one step's clipping."""
import contextlib
import dataclasses

import pytest
import torch

import train
from config import Config
from diffusion import make_diffusion
from dit import DiT


def test_ema_update_moves_the_average_by_one_minus_decay():
    """ema <- decay * ema + (1 - decay) * model, for every parameter, the model left untouched."""
    ema, model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    weights = [p.detach().clone() for p in model.parameters()]
    train.ema_update(ema, model, 0.9)
    for e, old, w, p in zip(ema.parameters(), before, weights, model.parameters()):
        torch.testing.assert_close(e, 0.9 * old + 0.1 * w)
        assert torch.equal(p, w)
    train.ema_update(ema, model, 0.0)  # decay 0: a copy
    for e, w in zip(ema.parameters(), weights):
        torch.testing.assert_close(e, w)


def test_ema_decay_schedules(tiny_cfg):
    """Warm-up min(decay, (1 + step) / (10 + step)); without it the fixed decay; with --ema-gamma
    (1 - 1 / (step + 1))^(gamma + 1), whatever --ema-decay says."""
    warm = dataclasses.replace(tiny_cfg, ema_decay=0.99, ema_warmup=True, ema_gamma=0.0)
    assert [train.ema_decay_at(warm, s) for s in (0, 10, 1000)] == pytest.approx([0.1, 11 / 20, 0.99])
    fixed = dataclasses.replace(warm, ema_warmup=False)
    assert [train.ema_decay_at(fixed, s) for s in (0, 10, 1000)] == pytest.approx([0.99] * 3)
    power = dataclasses.replace(warm, ema_gamma=2.0)
    assert [train.ema_decay_at(power, s) for s in (0, 1, 9)] == pytest.approx([0.0, 0.125, 0.9 ** 3])


def test_power_ema_weights_each_step_by_step_to_the_gamma():
    """ema_update driven by ema_decay_at's power decays averages the whole run: after K steps, step k's weights
    count (k^(gamma+1) - (k-1)^(gamma+1)) / K^(gamma+1), about proportional to k^gamma."""
    cfg = dataclasses.replace(Config(), ema_gamma=1.0)
    ema, model = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    values = [3.0, -1.0, 4.0, 1.0, -5.0]
    for step, w in enumerate(values):
        model.weight.data.fill_(w)
        train.ema_update(ema, model, train.ema_decay_at(cfg, step))
    expected = sum((k * k - (k - 1) ** 2) * w for k, w in enumerate(values, 1)) / len(values) ** 2
    assert ema.weight.item() == pytest.approx(expected)


def grads_after_step(cfg, seed=0):
    """(reported gradient norm, the norm of the gradients the optimizer stepped with) for one train_step."""
    torch.manual_seed(seed)
    model = DiT.from_config(dataclasses.replace(cfg, adaln_zero=False))
    with torch.no_grad():  # a large output layer: gradients well above the default --grad-clip 1
        model.final_layer.linear.weight.mul_(30)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # plain SGD at lr 1: the update is the gradient
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.rand(4, 3, 16, 16) * 2 - 1, torch.zeros(4, dtype=torch.long)
    out = train.train_step(model, optimizer, make_diffusion(cfg), x, y, 1.0, cfg, contextlib.nullcontext())
    stepped = torch.linalg.vector_norm(torch.stack([(b - p.detach()).norm() for b, p in zip(before, model.parameters())]))
    return float(out["grad_norm"]), float(stepped)


def test_gradient_clipping_and_grad_clip_zero_turns_it_off(tiny_cfg):
    """train_step clips the global gradient norm to --grad-clip when it is larger and reports the raw
    norm; --grad-clip 0 leaves the gradients as they are."""
    raw, unclipped = grads_after_step(dataclasses.replace(tiny_cfg, grad_clip=0.0))
    assert raw > 5 and raw == pytest.approx(unclipped, rel=1e-5)
    clip = raw / 4  # well below the raw norm
    reported, clipped = grads_after_step(dataclasses.replace(tiny_cfg, grad_clip=clip))
    assert reported == pytest.approx(raw, rel=1e-5)
    assert clipped == pytest.approx(clip, rel=1e-4)
    _, untouched = grads_after_step(dataclasses.replace(tiny_cfg, grad_clip=raw * 4))  # above the norm: no change
    assert untouched == pytest.approx(raw, rel=1e-5)

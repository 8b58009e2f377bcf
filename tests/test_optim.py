"""optim.py: the learning-rate and EMA schedules, the EMA update, one step's clipping, and the optimizer a
resumed run steps with."""
import contextlib
import dataclasses

import pytest
import torch

import checkpoint
import config
import optim
from config import Config
from conftest import make_pandas, run_train
from diffusion import make_diffusion
from dit import DiT


def test_ema_update_moves_the_average_by_one_minus_decay():
    """ema <- decay * ema + (1 - decay) * model, for every parameter, the model left untouched."""
    ema, model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    weights = [p.detach().clone() for p in model.parameters()]
    optim.ema_update(ema, model, 0.9)
    for e, old, w, p in zip(ema.parameters(), before, weights, model.parameters()):
        torch.testing.assert_close(e, 0.9 * old + 0.1 * w)
        assert torch.equal(p, w)
    optim.ema_update(ema, model, 0.0)  # decay 0: a copy
    for e, w in zip(ema.parameters(), weights):
        torch.testing.assert_close(e, w)


def test_ema_decay_schedules(tiny_cfg):
    """Warm-up min(decay, (1 + step) / (10 + step)); without it the fixed decay; with --ema-gamma
    (1 - 1 / (step + 1))^(gamma + 1), whatever --ema-decay says."""
    warm = dataclasses.replace(tiny_cfg, ema_decay=0.99, ema_warmup=True, ema_gamma=0.0)
    assert [optim.ema_decay_at(warm, s) for s in (0, 10, 1000)] == pytest.approx([0.1, 11 / 20, 0.99])
    fixed = dataclasses.replace(warm, ema_warmup=False)
    assert [optim.ema_decay_at(fixed, s) for s in (0, 10, 1000)] == pytest.approx([0.99] * 3)
    power = dataclasses.replace(warm, ema_gamma=2.0)
    assert [optim.ema_decay_at(power, s) for s in (0, 1, 9)] == pytest.approx([0.0, 0.125, 0.9 ** 3])


def test_power_ema_weights_each_step_by_step_to_the_gamma():
    """ema_update driven by ema_decay_at's power decays averages the whole run: after K steps, step k's weights
    count (k^(gamma+1) - (k-1)^(gamma+1)) / K^(gamma+1), about proportional to k^gamma."""
    cfg = dataclasses.replace(Config(), ema_gamma=1.0)
    ema, model = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    values = [3.0, -1.0, 4.0, 1.0, -5.0]
    for step, w in enumerate(values):
        model.weight.data.fill_(w)
        optim.ema_update(ema, model, optim.ema_decay_at(cfg, step))
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
    out = optim.train_step(model, optimizer, make_diffusion(cfg), x, y, 1.0, cfg, contextlib.nullcontext())
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


def test_a_non_finite_gradient_skips_the_update_even_when_the_loss_is_finite(tiny_cfg):
    """An inf in one gradient (the loss itself finite) is reported as a skipped step and changes no weight."""
    torch.manual_seed(0)
    model = DiT.from_config(tiny_cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.final_layer.linear.bias.register_hook(lambda g: torch.full_like(g, float("inf")))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.rand(4, 3, 16, 16) * 2 - 1, torch.zeros(4, dtype=torch.long)
    out = optim.train_step(model, optimizer, make_diffusion(tiny_cfg), x, y, 1e-2, tiny_cfg, contextlib.nullcontext())
    assert torch.isfinite(out["loss"]) and not out["finite"]
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_cosine_lr_decays_over_whichever_budget_ends_first():
    """Warm-up is linear; cosine reaches 10% at --max-steps, or at the end of --max-minutes if that comes first."""
    cfg = config.build_config({"preset": "tiny", "lr": 1.0, "warmup_steps": 10, "max_steps": 110, "lr_schedule": "cosine"})
    assert [optim.lr_at(cfg, s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert [optim.lr_at(cfg, s) for s in (10, 60, 110, 500)] == pytest.approx([1.0, 0.55, 0.1, 0.1])
    assert optim.lr_at(cfg, 60, elapsed=1e9) == pytest.approx(0.55)  # no time budget: the clock is ignored
    timed = dataclasses.replace(cfg, max_minutes=2.0)
    assert [optim.lr_at(timed, 20, elapsed=s) for s in (0, 60, 120, 999)] == pytest.approx([optim.lr_at(cfg, 20), 0.55, 0.1, 0.1])
    assert optim.lr_at(timed, 5, elapsed=60) == pytest.approx(0.6 * 0.55)  # warm-up and decay multiply
    assert optim.lr_at(dataclasses.replace(timed, lr_schedule="constant"), 60, elapsed=999) == 1.0


def test_ema_decay_warms_up_or_follows_the_power_function():
    """Default: min(0.999, (1+step)/(10+step)). With --ema-gamma the EMA is the whole run's weights averaged
    with weight ~ step^gamma, so its mean age grows with the run: after T steps it sits at ~(gamma+1)/(gamma+2) T."""
    cfg = config.build_config({"preset": "panda48"})
    assert [optim.ema_decay_at(dataclasses.replace(cfg, ema_gamma=0.0), s) for s in (0, 90, 10**5)] == pytest.approx([0.1, 0.91, 0.999])
    for gamma, steps in ((3.0, 1000), (3.0, 4000), (1.0, 1000)):
        power = dataclasses.replace(cfg, ema_gamma=gamma)
        avg = 0.0
        for step in range(steps):  # the EMA of a weight that equals the step count
            decay = optim.ema_decay_at(power, step)
            avg = decay * avg + (1 - decay) * (step + 1)
        assert avg == pytest.approx((gamma + 1) / (gamma + 2) * steps, rel=1e-3)
    no_decay = config.build_config({"preset": "tiny", "ema_decay": 0.0, "ema_gamma": 3.0})
    assert optim.build_training(no_decay, torch.device("cpu"), 1)[1] is not None  # --ema-gamma alone turns the EMA on


def test_resume_keeps_this_runs_optimizer_kernel():
    """A checkpoint written by the unfused Adam resumes with the fused one build_training picks (and the state)."""
    cfg = config.build_config({"preset": "tiny", "device": "cpu"}, False)
    model, ema, optimizer, _ = optim.build_training(cfg, torch.device("cpu"), 1)
    old = torch.optim.Adam(model.parameters(), lr=cfg.lr)  # what runs saved before the fused kernel
    x, t, y = torch.randn(2, 3, cfg.image_size, cfg.image_size), torch.tensor([500, 20]), torch.zeros(2, dtype=torch.long)
    model(x, t, y).square().mean().backward()
    old.step()
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": old.state_dict(),
             "rng": checkpoint.rng_states(torch.device("cpu")), "step": 1}
    assert optimizer.param_groups[0]["fused"] is True and state["optimizer"]["param_groups"][0]["fused"] is None
    assert checkpoint.restore(state, model, ema, optimizer, torch.device("cpu")).step == 1
    assert optimizer.param_groups[0]["fused"] is True
    assert int(optimizer.state[next(model.parameters())]["step"]) == 1
    optimizer.step()  # the fused kernel accepts the state the unfused one wrote
    assert int(optimizer.state[next(model.parameters())]["step"]) == 2


def test_resume_takes_weight_decay_and_optimizer_from_the_new_flags(tmp_path):
    """A run resumed with --optimizer adamw --weight-decay 0.05 trains with them and saves them, not the checkpoint's."""
    data = make_pandas(tmp_path / "pandas", 4)
    run_train(tmp_path / "work", data, "--max-steps", 2, "--sample-every", 0, "--no-log-graph")
    run_train(tmp_path / "work", data, "--max-steps", 4, "--sample-every", 0, "--no-log-graph",
              "--optimizer", "adamw", "--weight-decay", 0.05)
    group = torch.load(tmp_path / "work/checkpoints/tiny/latest.pt", weights_only=True)["optimizer"]["param_groups"][0]
    assert (group["weight_decay"], group["decoupled_weight_decay"]) == (0.05, True)

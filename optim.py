"""The optimizer, its learning-rate and EMA schedules, one optimisation step."""
import copy
import math

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from distributed import all_mean
from dit import DiT


def build_training(cfg, device, world_size):
    """Model, EMA copy, optimizer and the module to call for training (compiled / DDP)."""
    torch.manual_seed(cfg.seed)
    model = DiT.from_config(cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval() if cfg.ema_decay > 0 or cfg.ema_gamma > 0 else None
    optimizer = make_optimizer(cfg, model, device)
    train_model = model
    if world_size > 1:
        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)
    return model, ema, optimizer, train_model


def make_optimizer(cfg, model, device):
    """Adam or AdamW at cfg.lr and cfg.weight_decay."""
    opt_class = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # The fused kernel exists for CUDA and the CPU, and is much faster than the for-loop there (docs/experiments.md).
    fused = {"fused": True} if device.type in ("cuda", "cpu") else {}
    return opt_class(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)


def lr_at(cfg, step, elapsed=0.0):
    """Linear warm-up to cfg.lr, then constant, or cosine down to 10% over whichever budget ends
    first: --max-steps, or the --max-minutes of this invocation (elapsed seconds so far)."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
    if cfg.lr_schedule != "cosine":
        return lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.max_minutes > 0:
        progress = max(progress, elapsed / (cfg.max_minutes * 60))
    progress = min(1.0, max(0.0, progress))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def ema_decay_at(cfg, step):
    """The EMA decay for the update after optimizer step `step` (0-based)."""
    if cfg.ema_gamma > 0:  # weights ~ t^gamma over the whole run; t counts from 1
        return (1 - 1 / (step + 1)) ** (cfg.ema_gamma + 1)
    if cfg.ema_warmup:
        return min(cfg.ema_decay, (1 + step) / (10 + step))
    return cfg.ema_decay


@torch.no_grad()
def ema_update(ema, model, decay):
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def train_step(train_model, optimizer, diffusion, x, y, lr, cfg, autocast):
    """One optimisation step. The update is skipped when the loss or gradient is not finite."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast:
        loss, pred, target = diffusion.training_loss(train_model, x, y)  # predicted and true noise (or v)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(train_model.parameters(), max_norm)
    loss = all_mean(loss.detach())
    finite = bool(torch.isfinite(loss) and torch.isfinite(grad_norm))  # same on every rank
    if finite:
        optimizer.step()
    return dict(loss=loss, grad_norm=grad_norm, pred=pred.detach(), target=target, finite=finite, lr=lr)

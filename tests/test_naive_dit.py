"""naive_dit.py: the naive reference model really is the same network as dit.DiT."""
import dataclasses

import pytest
import torch

import naive_dit
from dit import DiT


def perturbed_tiny(cfg):
    """A tiny DiT whose every weight is non-trivial (adaLN-Zero would hide the blocks)."""
    model = DiT.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("mlp_act", ["gelu", "relu"])
def test_naive_model_matches_fast_model_with_same_weights(tiny_cfg, mlp_act):
    """Same parameter count, same outputs and gradients: the speed-up is a ratio of equal models."""
    tiny_cfg = dataclasses.replace(tiny_cfg, mlp_act=mlp_act)
    fast = perturbed_tiny(tiny_cfg)
    naive = naive_dit.naive_from(tiny_cfg, fast)
    assert sum(p.numel() for p in naive.parameters()) == sum(p.numel() for p in fast.parameters())
    x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([0, 37, 99]), torch.zeros(3, dtype=torch.long)
    out_fast, out_naive = fast(x, t, y), naive(x, t, y)
    assert out_fast.abs().mean() > 1e-2
    torch.testing.assert_close(out_naive, out_fast, atol=1e-5, rtol=1e-5)
    out_fast.square().mean().backward()
    out_naive.square().mean().backward()
    grads = naive_dit.naive_state_dict({k: p.grad for k, p in fast.named_parameters()})
    for name, p in naive.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-5, rtol=1e-4)

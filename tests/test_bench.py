"""bench.py: its naive model really is the same network, and its measurements still run."""
import dataclasses

import pytest
import torch

import bench
from config import build_config
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
    naive = bench.naive_from(tiny_cfg, fast)
    assert sum(p.numel() for p in naive.parameters()) == sum(p.numel() for p in fast.parameters())
    x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([0, 37, 99]), torch.zeros(3, dtype=torch.long)
    out_fast, out_naive = fast(x, t, y), naive(x, t, y)
    assert out_fast.abs().mean() > 1e-2
    torch.testing.assert_close(out_naive, out_fast, atol=1e-5, rtol=1e-5)
    out_fast.square().mean().backward()
    out_naive.square().mean().backward()
    grads = bench.naive_state_dict({k: p.grad for k, p in fast.named_parameters()})
    for name, p in naive.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-5, rtol=1e-4)


def test_naive_and_fast_models_count_the_same_flops():
    """MFU and the speed-up compare equal work; 6 heads x 64 on a 64-wide stream as in the description."""
    cfg = build_config({"preset": "tiny", "num_heads": 6, "head_dim": 64, "emb_dim": 64})
    flops, params = bench.train_flops_per_image(DiT, cfg)
    naive_flops, naive_params = bench.train_flops_per_image(bench.NaiveDiT, cfg)
    assert flops == naive_flops > 0 and params == naive_params


def test_training_and_data_measurements_run(tiny_cfg, image_dir, tmp_path):
    """The child's measured step (train.build_training + train_step, fast and naive) and the data
    pipeline still work with the rest of the repo."""
    spec = dict(preset="tiny", batch=2, device="cpu", compile=False, threads=1, warmup=1, steps=2, budget=0.0,
                naive=False, peak_seconds=0)
    for naive in (False, True):
        result = bench.child_train({**spec, "naive": naive})
        assert len(result["step_times"]) == 2 and result["peak_bytes"] > 0
    loader = bench.child_train({**spec, "workers": 0, "data_dir": image_dir, "cache_dir": str(tmp_path / "cache")})
    assert len(loader["step_times"]) == 2
    data = bench.bench_data(image_dir, str(tmp_path / "cache"), 16, 2, [0], 0.0)
    assert data["images"] == 4 and data["images_per_s"]["0"] > 0

"""The CUDA path (bf16 autocast, TF32, fused Adam, torch.compile): train, resume, sample on the CPU, bench.

Skipped where there is no GPU (CI). Each check runs in a child process, as a user would run it,
so this pytest process never holds a CUDA context."""
import json
import os
import subprocess
import sys

import pytest
import torch

from checkpoint import load_checkpoint
from config import config_from_dict
from conftest import ROOT, make_pandas
from dit import DiT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def python(*args, cwd):
    """Run `python ARGS` in cwd; its output, or a failure that shows it."""
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def train(workdir, *extra):
    """train.py on the GPU, tiny preset, everything inside workdir; returns the latest checkpoint."""
    python(os.path.join(ROOT, "train.py"), "--preset", "tiny", "--device", "cuda", "--data-dir", "pandas",
           "--sample-every", 0, "--no-log-graph", "--log-every", 1, *extra, cwd=workdir)
    return load_checkpoint(os.path.join(workdir, "checkpoints", "tiny", "latest.pt"))


def test_train_resume_then_sample_on_cpu(tmp_path):
    """A bf16 + fused-Adam run on the GPU saves, resumes on the GPU, and its checkpoint samples on the CPU."""
    make_pandas(tmp_path / "pandas", 8)
    first = train(tmp_path, "--max-steps", 6)
    assert first["step"] == 6 and first["config"]["amp"] is True and first["bad_steps"] == 0
    assert first["optimizer"]["param_groups"][0]["fused"] is True  # CUDA gets the fused Adam kernel
    second = train(tmp_path, "--max-steps", 9)
    assert second["step"] == 9 and second["bad_steps"] == 0
    assert any(not torch.equal(first["model"][k], second["model"][k]) for k in first["model"])  # it trained on
    python(os.path.join(ROOT, "sample.py"), "--ckpt", "checkpoints/tiny/latest.pt", "--device", "cpu",
           "--n", 4, "--steps", 5, "--out", "samples", cwd=tmp_path)
    assert os.path.exists(tmp_path / "samples" / "grid.png")


def test_compiled_run_saves_plain_weights(tmp_path):
    """--compile trains, and its checkpoint loads into an uncompiled DiT (no _orig_mod. prefixes)."""
    make_pandas(tmp_path / "pandas", 8)
    state = train(tmp_path, "--max-steps", 4, "--compile")
    assert state["step"] == 4 and state["bad_steps"] == 0
    DiT.from_config(config_from_dict(state["config"])).load_state_dict(state["model"])


BF16_VS_FP32 = """
import torch
from config import build_config
from diffusion import make_diffusion
from dit import DiT
cfg = build_config({"preset": "tiny"}, True)
model = DiT.from_config(cfg).cuda()
torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)  # a non-zero output that depends on the net
diffusion = make_diffusion(cfg, torch.device("cuda"))
x = torch.rand(8, 3, cfg.image_size, cfg.image_size, device="cuda") * 2 - 1
y = torch.zeros(8, dtype=torch.long, device="cuda")
for ctx in (torch.autocast("cuda", dtype=torch.bfloat16), torch.autocast("cuda", enabled=False)):
    torch.manual_seed(1)
    with ctx:
        print(diffusion.training_loss(model, x, y)[0].float().item())
"""


def test_bf16_loss_matches_fp32():
    """The autocast loss equals the fp32 one to bf16 precision (no silent dtype mistakes)."""
    bf16, fp32 = map(float, python("-c", BF16_VS_FP32, cwd=ROOT).split())
    assert bf16 == pytest.approx(fp32, rel=2e-2) and bf16 != fp32


def test_bench_quick_on_cuda(tmp_path):
    """bench.py --quick measures a preset on the GPU: bf16 peak, images/s, MFU against bf16."""
    out = python(os.path.join(ROOT, "bench.py"), "--quick", "--device", "cuda", "--presets", "tiny", "--no-naive",
                 "--json", tmp_path / "bench.json", cwd=tmp_path)
    report = json.load(open(tmp_path / "bench.json"))
    assert report["machine"]["mfu_precision"] == "bf16" and report["machine"]["peak"]["bf16"] > 0
    assert report["archs"][0]["fast"]["images_per_s"] > 0
    assert "matmul peak" in out


def test_no_amp_means_true_fp32():
    """--amp turns TF32 matmuls on with bf16 autocast; --no-amp leaves both off (a real fp32 run)."""
    code = ("import torch, distributed\n"
            "for amp in (True, False):\n"
            "    distributed.select_device('cuda', 0, amp)\n"
            "    print(torch.backends.cuda.matmul.allow_tf32)")
    assert python("-c", code, cwd=ROOT).split() == ["True", "False"]

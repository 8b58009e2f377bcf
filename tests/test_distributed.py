"""distributed.py: device and precision choice (the process-group helpers run in test_ddp.py)."""
import math
import signal

import pytest
import torch

import distributed
from conftest import make_pandas, run_train


def test_bad_device_is_a_clear_error(monkeypatch):
    """An unknown or unavailable --device ends in one sentence, not a torch traceback."""
    with pytest.raises(SystemExit, match="unknown --device 'gpu'"):
        distributed.select_device("gpu", 0, True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA is not available"):
        distributed.select_device("cuda:1", 0, True)
    assert distributed.select_device("auto", 0, True) == torch.device("cpu")


def test_tf32_matmuls_on_cuda_only_with_amp(monkeypatch):
    """select_device turns TF32 matmuls on for a CUDA device with amp and off with --no-amp (true fp32)."""
    for name, fn in (("is_available", lambda: True), ("device_count", lambda: 1), ("set_device", lambda d: None)):
        monkeypatch.setattr(torch.cuda, name, fn)  # a pretend GPU: only the flags are looked at
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for amp in (True, False):
            distributed.select_device("cuda", 0, amp)
            assert torch.backends.cuda.matmul.allow_tf32 is amp and torch.backends.cudnn.allow_tf32 is amp
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("speedup, expected", [(3.0, "bf16"), (1.3, "fp32"), (0.4, "fp32")])
def test_cpu_precision_follows_the_bf16_probe_off_x86(monkeypatch, speedup, expected):
    """A CPU whose features are not read (ARM) trains in bf16 only where its bf16 matmuls are clearly faster."""
    monkeypatch.setattr(distributed.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(distributed, "cpu_bf16_speedup", lambda: speedup)
    distributed.cpu_bf16.cache_clear()
    try:
        choice, why = distributed.precision(torch.device("cpu"), True)
    finally:
        distributed.cpu_bf16.cache_clear()
    assert choice == expected and f"{speedup:.1f}x" in why
    assert distributed.precision(torch.device("cpu"), False) == ("fp32", "--no-amp")  # --no-amp always wins


@pytest.mark.parametrize("amx, avx512_bf16, expected", [(True, True, "bf16"), (False, True, "bf16"), (False, False, "fp32")])
def test_x86_precision_follows_the_cpus_bf16_units_untimed(monkeypatch, amx, avx512_bf16, expected):
    """On x86 AMX or AVX512-BF16 means bf16 and neither fp32, with nothing timed: a timing flipped between two
    processes of one run on a busy machine, and on an AVX2 CPU took ~20 s at every start."""
    monkeypatch.setattr(distributed.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(distributed, "cpu_bf16_speedup", lambda: pytest.fail("x86 is not timed"))
    distributed.cpu_bf16.cache_clear()
    try:
        choice, why = distributed.precision(torch.device("cpu"), True)
    finally:
        distributed.cpu_bf16.cache_clear()
    assert choice == expected
    assert ("AMX" in why) == amx and ("AVX512-BF16" in why) == avx512_bf16 and ("no bf16 units" in why) == (not avx512_bf16)


def test_cuda_trains_in_bf16_unless_no_amp_or_no_bf16(monkeypatch):
    monkeypatch.setattr(distributed, "cpu_bf16", lambda: pytest.fail("no CPU probe for a GPU"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert distributed.precision(torch.device("cuda", 0), True)[0] == "bf16"
    assert distributed.precision(torch.device("cuda", 0), False)[0] == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # e.g. a pre-Ampere GPU
    assert distributed.precision(torch.device("cuda", 0), True)[0] == "fp32"


def test_bf16_probe_times_both_precisions():
    """A positive ratio of two real timings (its value depends on the CPU, so only its sanity is checked)."""
    speedup = distributed.cpu_bf16_speedup(n=64, repeats=2)
    assert math.isfinite(speedup) and speedup > 0


def test_autocast_for_runs_matmuls_in_the_chosen_precision():
    x = torch.randn(4, 4)
    with distributed.autocast_for(torch.device("cpu"), "bf16"):
        assert (x @ x).dtype == torch.bfloat16
    with distributed.autocast_for(torch.device("cpu"), "fp32"):
        assert (x @ x).dtype == torch.float32


def test_training_samples_in_the_runs_precision(tmp_path, monkeypatch):
    """The TensorBoard grid (and the SWD evaluation, through the same helper) runs the network under the run's
    bf16 autocast, and under none in fp32."""
    import diffusion
    data = make_pandas(tmp_path / "pandas", 4)
    seen = []
    real = diffusion.Diffusion.sample_batches
    monkeypatch.setattr(diffusion.Diffusion, "sample_batches",
                        lambda *a, **k: seen.append(torch.is_autocast_enabled("cpu")) or real(*a, **k))
    for name, speedup in (("bf16", 4.0), ("fp32", 0.5)):
        monkeypatch.setattr(distributed, "cpu_bf16", lambda: (speedup > 2, f"a pretend CPU, {speedup}x"))
        run_train(tmp_path / name, data, "--batch-size", 2, "--max-steps", 2, "--sample-every", 2, "--sample-steps", 2,
                  "--no-log-graph")
    assert seen == [True, False]


def test_resume_across_precisions_switches_and_keeps_fp32_state(tmp_path, monkeypatch, capsys):
    """A run trained under bf16 resumes on a CPU without bf16 units in fp32 (and back): weights, EMA and
    optimizer state stay fp32 in every checkpoint; the start line names the precision; bf16 changes the numbers."""
    data = make_pandas(tmp_path / "pandas", 8)
    flags = ("--batch-size", 4, "--sample-every", 0, "--no-log-graph")
    losses = {}
    for name, speedup in (("bf16", 4.0), ("fp32", 0.5)):
        monkeypatch.setattr(distributed, "cpu_bf16", lambda: (speedup > 2, f"a pretend CPU, {speedup}x"))
        run_train(tmp_path / name, data, *flags, "--max-steps", 3)
        assert f"precision {name}" in capsys.readouterr().out
        losses[name] = torch.load(tmp_path / name / "checkpoints" / "tiny" / "latest.pt", weights_only=True)["model"]
    assert any(not torch.equal(losses["bf16"][k], losses["fp32"][k]) for k in losses["fp32"])  # autocast was on
    monkeypatch.setattr(distributed, "cpu_bf16", lambda: (False, "a pretend CPU, 0.5x"))
    run_train(tmp_path / "bf16", data, *flags, "--max-steps", 6)  # the bf16 run, resumed in fp32
    assert "precision fp32" in capsys.readouterr().out
    state = torch.load(tmp_path / "bf16" / "checkpoints" / "tiny" / "latest.pt", weights_only=True)
    assert state["step"] == 6
    tensors = [*state["model"].values(), *state["ema"].values(),
               *(v for s in state["optimizer"]["state"].values() for v in s.values() if v.dim() > 0)]
    assert tensors and all(t.dtype == torch.float32 for t in tensors)


def test_a_second_sigterm_waits_for_the_save_and_a_ctrl_c_then_exits(monkeypatch):
    """SIGTERM asks for a save and stop; a second SIGTERM (a job scheduler repeating itself) does not cut the save
    short, while a Ctrl-C after a stop request exits at once with 130."""
    exits = []
    monkeypatch.setattr(distributed.os, "_exit", exits.append)
    with distributed.Stopper() as s:
        s._handle(signal.SIGTERM, None)
        s._handle(signal.SIGTERM, None)
        assert s.requested and exits == []
        s._handle(signal.SIGINT, None)
        assert exits == [130]

"""bench.py: its measurements still run, count the naive model's FLOPs as the fast one's, and its figures agree."""
import dataclasses

import pytest
import torch

import bench
import naive_dit
from config import build_config
from dit import DiT


def test_naive_and_fast_models_count_the_same_flops():
    """MFU and the speed-up compare equal work; 6 heads x 64 on a 64-wide stream as in the description."""
    cfg = build_config({"preset": "tiny", "num_heads": 6, "head_dim": 64, "emb_dim": 64})
    flops, params = bench.train_flops_per_image(DiT, cfg)
    naive_flops, naive_params = bench.train_flops_per_image(naive_dit.NaiveDiT, cfg)
    assert flops == naive_flops > 0 and params == naive_params


def test_training_and_data_measurements_run(tiny_cfg, image_dir, tmp_path):
    """The child's measured step (optim.build_training + train_step, fast and naive) and the data
    pipeline still work with the rest of the repo, and report what they measured: one positive time per
    timed step, the images the cache holds, a positive loader rate per worker count."""
    spec = dict(preset="tiny", batch=2, device="cpu", compile=False, threads=1, warmup=1, steps=2, budget=0.0,
                naive=False, peak_seconds=0, precision="fp32")
    for naive, precision in ((False, "fp32"), (False, "bf16"), (True, "fp32")):
        result = bench.child_train({**spec, "naive": naive, "precision": precision})
        assert len(result["step_times"]) == 2 and min(result["step_times"]) > 0 and result["peak_bytes"] > 0
    loader = bench.child_train({**spec, "workers": 0, "data_dir": image_dir, "cache_dir": str(tmp_path / "cache")})
    assert len(loader["step_times"]) == 2
    data = bench.bench_data(image_dir, str(tmp_path / "cache"), 16, 2, [0], 0.0)
    assert data["images"] == 4 and list(data["images_per_s"]) == ["0"] and data["images_per_s"]["0"] > 0


class Clock:
    """A stand-in for time.perf_counter that only moves when a fake step says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("step_seconds, warmup_calls, timed_calls", [(0.25, 2, 40), (5.0, 1, 3)])
def test_timed_warms_up_untimed_then_times_each_step(monkeypatch, step_seconds, warmup_calls, timed_calls):
    """timed(step, warmup=2, steps=3, budget=10 s): quick steps get the full warm-up and are timed while the
    budget lasts; a step slower than a quarter of the budget cuts the warm-up to one call and is timed 3
    times. Each time is that step's own duration."""
    clock, calls = Clock(), []
    monkeypatch.setattr(bench.time, "perf_counter", clock)

    def step():
        calls.append(1)
        clock.now += step_seconds
    times = bench.timed(step, 2, 3, 10.0, torch.device("cpu"))
    assert len(calls) == warmup_calls + timed_calls and times == [step_seconds] * timed_calls


def test_reported_figures_are_consistent():
    """Images/s = batch / median step time; achieved FLOP/s = FLOPs per image x images/s; MFU = that / peak;
    speed-up and memory are this repo over naive; the data pipeline is compared with the model's rate; the
    table prints those numbers."""
    r = dict(name="tiny", image_size=16, tokens=16, batch=8, params=1000, naive_params=1000, train_flops=1e9,
             naive_train_flops=1e9, fast=dict(step_times=[0.5, 0.1, 0.2], peak_bytes=200e9),
             naive=dict(step_times=[0.4, 0.4, 0.8], peak_bytes=800e9), sampling={},
             data=dict(images=4, build_seconds=1.0, images_per_s={"0": 80.0}), loader_train={})
    bench.summarize(r, 1e12)
    assert r["fast"]["images_per_s"] == pytest.approx(8 / 0.2) and r["naive"]["images_per_s"] == pytest.approx(8 / 0.4)
    assert r["achieved_flops"] == pytest.approx(40e9) and r["mfu"] == pytest.approx(0.04)
    assert r["speedup"] == pytest.approx(2.0) and r["memory_ratio"] == pytest.approx(0.25)
    assert r["data_vs_model"] == pytest.approx({"0": 2.0})
    rows = dict(bench.table_rows(r, set()))
    assert rows["train img/s, this repo"] == "40.0" and rows["train img/s, naive"] == "20.0"

    assert rows["speed-up over naive"] == "2.00x" and rows["achieved GFLOP/s (MFU)"] == "40.0 (4.00%)"
    assert rows["data img/s, 0 workers (x model)"] == "80.0 (x2.00)"
    assert rows["peak memory, this repo"] == "200 GB" and rows["peak memory, naive"] == "800 GB"
    assert rows["parameters (same for naive)"] == "0.001 M" and rows["GFLOP per training image"] == "1.00"


def test_sampling_figures_are_consistent(tiny_cfg, monkeypatch):
    """Each sampler's model evaluations/s is batch / seconds per step, and its grid time is that step time
    scaled to every step and 64 images; a grid that would take too long is timed over a smaller batch and
    fewer steps, and not called 'measured'. The real sampler runs; the arithmetic is checked on a fixed step time."""
    small = dataclasses.replace(tiny_cfg, max_t=20)
    out = bench.bench_sampling(small, torch.device("cpu"), budget=0.0)
    assert sorted(out) == ["ddim-20", "ddpm-20"] and all(res["evals_per_s"] > 0 for res in out.values())
    calls = []

    def step_seconds(model, diffusion, cfg, device, sampler, steps, batch, timed_steps):
        calls.append((sampler, steps, batch, timed_steps))
        return 1 / 64  # per step, whatever the batch (binary fractions: no rounding below)
    monkeypatch.setattr(bench, "sampler_step_seconds", step_seconds)
    out = bench.bench_sampling(small, torch.device("cpu"), budget=30 / 64)
    assert calls == [("ddim", 2, 1, 1), ("ddim", 20, 10, 3), ("ddpm", 20, 10, 3)]  # batch = budget / 3 / step time
    for key in ("ddim-20", "ddpm-20"):
        res = out[key]
        assert res["evals_per_s"] == pytest.approx(10 * 64) and res["grid_seconds"] == pytest.approx(20 * 64 / 64 / 10)
        assert (res["batch"], res["timed_steps"], res["steps"], res["measured"]) == (10, 3, 20, False)


def test_a_row_per_precision_and_their_ratio():
    """Each precision's images/s from its own median step time, and bf16 over fp32."""
    r = dict(batch=8, by_precision=dict(fp32=dict(step_times=[0.4, 0.2, 0.2]), bf16=dict(step_times=[0.1, 0.1, 0.3])),
             fast=dict(), naive=dict())
    bench.summarize(r, 1e12)
    rows = dict(bench.precision_rows(r))
    assert rows == {"train img/s, fp32": "40.0", "train img/s, bf16": "80.0", "train speed bf16 / fp32": "2.00x"}


def test_main_prints_a_row_per_precision(monkeypatch, capsys, tmp_path):
    """The whole command, cut to the bone: the table names the precision train.py picks and has both rows."""
    monkeypatch.setitem(bench.MODES, "quick", dict(warmup=1, steps=1, budget=0.0, sample_budget=0.0, peak=0.05,
                                                   data_seconds=0.05, data_limit=4))
    bench.main(["--quick", "--presets", "tiny", "--no-naive", "--workers", "0", "--json", str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    assert "train.py's precision here:" in out and "train img/s, fp32" in out and "train img/s, bf16" in out
    assert "train speed bf16 / fp32" in out


def test_matmul_peak_stops_at_a_product_slower_than_its_budget(monkeypatch):
    """Emulated bf16 (an AVX2 CPU: ~2 s per 1024 x 1024 product) is timed once, not three times at two sizes
    (minutes per bench run and per test); fast products still take the best of several, both sizes."""
    now, sizes = [0.0], []

    def fake_mm(a, b, seconds):
        sizes.append(a.shape[0])
        now[0] += seconds * (a.shape[0] / 1024) ** 3

    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(bench.torch, "randn", lambda n, m, **kw: torch.empty(n, 0))
    monkeypatch.setattr(bench.torch, "mm", lambda a, b: fake_mm(a, b, 2.0))
    assert bench.matmul_peak(torch.device("cpu"), seconds=0.5) == pytest.approx(2 * 1024 ** 3 / 2.0)
    assert sizes == [1024, 1024]  # a warm-up and one timed product
    sizes.clear()
    monkeypatch.setattr(bench.torch, "mm", lambda a, b: fake_mm(a, b, 0.01))
    bench.matmul_peak(torch.device("cpu"), seconds=0.5)
    assert sizes.count(1024) > 3 and sizes.count(2048) > 3


def test_a_bad_data_dir_is_one_error_line_before_any_measurement(monkeypatch, tmp_path):
    """A missing or empty --data-dir stops with one 'error:' line naming it, before the matmul peak or any
    training is measured: no DataError traceback, and not minutes later."""
    measured = []
    monkeypatch.setattr(bench, "peaks", lambda *a: measured.append(1) or ({"fp32": 1.0}, "fp32"))
    monkeypatch.setattr(bench, "bench_arch", lambda *a: measured.append(2))
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "typo", tmp_path / "empty"):
        with pytest.raises(SystemExit) as e:
            bench.main(["--quick", "--presets", "tiny", "--data-dir", str(folder)])
        assert str(e.value.code).startswith("error:") and str(folder) in str(e.value.code) and "--data-dir" in str(e.value.code)
    assert not measured


def test_a_workers_typo_is_refused_while_parsing(capsys):
    """--workers 0,x stops at argument parsing (exit 2, naming the flag), not with a ValueError after the training runs."""
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--workers", "0,x"])
    assert e.value.code == 2 and "--workers" in capsys.readouterr().err
    assert bench.parse_args(["--workers", "0,2"]).workers == [0, 2] and bench.parse_args([]).workers == []

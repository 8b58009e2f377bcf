"""bench.py: its measurements still run, and count the naive model's FLOPs as the fast one's."""
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

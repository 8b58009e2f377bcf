"""Sliced Wasserstein distance (metrics.py) and its use in training (issue 6).

Sets are procedural pandas at 64 px (the size training measures at), 32 per set: a full
three-level pyramid (64, 32, 16) in about a second per distance on one core.
"""
import math
import os
import random
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import metrics  # noqa: E402
from conftest import make_pandas, run_train  # noqa: E402
from dataset import draw_panda  # noqa: E402


def pandas(n, size=64, seed=0):
    """n procedural pandas as a uint8 tensor (n, 3, size, size)."""
    images = [draw_panda(random.Random(seed * 1000 + i), size) for i in range(n)]
    return torch.stack([torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8) for img in images]).view(n, size, size, 3).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def sets():
    a, b = pandas(32, seed=1), pandas(32, seed=2)  # disjoint draws from one distribution
    noise = torch.randint(0, 256, a.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return a, b, noise


@pytest.fixture(scope="module")
def scores(sets):
    a, b, noise = sets
    return {"same": metrics.swd(a, b)["mean"], "noise": metrics.swd(a, noise)["mean"]}


def test_identical_sets_score_zero(sets):
    a = sets[0]
    result = metrics.swd(a, a.clone())
    assert result["resolutions"] == [64, 32, 16]
    assert result["mean"] == 0.0 and result["levels"] == [0.0, 0.0, 0.0]


def test_same_distribution_small_and_noise_large(scores):
    assert 0 < scores["same"] < scores["noise"] / 3, scores


def test_blur_is_between_and_monotone_in_sigma(sets, scores):
    a = sets[0]
    blurred = [metrics.swd(a, metrics.gaussian_blur(a, sigma))["mean"] for sigma in (0.5, 1.0, 2.0)]
    assert 0 < blurred[0] < blurred[1] < blurred[2] < scores["noise"], blurred
    assert blurred[2] > scores["same"], (blurred, scores)  # 2 px of blur is worse than other real images


def test_same_seed_same_value_other_seed_close():
    a, b = pandas(8, seed=3), pandas(8, seed=4)
    first, again, other = metrics.swd(a, b, seed=5), metrics.swd(a, b, seed=5), metrics.swd(a, b, seed=6)
    assert first == again
    assert other["mean"] != first["mean"] and abs(other["mean"] - first["mean"]) < 0.5 * first["mean"]


def test_uint8_and_float_inputs_agree():
    a, b = pandas(8, seed=3), pandas(8, seed=4)
    assert metrics.swd(a, b) == metrics.swd(a.float() / 255, b.float() / 255)
    shifted = metrics.swd(a.float() / 127.5 - 1, b.float() / 127.5 - 1)["mean"]  # per-set standardisation: any range
    assert shifted == pytest.approx(metrics.swd(a, b)["mean"], rel=1e-3)


def test_nonfinite_samples_give_nonfinite_score_and_mismatch_is_refused():
    real = pandas(4)
    fake = torch.full((4, 3, 16, 16), float("nan"))
    assert math.isnan(metrics.swd(real, metrics.to_uint8(fake))["mean"])  # never mistaken for a good score
    with pytest.raises(ValueError, match="same"):
        metrics.swd(real, pandas(4, size=32))


def test_cli_prints_levels_and_explains_bad_folders(tmp_path, capsys):
    real, fake = make_pandas(tmp_path / "real", 6, size=32), make_pandas(tmp_path / "fake", 6, size=32, seed=1)
    metrics.main([real, fake, "--size", "32", "--n", "6"])
    out = capsys.readouterr().out
    assert "6 real vs 6 fake" in out and "32px" in out and "16px" in out and "mean" in out
    os.makedirs(tmp_path / "empty")
    for folder, words in [(str(tmp_path / "missing"), "does not exist"), (str(tmp_path / "empty"), "no images")]:
        with pytest.raises(SystemExit) as e:
            metrics.main([real, folder])
        assert str(e.value).startswith("error:") and folder in str(e.value) and words in str(e.value)
        assert "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        metrics.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--size", "--n", "--seed", "--norm", "--calibrate", "--holdout"))


def test_training_logs_swd_keeps_best_and_excludes_holdout(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    data = make_pandas(tmp_path / "pandas", 12, size=32)
    flags = ["--eval-every", 2, "--eval-n", 4, "--eval-steps", 2, "--holdout", 4, "--no-log-graph", "--run", "q"]
    run_train(tmp_path, data, "--max-steps", 4, *flags)
    run_train(tmp_path, data, "--max-steps", 6, *flags)  # resumed: best_swd must survive
    events = EventAccumulator(str(tmp_path / "dit_training" / "q"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    swds = {e.step: e.value for e in events.Scalars("Quality/swd")}
    assert sorted(swds) == [2, 4, 6] and all(math.isfinite(v) and v > 0 for v in swds.values())
    assert {"Quality/swd_level_64", "Quality/swd_level_32", "Quality/swd_level_16"} <= set(events.Tags()["scalars"])
    assert "Quality/samples" in events.Tags()["images"]
    assert events.Images("Quality/samples")[0].width == 2 * 130 + 2  # 4 samples of 16 px, enlarged to 128 px
    best = torch.load(tmp_path / "checkpoints" / "q" / "best.pt", weights_only=True)
    assert best["best_swd"] == pytest.approx(min(swds.values()), rel=1e-5)
    assert best["step"] == min(swds, key=swds.get) and "model" in best and "ema" in best
    # the same figure as scripts/quality_curve.py's (first set) for the same checkpoint: same noise, same projections
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from quality_curve import load_checkpoint, measure
    last = load_checkpoint(str(tmp_path / "checkpoints" / "q" / "latest.pt"))
    assert last["step"] == 6 and measure(last, 4, 2)[0]["mean"] == pytest.approx(swds[6], rel=1e-4)
    held = sorted(os.listdir(data))[-4:]
    trained = "".join(open(os.path.join(tmp_path, "cache", f)).read() for f in os.listdir(tmp_path / "cache") if f.endswith(".files"))
    assert trained.count(".png") == 8 and not any(name in trained for name in held)


def test_unreadable_reference_photos_skip_the_swd_not_the_run(tmp_path, capsys):
    """Held-out photos are read only at the first evaluation: if none can be read, that evaluation says so
    in one line and training goes on to its checkpoint (no traceback, no lost run)."""
    data = make_pandas(tmp_path / "pandas", 12, size=32)
    for name in sorted(os.listdir(data))[-4:]:  # the held-out four
        with open(os.path.join(data, name), "wb") as f:
            f.write(b"not an image")
    with pytest.warns(UserWarning, match="unreadable"):
        run_train(tmp_path, data, "--max-steps", 4, "--eval-every", 2, "--eval-n", 4, "--eval-steps", 2,
                  "--holdout", 4, "--no-log-graph", "--run", "q")
    assert "warning: step 2: no SWD this time (none of the 4 image files could be read); training goes on" \
        in capsys.readouterr().out
    assert torch.load(tmp_path / "checkpoints" / "q" / "latest.pt", weights_only=True)["step"] == 4
    assert not os.path.exists(tmp_path / "checkpoints" / "q" / "best.pt")

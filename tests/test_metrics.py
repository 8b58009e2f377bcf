"""Sliced Wasserstein distance (metrics.py) and its use in training (issue 6).

Sets are procedural pandas at 64 px (the size training measures at), 32 per set: a full
three-level pyramid (64, 32, 16) in about a second per distance on one core.
"""
import glob
import math
import os
import random
import sys
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import metrics  # noqa: E402
from conftest import make_pandas, run_train  # noqa: E402
from dataset import draw_panda, folder_files, holdout_split  # noqa: E402


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


def test_levels_are_finest_first(sets):
    """Detail removed below 32 px moves the 64 px level most and the 16 px level least."""
    a, b, _ = sets
    same, coarse = metrics.swd(a, b), metrics.swd(a, metrics.down_up(b, 24))
    assert same["resolutions"] == coarse["resolutions"] == [64, 32, 16]
    rise = [c - s for c, s in zip(coarse["levels"], same["levels"])]
    assert rise[0] > rise[1] > rise[2] and rise[0] > same["levels"][0], (same, coarse)


def test_symmetric_and_counts_reported(sets):
    a, b, _ = sets
    assert metrics.swd(a, b) == {**metrics.swd(b, a), "n_real": 32, "n_fake": 32}
    ab, ba = metrics.swd(a[:10], b[:24]), metrics.swd(b[:24], a[:10])
    assert (ab["n_real"], ab["n_fake"], ba["n_real"], ba["n_fake"]) == (10, 24, 24, 10)
    assert ab["mean"] == pytest.approx(ba["mean"], rel=0.15)  # other neighbourhoods drawn, same distance


def test_swd_grows_with_a_known_brightness_shift_under_union_norm_only():
    a, b = pandas(12, size=32, seed=3).float() / 255, pandas(12, size=32, seed=4).float() / 255
    union = [metrics.swd(a, b + shift, norm="union")["mean"] for shift in (0.0, 0.1, 0.2, 0.4)]
    assert union[0] < union[1] < union[2] < union[3] and union[3] > 3 * union[0], union
    per_set = [metrics.swd(a, b + shift)["mean"] for shift in (0.0, 0.4)]
    assert per_set[1] == pytest.approx(per_set[0], rel=1e-3)  # the paper's per-set standardisation ignores it


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
    assert math.isnan(metrics.swd(real, metrics.as_saved_png(fake))["mean"])  # never mistaken for a good score
    with pytest.raises(ValueError, match="same"):
        metrics.swd(real, pandas(4, size=32))


def test_samples_and_reference_photos_are_scored_on_one_scale(tmp_path):
    """Samples that are the reference photos score 0 even when both sets share one normalisation
    (norm='union' measures a scale mismatch that the per-set one hides)."""
    data = make_pandas(tmp_path / "pandas", 8, size=metrics.EVAL_SIZE)
    held_out = holdout_split(folder_files(data), 4)[1]
    held = metrics.reference_paths(held_out, [], 4)
    fake = metrics.load_images(held, metrics.EVAL_SIZE).float() / 127.5 - 1  # as the sampler returns them
    for norm in ("set", "union"):
        result = metrics.score_samples(fake, held, norm=norm)
        assert result["mean"] == 0.0 and (result["n_real"], result["n_fake"]) == (4, 4)


def test_the_cli_scores_small_samples_as_training_does(tmp_path, capsys):
    """`metrics.py REAL SAMPLES` on sample.py's PNGs of a 48 px model must give training's figure for those samples:
    they are enlarged to 64 px as training enlarges its own, not by PIL's bicubic (a different 64 px level)."""
    from torchvision.utils import save_image
    real = make_pandas(tmp_path / "real", 6, size=64)
    g = torch.Generator().manual_seed(0)
    fake = torch.randint(0, 256, (6, 3, 24, 24), generator=g).float() / 127.5 - 1  # on a PNG's 8-bit steps
    os.makedirs(tmp_path / "fake")
    for i, img in enumerate(fake):
        save_image((img + 1) / 2, tmp_path / "fake" / f"{i:04d}.png")  # as sample.py saves them
    expected = metrics.score_samples(fake, tuple(folder_files(real)))
    metrics.main([real, str(tmp_path / "fake"), "--n", "6"])
    printed = float(capsys.readouterr().out.split("SWD x1e3")[1].split()[0])
    assert printed == pytest.approx(expected["mean"], abs=0.006)  # printed to 2 decimals


def test_cli_prints_levels_and_explains_bad_folders(tmp_path, capsys):
    real, fake = make_pandas(tmp_path / "real", 6, size=32), make_pandas(tmp_path / "fake", 6, size=32, seed=1)
    metrics.main([real, fake, "--size", "32", "--n", "6"])
    out = capsys.readouterr().out
    assert out.startswith("samples") and "(6 images vs 6 reference)" in out and "32px" in out and "16px" in out
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
    assert all(flag in out for flag in ("--size", "--n", "--n-fake", "--seed", "--norm", "--calibrate", "--splits", "--kid",
                                        "--fid", "--inception-weights", "--memorisation", "--holdout"))


def test_training_logs_swd_keeps_best_and_excludes_holdout(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    data = make_pandas(tmp_path / "pandas", 12, size=32)
    flags = ["--eval-every", 2, "--eval-n", 4, "--eval-steps", 2, "--holdout", 4, "--no-log-graph", "--run", "q"]
    run_train(tmp_path, data, "--max-steps", 4, *flags)
    run_train(tmp_path, data, "--max-steps", 6, *flags)  # resumed: best_swd must survive
    assert "4 samples vs 4 reference images" in capsys.readouterr().out
    # one accumulator per file: over the folder, tensorboard skips a file whose name sorts before the last one read
    # (the resumed run's writer can end in .10 after the first's .9)
    files = sorted(glob.glob(str(tmp_path / "dit_training" / "q" / "events.*")), key=os.path.getmtime)
    runs = [EventAccumulator(f, size_guidance={"scalars": 0, "images": 0}).Reload() for f in files]
    scalars = lambda tag: [e for acc in runs if tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)]  # noqa: E731
    swds = {e.step: e.value for e in scalars("Quality/swd")}
    assert sorted(swds) == [2, 4, 6] and all(math.isfinite(v) and v > 0 for v in swds.values())
    assert all(scalars(f"Quality/swd_level_{px}") for px in (64, 32, 16))
    counts = [(e.value, r.value) for e, r in zip(scalars("Quality/swd_n_samples"), scalars("Quality/swd_n_reference"))]
    assert counts == [(4.0, 4.0)] * 3  # both image counts beside every figure: 4 samples vs the 4 held-out images
    assert "Quality/samples" in runs[0].Tags()["images"]
    assert runs[0].Images("Quality/samples")[0].width == 2 * 130 + 2  # 4 samples of 16 px, enlarged to 128 px
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


def test_a_best_from_another_evaluation_is_not_kept_against_this_one(tmp_path, capsys):
    """SWD depends on the counts and the sampler: after a resume that evaluates otherwise (here more sampler steps),
    a best scored the old way is no yardstick, so the first new score becomes best.pt; the same evaluation keeps it."""
    data = make_pandas(tmp_path / "pandas", 12, size=32)
    flags = ["--eval-every", 2, "--eval-n", 4, "--holdout", 4, "--no-log-graph", "--run", "q"]
    run_train(tmp_path, data, "--max-steps", 2, "--eval-steps", 2, *flags)
    folder = tmp_path / "checkpoints" / "q"
    for name in ("step_0000002.pt", "latest.pt"):  # as if the old evaluation had scored a best no model could beat
        state = torch.load(folder / name, weights_only=True)
        torch.save({**state, "best_swd": 1e-9}, folder / name)
    run_train(tmp_path, data, "--max-steps", 4, "--eval-steps", 2, *flags)
    assert torch.load(folder / "best.pt", weights_only=True)["step"] == 2  # the same evaluation: 1e-9 stands
    run_train(tmp_path, data, "--max-steps", 6, "--eval-steps", 3, *flags)
    best = torch.load(folder / "best.pt", weights_only=True)
    assert best["step"] == 6 and best["best_swd"] > 1e-9 and "ddim-3" in best["best_of"]
    assert "the evaluation changed since best.pt" in capsys.readouterr().out


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


# ---------------------------------------------------------------------------------------------
# the real-vs-real floor at the same counts


@pytest.fixture(scope="module")
def many():
    return pandas(48, size=32, seed=5)


def test_floor_is_positive_deterministic_and_falls_with_the_counts(many):
    small, again, other = (metrics.floor(many, 8, 8, splits=3, seed=s) for s in (1, 1, 2))
    large = metrics.floor(many, 24, 24, splits=3, seed=1)
    assert small == again and other["splits"] != small["splits"]
    assert all(math.isfinite(v) and v > 0 for v in small["splits"] + large["splits"]) and small["std"] > 0
    assert (small["n_real"], small["n_fake"], large["n_real"], large["n_fake"]) == (8, 8, 24, 24)
    assert small["mean"] > 1.3 * large["mean"], (small, large)  # fewer images, larger distance between two draws
    with pytest.raises(metrics.DataError, match="--n-fake"):
        metrics.floor(many, 24, 25)
    ir, jf = metrics.random_split(48, 20, 28, torch.Generator().manual_seed(0))
    assert sorted(ir.tolist() + jf.tolist()) == list(range(48))  # disjoint: no image on both sides


def test_calibrate_cli_prints_the_floor_at_the_counts_asked(tmp_path, capsys):
    real = make_pandas(tmp_path / "real", 20, size=16)
    metrics.main([real, "--calibrate", "--size", "16", "--n", "6", "--n-fake", "10", "--splits", "2"])
    out = capsys.readouterr().out
    floor_line = next(line for line in out.splitlines() if line.startswith("real vs real (floor)"))
    assert "+-" in floor_line and "(10 images vs 6 reference)" in floor_line and "noise" in out
    assert "over 2 random disjoint splits" in out
    with pytest.raises(SystemExit) as e:
        metrics.main([real, "--calibrate", "--size", "16", "--n", "10", "--n-fake", "11"])
    assert str(e.value).startswith("error:") and "21" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# KID and FID: the arithmetic against closed forms, on a small feature network (no weights needed)


def fid_closed_form(x, y):
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), the trace term via S1^(1/2) S2 S1^(1/2)'s eigenvalues."""
    s1, s2 = torch.cov(x.T), torch.cov(y.T)
    w, v = torch.linalg.eigh(s1)
    root1 = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp(min=0).sqrt().sum()
    return ((x.mean(0) - y.mean(0)) ** 2).sum() + s1.trace() + s2.trace() - 2 * cross


def mmd2_unbiased(x, y):
    """MMD^2 with the kernel (x.y / d + 1)^3, diagonal terms left out of the within-set means."""
    k = lambda a, b: (a @ b.T / x.shape[1] + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    return (kxx.sum() - kxx.trace()) / (m * (m - 1)) + (kyy.sum() - kyy.trace()) / (n * (n - 1)) - 2 * k(x, y).mean()


@pytest.fixture(scope="module")
def small_features():
    """A fixed random linear 'network' on 8x8 uint8 images and its features of two image sets."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 6))
    real = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    fake = (real[:30].int() + torch.randint(0, 60, (30, 3, 8, 8))).clamp(max=255).to(torch.uint8)
    f_real, f_fake = (metrics.features(x.float(), net, batch=7) for x in (real, fake))
    with torch.no_grad():
        assert torch.allclose(f_real, net(real.float()).double(), rtol=1e-5, atol=1e-3)  # batching changes nothing
    return f_real, f_fake


def test_fid_matches_the_closed_form(small_features):
    f_real, f_fake = small_features
    assert metrics.fid(f_real, f_fake) == pytest.approx(fid_closed_form(f_real, f_fake).item(), rel=1e-6)
    g = torch.Generator().manual_seed(0)  # known Gaussians: N(0, I) and N(m, 4 I) in 4-d
    a, b = torch.randn(4000, 4, generator=g, dtype=torch.float64), 2 * torch.randn(4000, 4, generator=g, dtype=torch.float64)
    m = torch.tensor([1.0, -2.0, 0.0, 0.5], dtype=torch.float64)
    assert metrics.fid(a, b + m) == pytest.approx((m ** 2).sum().item() + 4 * (1 + 4 - 2 * 2), abs=0.4)


def test_kid_is_the_unbiased_polynomial_mmd(small_features):
    f_real, f_fake = small_features
    mean, std = metrics.kid(f_real[:30], f_fake)  # subsets of all 30: every subset is the whole set
    assert mean == pytest.approx(mmd2_unbiased(f_real[:30], f_fake).item(), rel=1e-9) and std < 1e-9 * abs(mean)
    first, again, other = (metrics.kid(f_real, f_fake, subsets=5, seed=s) for s in (1, 1, 2))
    assert first == again and other != first and first[1] > 0  # 30 of 40 real: the subsets differ
    x, y, z = torch.randn(3, 300, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    same, shifted = metrics.kid(x, y, subsets=10)[0], metrics.kid(x, z + 0.5, subsets=10)[0]
    assert abs(same) < 0.1 * shifted, (same, shifted)  # two draws of one distribution: ~0, unbiased


def test_without_inception_weights_one_sentence_and_swd_still_reported(tmp_path, capsys, monkeypatch):
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(fidelity, "load_state_dict_from_url", offline)
    real, fake = make_pandas(tmp_path / "real", 4, size=16), make_pandas(tmp_path / "fake", 4, size=16, seed=1)
    metrics.main([real, fake, "--size", "16", "--kid", "--fid"])  # returns: exit status 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("samples") and "(4 images vs 4 reference)" in lines[0] and len(lines) == 2
    assert lines[1].startswith("no KID/FID") and fidelity.URL_INCEPTION_V3 in lines[1] and "--inception-weights FILE" in lines[1]
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"not weights")
    with pytest.raises(SystemExit) as e:
        metrics.main([real, fake, "--size", "16", "--kid", "--inception-weights", str(bad)])
    assert str(e.value).startswith("error:") and str(bad) in str(e.value) and "\n" not in str(e.value)


def test_without_torch_fidelity_one_sentence(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(metrics, "has_torch_fidelity", lambda: False)
    real, fake = make_pandas(tmp_path / "real", 4, size=16), make_pandas(tmp_path / "fake", 4, size=16, seed=1)
    metrics.main([real, fake, "--size", "16", "--kid"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].endswith("pip install -r requirements-eval.txt")


# ---------------------------------------------------------------------------------------------
# memorisation


def test_copies_of_training_images_are_flagged_held_out_copies_are_not():
    train, held, new = pandas(10, size=16, seed=6), pandas(5, size=16, seed=7), pandas(1, size=16, seed=8)
    fake = torch.stack([train[3], train[7].flip(-1), held[2], new[0], train[5]])
    m = metrics.memorisation(fake, train, held)
    assert m["ratio"][0] < 1e-9 and m["ratio"][1] < 1e-9 and m["ratio"][2] > 1e3  # held-out copy: d_held = 0
    assert m["nearest"][:2].tolist() == [3, 7] and m["flipped"][:2].tolist() == [False, True]
    assert 0.5 < m["ratio"][3] < 2 and m["flagged"] == 0.6 and m["min"] < 1e-9


def test_cli_memorisation_names_the_closest_pair(tmp_path, capsys):
    import shutil
    real = make_pandas(tmp_path / "real", 12, size=16)
    fake = make_pandas(tmp_path / "fake", 3, size=16, seed=9)
    shutil.copy(os.path.join(real, "panda_02.png"), os.path.join(fake, "zz_copy.png"))  # a training image
    shutil.copy(os.path.join(real, "panda_11.png"), os.path.join(fake, "zz_held.png"))  # held out (the last 4)
    metrics.main([real, fake, "--size", "16", "--memorisation", "--holdout", "4"])
    out = capsys.readouterr().out
    assert "5 samples, 8 training and 4 held-out images" in out and "20.0% of samples under 0.5" in out
    first = out.splitlines()[2].split()
    assert first[0] == "0.000" and first[1].endswith("zz_copy.png") and first[3].endswith("panda_02.png")


def test_seams_see_the_patch_grid_and_nothing_else():
    """metrics.seams: 1 where borders and insides step alike (noise, the procedural pandas ~1.1 at 6 px);
    exactly 3 when the steps across the 4 px borders are 3x those inside; huge for flat patches; and a grid
    of another pitch does not count as this one's."""
    noise = torch.rand(16, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    assert abs(metrics.seams(noise, 6) - 1) < 0.02
    assert 0.9 < metrics.seams(pandas(64, size=48), 6) < 1.3
    ramp = torch.tensor([0.0, 1, 2, 3, 6, 7, 8, 9, 12, 13, 14, 15])  # steps of 1 inside, 3 across the border
    image = (ramp[None, :] + ramp[:, None]).expand(2, 3, 12, 12)
    assert metrics.seams(image, 4) == pytest.approx(3.0)
    flat = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)).repeat_interleave(6, 2).repeat_interleave(6, 3)
    assert metrics.seams(flat, 6) > 1e3
    assert abs(metrics.seams(flat, 5) - 1) < 0.5


def test_cartoon_faces_pass_every_drawn_panda_and_no_blocks_or_noise():
    """metrics.cartoon_face finds the parts dataset.draw_panda draws (a white blob, two dark eye patches inside
    it, ears and limbs on its outline): every drawn panda at 48 px passes, in uint8 or as [-1, 1] samples;
    the same pandas as 6 px blocks, or drawn without eye patches, or noise, do not; and faces_against says
    nothing about other data."""
    real = pandas(40, size=48, seed=3)
    assert metrics.cartoon_faces(real) == 1.0
    assert metrics.cartoon_faces(real.float() / 127.5 - 1) == 1.0
    blocks = F.interpolate(F.interpolate(real.float(), size=8, mode="area"), size=48, mode="nearest").round().to(torch.uint8)
    assert metrics.cartoon_faces(blocks) == 0.0
    noise = torch.randint(0, 256, (20, 3, 48, 48), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert metrics.cartoon_faces(noise) == 0.0
    with mock.patch.object(Image.Image, "paste", lambda *args, **kwargs: None):  # draw_panda pastes the eye patches
        no_eyes = pandas(20, size=48, seed=3)
    assert metrics.cartoon_faces(no_eyes) == 0.0
    assert metrics.faces_against(blocks, metrics.cartoon_faces(real)) == (0.0, 1.0)
    assert metrics.faces_against(real, metrics.cartoon_faces(noise)) is None


@pytest.mark.parametrize("size", [96, 256])
def test_larger_pandas_are_checked_for_faces_at_48_px(size):
    """At 96 px and up a nose and a mouth are dark spots of >= 2 pixels that white surrounds, so pandas drawn without
    eye patches would pass; checked at 48 px (as panda256's grids are scored) they do not, and drawn ones do."""
    assert metrics.cartoon_faces(pandas(8, size=size, seed=3)) == 1.0
    with mock.patch.object(Image.Image, "paste", lambda *args, **kwargs: None):  # draw_panda pastes the eye patches
        no_eyes = pandas(8, size=size, seed=3)
    assert metrics.cartoon_faces(no_eyes) == 0.0


def test_cartoon_face_needs_four_dark_parts_on_the_outline():
    """A white disk with two dark eye spots is a face only once four dark parts sit on its rim (ears, arms, legs):
    with three or fewer it is not."""
    yy, xx = torch.meshgrid(torch.arange(48), torch.arange(48), indexing="ij")

    def face(parts):
        img = torch.full((3, 48, 48), 128, dtype=torch.uint8)  # a grey background
        img[:, (yy - 24) ** 2 + (xx - 24) ** 2 <= 15 ** 2] = 240  # the white head-and-body
        for y, x in [(20, 18), (20, 28)]:  # the eye patches, inside it
            img[:, y:y + 3, x:x + 3] = 20
        for y, x in parts:  # dark 4 x 4 squares across the rim
            img[:, y - 2:y + 2, x - 2:x + 2] = 20
        return img

    rim = [(9, 24), (39, 24), (24, 9), (24, 39)]
    assert [metrics.cartoon_face(face(rim[:k])) for k in range(5)] == [False, False, False, False, True]


def test_swd_of_a_known_shift_is_that_shift():
    """One-dimensional sets shifted by 0.5: every unit direction is +-1, so the distance is exactly 0.5."""
    a = torch.randn(200, 1, generator=torch.Generator().manual_seed(1))
    assert metrics.sliced_wasserstein(a, a + 0.5, torch.Generator().manual_seed(0)) == pytest.approx(0.5, rel=1e-5)


def test_training_on_the_cartoons_logs_faces_and_seams(tmp_path, capsys):
    """--eval-every on the procedural pandas also logs Quality/faces (and, on any data, Quality/seams)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    data = make_pandas(tmp_path / "pandas", 8, size=48)
    run_train(tmp_path, data, "--max-steps", 2, "--image-size", 48, "--patch-size", 12, "--eval-every", 2, "--eval-n", 4,
              "--eval-steps", 2, "--no-log-graph", "--run", "f")
    assert "with a panda's face (100% of the data)" in capsys.readouterr().out
    events = EventAccumulator(str(tmp_path / "dit_training" / "f"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.value for e in events.Scalars("Quality/faces")] == [0.0]  # two steps draw no panda
    assert events.Scalars("Quality/seams")[0].value > 0


def test_memorisation_marks_a_mirrored_copy_and_not_the_copy_itself():
    """A training image and its mirror both find it as the nearest; only the mirror is marked flipped."""
    train, held = pandas(10, size=16, seed=6), pandas(5, size=16, seed=7)
    m = metrics.memorisation(torch.stack([train[0].flip(-1), train[0]]), train, held)
    assert m["nearest"].tolist() == [0, 0] and m["flipped"].tolist() == [True, False]


def test_faces_are_reported_where_exactly_ninety_percent_of_the_reference_pass():
    """faces_against reports the share once >= 90% of the reference images pass, 90% included."""
    assert metrics.faces_against(pandas(2, size=48, seed=3), 0.9) == (1.0, 0.9)


def test_seams_average_both_directions():
    """A ramp that jumps by 3 at every 4 px border across, and steps evenly down: (3 + 1) / 2 over the inside's 1."""
    ramp = torch.tensor([0.0, 1, 2, 3, 6, 7, 8, 9, 12, 13, 14, 15])
    image = (ramp[None, :] + torch.arange(12.0)[:, None]).expand(2, 3, 12, 12)
    assert metrics.seams(image, 4) == pytest.approx(2.0)


def test_reference_paths_spread_over_the_training_files():
    """Without held-out files the reference is n training files spread over the sorted list, not its first n."""
    assert metrics.reference_paths([], ["d/c", "d/a", "d/d", "d/b"], 2) == ["d/a", "d/c"]


def test_cli_n_fake_limits_the_samples(tmp_path, capsys):
    """python metrics.py REAL FAKE --n-fake 3 scores 3 samples, and says so beside the reference's count."""
    real, fake = make_pandas(tmp_path / "r", 6, size=16), make_pandas(tmp_path / "f", 6, size=16, seed=1)
    metrics.main([real, fake, "--size", "16", "--n", "6", "--n-fake", "3"])
    assert "(3 images vs 6 reference)" in capsys.readouterr().out

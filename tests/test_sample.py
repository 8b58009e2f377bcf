"""sample.py from real (tiny) checkpoints: files written, determinism, labels, guidance, and clear errors."""
import dataclasses
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import diffusion
import sample
from conftest import ROOT, make_pandas, run_train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs on a two-label folder: 'plain' (no label dropout), then 'guided' (label dropout 0.2)."""
    root = tmp_path_factory.mktemp("sample")
    make_pandas(root / "pandas" / "giant", 3, seed=0)
    make_pandas(root / "pandas" / "red", 3, seed=1)
    work = root / "work"
    quick = ("--max-steps", 4, "--sample-every", 0, "--no-log-graph")
    run_train(work, root / "pandas", "--run", "plain", *quick)
    run_train(work, root / "pandas", "--run", "guided", "--label-dropout", 0.2, *quick)
    return work


@pytest.fixture
def plain(runs):
    return str(runs / "checkpoints/plain/latest.pt")


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def run_sample(*argv):
    sample.main([str(a) for a in argv])


def error_of(*argv):
    """The message sample.py exits with; it must be an error exit."""
    with pytest.raises(SystemExit) as e:
        run_sample(*argv)
    assert e.value.code not in (0, None)
    return str(e.value.code)


def test_writes_grid_and_one_png_per_image(plain, tmp_path, capsys):
    """--n 5 gives grid.png plus 0000..0004.png at the model's resolution, and says where they went."""
    run_sample("--ckpt", plain, "--n", 5, "--steps", 5, "--out", tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["0000.png", "0001.png", "0002.png", "0003.png", "0004.png", "grid.png"]
    assert Image.open(tmp_path / "0003.png").size == (16, 16)
    assert Image.open(tmp_path / "grid.png").size == (3 * 130 + 2, 2 * 130 + 2)  # 3 columns, 2 rows of 128 px, 2 px padding
    assert str(tmp_path / "grid.png") in capsys.readouterr().out


def test_sampling_again_into_a_folder_leaves_none_of_the_earlier_images(plain, tmp_path, capsys):
    """metrics.py scores every image of a folder: a second, smaller sampling into the same folder must not leave the
    first one's extra images (or its trajectory) beside its own; other files stay."""
    run_sample("--ckpt", plain, "--n", 5, "--steps", 2, "--out", tmp_path, "--trajectory")
    (tmp_path / "notes.txt").write_text("mine")
    run_sample("--ckpt", plain, "--n", 2, "--steps", 2, "--out", tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["0000.png", "0001.png", "grid.png", "notes.txt"]
    assert "removed 4 file(s) an earlier sampling left" in capsys.readouterr().out
    mine = tmp_path / "mine"  # a folder of the user's own, no grid.png: nothing in it is removed
    mine.mkdir()
    (mine / "2023.png").write_bytes(b"a photo")
    run_sample("--ckpt", plain, "--n", 2, "--steps", 2, "--out", mine)
    assert sorted(os.listdir(mine)) == ["0000.png", "0001.png", "2023.png", "grid.png"]


def test_grids_enlarge_small_images_nearest_neighbour():
    """A 16 px image becomes 128 px of 8x8 blocks of its own pixels; one of 128 px or more stays as it is."""
    small = torch.rand(2, 3, 16, 16)
    big = sample.enlarge(small)
    assert big.shape == (2, 3, 128, 128)
    assert torch.equal(big[:, :, ::8, ::8], small) and torch.equal(big, small.repeat_interleave(8, 2).repeat_interleave(8, 3))
    assert sample.enlarge(torch.rand(1, 3, 48, 48)).shape[-1] == 144  # a whole factor: 3x
    assert sample.enlarge(torch.rand(1, 3, 128, 128)).shape[-1] == 128


def test_default_output_is_samples_run_step(plain, tmp_path, monkeypatch):
    """Without --out, images go to samples/<run>/<step>/ under the current folder."""
    monkeypatch.chdir(tmp_path)
    run_sample("--ckpt", plain, "--n", 2, "--steps", 3)
    assert sorted(os.listdir(tmp_path / "samples/plain/4")) == ["0000.png", "0001.png", "grid.png"]


def test_no_arguments_uses_newest_run(runs, monkeypatch):
    """Plain `python sample.py` picks the newest run's latest checkpoint from ./checkpoints."""
    monkeypatch.chdir(runs)
    os.utime(runs / "checkpoints/plain/latest.pt", (1, 1))  # 'guided' is clearly the newer run
    run_sample("--n", 1, "--steps", 2)
    assert os.path.exists(runs / "samples/guided/4/grid.png")


def test_no_arguments_falls_back_past_an_unreadable_checkpoint(runs, tmp_path, monkeypatch, capsys):
    """A truncated newest checkpoint is named in a warning and its copy, latest.pt, is sampled; with that
    truncated too, the run's previous one, as train.py would."""
    run_train(tmp_path, runs.parent / "pandas", "--run", "two", "--max-steps", 4, "--ckpt-every", 2,
              "--sample-every", 0, "--no-log-graph")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    broken = []
    for name, sampled in (("step_0000004.pt", "step 4,"), ("latest.pt", "step 2,")):
        with open(f"checkpoints/two/{name}", "r+b") as f:
            f.truncate(1000)
        broken.append(name)
        with pytest.warns(UserWarning) as record:
            run_sample("--n", 1, "--steps", 2, "--out", "out")
        assert [str(w.message).split("/")[-1].split("'")[0] for w in record] == broken  # each named once
        assert sampled in capsys.readouterr().out
    with open("checkpoints/two/step_0000002.pt", "r+b") as f:
        f.truncate(1000)
    with pytest.warns(UserWarning), pytest.raises(SystemExit) as e:
        run_sample("--n", 1, "--steps", 2, "--out", "out")
    assert str(e.value).startswith("error: no readable checkpoint in ") and str(e.value).endswith(
        "(step_0000004.pt, latest.pt, step_0000002.pt: see the warnings above); pass --ckpt with a readable checkpoint file")


def test_a_warning_is_one_line_on_the_command_line(runs, tmp_path):
    """Run as a command, a skipped checkpoint is one `warning:` line, not Python's file:line, category and source line."""
    run_train(tmp_path, runs.parent / "pandas", "--run", "w", "--max-steps", 2, "--ckpt-every", 1,
              "--sample-every", 0, "--no-log-graph")
    with open(tmp_path / "checkpoints/w/step_0000002.pt", "r+b") as f:
        f.truncate(1000)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--n", "1", "--steps", "2", "--out", "out",
                           "--device", "cpu"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    named = [line for line in proc.stderr.splitlines() if "step_0000002.pt" in line]
    assert len(named) == 1 and named[0].startswith(
        "warning: skipping unusable checkpoint: 'checkpoints/w/step_0000002.pt' is truncated or not a checkpoint")
    assert "UserWarning" not in proc.stderr and "warnings.warn" not in proc.stderr


def test_unwritable_output_folder_is_a_clear_error(plain, tmp_path):
    """An --out that cannot be created stops before sampling, naming it and the fix."""
    open(tmp_path / "blocker", "w").close()
    out = tmp_path / "blocker" / "out"
    assert error_of("--ckpt", plain, "--n", 1, "--steps", 2, "--out", out) == (
        f"error: cannot write to '{out}' (Not a directory); pass another --out")


def test_same_seed_same_images_other_seed_other_images(plain, tmp_path):
    """--seed fixes the images exactly; another seed gives other images; the batch size does not matter."""
    for name, seed, batch in (("a", 3, 64), ("b", 3, 2), ("c", 4, 64)):
        run_sample("--ckpt", plain, "--n", 3, "--steps", 5, "--seed", seed, "--batch-size", batch, "--out", tmp_path / name)
    for i in range(3):
        a, b, c = (pixels(tmp_path / name / f"{i:04d}.png") for name in "abc")
        assert np.abs(a - b).max() <= 1  # batched differently: same images up to rounding
        assert np.abs(a - c).mean() > 5
    run_sample("--ckpt", plain, "--n", 3, "--steps", 5, "--seed", 3, "--out", tmp_path / "a2")
    assert np.array_equal(pixels(tmp_path / "a/grid.png"), pixels(tmp_path / "a2/grid.png"))


def test_trajectory_strip(plain, tmp_path):
    """--trajectory writes a two-row strip (x_t, predicted x0) of 16 frames, or fewer with fewer steps."""
    run_sample("--ckpt", plain, "--n", 2, "--steps", 20, "--trajectory", "--out", tmp_path / "t20")
    assert Image.open(tmp_path / "t20/trajectory.png").size == (16 * 130 + 2, 2 * 130 + 2)
    run_sample("--ckpt", plain, "--n", 1, "--steps", 5, "--trajectory", "--out", tmp_path / "t5")
    assert Image.open(tmp_path / "t5/trajectory.png").size == (5 * 130 + 2, 2 * 130 + 2)
    run_sample("--ckpt", plain, "--n", 1, "--steps", 5, "--out", tmp_path / "none")
    assert not os.path.exists(tmp_path / "none/trajectory.png")


@pytest.fixture
def labels_seen(monkeypatch):
    """Records the label tensor each Diffusion.sample call receives."""
    seen, real = [], diffusion.Diffusion.sample

    def spy(self, model, noise, y, *args, **kwargs):
        seen.append(y.tolist())
        return real(self, model, noise, y, *args, **kwargs)
    monkeypatch.setattr(diffusion.Diffusion, "sample", spy)
    return seen


@pytest.mark.parametrize("label,expected", [("red", [1] * 4), ("1", [1] * 4), ("giant", [0] * 4), ("", [0, 1, 0, 1])])
def test_label_by_name_or_index(plain, tmp_path, labels_seen, label, expected):
    """--label takes a training sub-folder name or an index; without it the labels take turns."""
    run_sample("--ckpt", plain, "--n", 4, "--steps", 2, "--label", label, "--out", tmp_path)
    assert labels_seen == [expected]


def test_unknown_label_is_a_clear_error(plain, tmp_path):
    """An unknown label name or index exits, listing the labels the checkpoint knows."""
    for bad in ("panda", "2", "-1"):
        message = error_of("--ckpt", plain, "--label", bad, "--out", tmp_path)
        assert f"unknown label '{bad}'" in message and "giant" in message and "red" in message


def test_guidance_needs_label_dropout(runs, plain, tmp_path):
    """--cfg != 1 is refused for a model trained without label dropout, and works for one trained with it."""
    message = error_of("--ckpt", plain, "--cfg", 3, "--out", tmp_path)
    assert "--label-dropout" in message and "--cfg" in message
    guided = str(runs / "checkpoints/guided/latest.pt")
    for scale in (1, 3):
        run_sample("--ckpt", guided, "--cfg", scale, "--n", 2, "--steps", 3, "--label", "red", "--out", tmp_path / f"s{scale}")
    assert (tmp_path / "s3/grid.png").exists()
    _, model = sample.load_model(checkpoint.load_checkpoint(guided), True, torch.device("cpu"))
    assert model.null_label == 2 and model.y_embedder.table.num_embeddings == 3  # 2 labels + the null row, saved
    # (four steps leave this model nearly label-blind: what --cfg does to the images is checked below with a stub)


class PictureModel:
    """A stand-in network that knows one fixed picture per label (TABLE[y]) and predicts it exactly from any
    x_t: the picture itself as an x0 model, or the v it implies as a v model."""
    null_label = 2
    TABLE = torch.cat([torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.8 - 0.4,
                       torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 0.4 - 0.2])

    def __init__(self, prediction):
        self.prediction, self.abar = prediction, diffusion.Diffusion(1000).alphas_cumprod_64

    def __call__(self, x, t, y):
        x0 = self.TABLE[y].double()
        if self.prediction == "x0":
            return x0.float()
        a = self.abar[t].view(-1, 1, 1, 1)
        eps = (x.double() - a.sqrt() * x0) / (1 - a).sqrt()
        return (a.sqrt() * eps - (1 - a).sqrt() * x0).float()


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_guidance_extrapolates_the_models_output_for_v_and_x0_models(plain, tmp_path, monkeypatch, prediction):
    """Through sample.py, --cfg s samples from uncond + s (cond - uncond) of the model's own output (v or x0):
    with a model that draws a fixed picture per label, each PNG is that extrapolated picture, mapped from
    [-1, 1] to 0..255 at the model's resolution; --cfg 1 draws the conditional picture alone."""
    real = sample.load_model
    monkeypatch.setattr(sample, "load_model", lambda *a: (dataclasses.replace(real(*a)[0], prediction=prediction),
                                                          PictureModel(prediction)))
    cond, uncond = PictureModel.TABLE[1], PictureModel.TABLE[2]
    for scale, picture in ((1, cond), (2, uncond + 2 * (cond - uncond))):
        run_sample("--ckpt", plain, "--cfg", scale, "--label", "red", "--n", 2, "--steps", 5, "--out", tmp_path / str(scale))
        expected = ((picture + 1) / 2 * 255 + 0.5).floor().permute(1, 2, 0).numpy()
        for i in range(2):
            assert Image.open(tmp_path / f"{scale}/{i:04d}.png").size == (16, 16)
            assert np.abs(pixels(tmp_path / f"{scale}/{i:04d}.png") - expected).max() <= 1, (scale, i)


def test_steps_default_and_bounds(plain, tmp_path, capsys):
    """--steps 0 means the sampler's default (max_t for ddpm); > max_t or negative is a clear error, so is
    an --eta outside [0, 1]."""
    run_sample("--ckpt", plain, "--sampler", "ddpm", "--n", 1, "--out", tmp_path)
    assert "ddpm-1000" in capsys.readouterr().out  # the tiny preset's max_t
    for bad in (1001, -2):
        message = error_of("--ckpt", plain, "--steps", bad, "--out", tmp_path)
        assert "--steps" in message and "max_t=1000" in message and str(bad) in message
    for bad in (-0.5, 1.5):  # above 1 more noise than the posterior has: no longer a DDIM step
        assert error_of("--ckpt", plain, "--eta", bad, "--out", tmp_path) == \
            f"error: --eta must be between 0 (deterministic) and 1 (ancestral), got {bad:g}"


def test_spacing_defaults_to_the_checkpoints_and_a_flag_overrides_it(plain, tmp_path, capsys, monkeypatch):
    """sample.py spaces its steps as the run did (--sample-spacing, 1 for the tiny run) unless --spacing says
    otherwise; the images then differ, and the line says so. Below 1 is a clear error."""
    used = []
    real = sample.generate
    monkeypatch.setattr(sample, "generate", lambda model, diffusion, *a, **k: used.append(diffusion.spacing) or real(model, diffusion, *a, **k))
    run_sample("--ckpt", plain, "--n", 2, "--steps", 5, "--out", tmp_path / "even")
    assert "ddim-5, EMA" in capsys.readouterr().out
    run_sample("--ckpt", plain, "--n", 2, "--steps", 5, "--spacing", 3, "--out", tmp_path / "crowded")
    assert "ddim-5, spacing 3," in capsys.readouterr().out and used == [1.0, 3.0]
    assert (pixels(tmp_path / "even/0000.png") != pixels(tmp_path / "crowded/0000.png")).any()
    assert error_of("--ckpt", plain, "--spacing", 0.5, "--out", tmp_path) == \
        "error: --spacing must be >= 1 (1 = evenly spaced steps), got 0.5"


def test_dpm2m_samples_a_diffusion_checkpoint_and_refuses_eta(plain, tmp_path, capsys):
    """--sampler dpm2m draws other images than ddim from the same noise and names itself; it is deterministic,
    so --eta is refused."""
    for name in ("ddim", "dpm2m"):
        run_sample("--ckpt", plain, "--n", 2, "--steps", 5, "--spacing", 3, "--sampler", name, "--out", tmp_path / name)
        assert f"{name}-5, spacing 3," in capsys.readouterr().out
    assert (pixels(tmp_path / "ddim/0000.png") != pixels(tmp_path / "dpm2m/0000.png")).any()
    assert error_of("--ckpt", plain, "--sampler", "dpm2m", "--eta", 0.5, "--out", tmp_path) == \
        "error: --eta is for ddim; dpm2m is deterministic, drop --eta"


def test_network_runs_in_bf16_where_training_would_and_no_amp_is_fp32(plain, tmp_path, capsys, monkeypatch):
    """On a CPU with fast bf16 the network samples under bf16 autocast (other images, close to fp32's); --no-amp,
    or a CPU without fast bf16, gives the fp32 images exactly. The line names the precision."""
    import distributed
    for name, speedup, flags in (("bf16", 4.0, ()), ("fp32", 4.0, ("--no-amp",)), ("slow", 0.5, ())):
        monkeypatch.setattr(distributed, "cpu_bf16", lambda: (speedup > 2, f"a pretend CPU, {speedup}x"))
        run_sample("--ckpt", plain, "--n", 4, "--steps", 5, "--out", tmp_path / name, *flags)
        assert ("bf16)" if name == "bf16" else "fp32)") in capsys.readouterr().out
    for i in range(4):
        bf16, fp32, slow = (pixels(tmp_path / name / f"{i:04d}.png") for name in ("bf16", "fp32", "slow"))
        assert np.array_equal(fp32, slow)
        assert 0 < np.abs(bf16 - fp32).mean() < 8


def test_bad_checkpoints_are_clear_errors(plain, tmp_path):
    """Missing, random-bytes, truncated, foreign and unsafe files each exit with a message naming the file."""
    missing = tmp_path / "missing.pt"
    random_bytes = tmp_path / "noise.pt"
    random_bytes.write_bytes(os.urandom(4096))
    truncated = tmp_path / "truncated.pt"
    data = open(plain, "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"model": {}, "config": {}, "payload": shutil.Error("not plain data")}, unsafe)
    for path in (missing, random_bytes, truncated, foreign, unsafe):
        message = error_of("--ckpt", path, "--out", tmp_path / "out")
        assert str(path) in message, message
        assert "Traceback" not in message
    assert "does not exist" in error_of("--ckpt", missing)
    assert error_of("--ckpt", tmp_path) == f"error: checkpoint '{tmp_path}' is a folder; pass --ckpt {tmp_path}/latest.pt or another .pt file in it"
    other_act = tmp_path / "silu.pt"  # a config value this code does not know is refused, not replaced by a default
    state = torch.load(plain, weights_only=True)
    torch.save({**state, "config": {**state["config"], "mlp_act": "silu"}}, other_act)
    assert error_of("--ckpt", other_act) == (f"error: '{other_act}' does not match this project's model "
                                             "(mlp_act must be one of gelu, relu, got silu); pass a checkpoint written by train.py")
    assert "refused" in error_of("--ckpt", unsafe)


def test_checkpoint_of_another_model_is_a_clear_error(plain, tmp_path, monkeypatch):
    """Weights that do not fit the saved config exit with a sentence naming the file, even when found by default."""
    state = torch.load(plain, weights_only=True)
    state["config"]["emb_dim"] = 48
    wrong = tmp_path / "checkpoints/odd/latest.pt"
    wrong.parent.mkdir(parents=True)
    torch.save(state, wrong)
    message = error_of("--ckpt", wrong, "--out", tmp_path / "out")
    assert str(wrong) in message and "does not match" in message
    monkeypatch.chdir(tmp_path)
    assert os.path.join("checkpoints", "odd", "latest.pt") in error_of("--out", tmp_path / "out")


def test_loading_maps_to_cpu_and_refuses_code(plain, tmp_path, monkeypatch):
    """Checkpoints are read with map_location (a CUDA checkpoint loads on CPU) and weights_only=True."""
    calls, real = [], torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(torch, "load", spy)
    run_sample("--ckpt", plain, "--n", 1, "--steps", 1, "--out", tmp_path)
    checkpoint.load_checkpoint(plain)
    assert len(calls) == 2
    for kwargs in calls:
        assert kwargs.get("weights_only") is True
        assert kwargs.get("map_location") in ("cpu", torch.device("cpu"))


def test_bad_device_is_a_clear_error(plain, tmp_path, monkeypatch):
    """An unknown --device, or cuda on a machine without CUDA, exits with one sentence, not a traceback."""
    assert "unknown --device 'gpu'" in error_of("--ckpt", plain, "--device", "gpu", "--out", tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "CUDA is not available" in error_of("--ckpt", plain, "--device", "cuda", "--out", tmp_path)
    run_sample("--ckpt", plain, "--device", "auto", "--n", 1, "--steps", 1, "--out", tmp_path)  # auto falls back to cpu
    assert os.path.exists(tmp_path / "grid.png")


def test_trajectory_rows_are_x_t_then_x0(plain, tmp_path, monkeypatch):
    """--trajectory's frames hold (x_t, the predicted x_0): the noisy image first, the clipped prediction second."""
    seen = []
    monkeypatch.setattr(sample, "trajectory_strip", lambda frames: seen.extend(frames) or torch.zeros(3, 8, 8))
    run_sample("--ckpt", plain, "--n", 1, "--steps", 5, "--trajectory", "--out", tmp_path)
    assert seen[0][0].abs().max() > 1.5 and seen[0][1].abs().max() <= 1


def test_clip_is_on_unless_no_clip():
    """The sampler clips each predicted x_0 to [-1, 1] by default; --no-clip turns that off."""
    assert sample.parse_args([]).clip is True and sample.parse_args(["--no-clip"]).clip is False


def test_spacing_defaults_to_the_checkpoints_own(plain, tmp_path, monkeypatch, capsys):
    """Without --spacing, sample.py spaces its steps as the checkpoint's --sample-spacing says."""
    real, gen, used = sample.load_model, sample.generate, []
    monkeypatch.setattr(sample, "load_model", lambda *a: (dataclasses.replace(real(*a)[0], sample_spacing=3.0), real(*a)[1]))
    monkeypatch.setattr(sample, "generate", lambda m, d, *a, **k: used.append(d.spacing) or gen(m, d, *a, **k))
    run_sample("--ckpt", plain, "--n", 1, "--steps", 3, "--out", tmp_path)
    assert used == [3.0] and "spacing 3," in capsys.readouterr().out


def test_batch_size_reaches_the_sampler():
    """--batch-size bounds how many images are denoised at once, whatever --n is."""
    class Recorder:
        def sample_batches(self, model, noise, labels, batch_size, *args, **kwargs):
            self.batch_size = batch_size
            return noise

    d = Recorder()
    args = types.SimpleNamespace(seed=0, n=5, batch_size=2, sampler="ddim", eta=0.0, cfg=1.0, clip=True)
    sample.generate(None, d, types.SimpleNamespace(in_channels=3, image_size=8), args, 10, torch.zeros(5, dtype=torch.long), "cpu")
    assert d.batch_size == 2

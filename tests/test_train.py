"""The trainer end to end on a tiny run: files, TensorBoard tags, resume, errors, flags; and a tiny model overfits."""
import dataclasses
import glob
import json
import os
import random
import re
import time
import types

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import config
import train
from conftest import make_pandas, run_train
from dataset import draw_panda
from diffusion import Diffusion
from dit import DiT

FIRST, SECOND = 20, 30  # steps of the first run, then the --max-steps of the resumed one
FLAGS = ("--ckpt-every", 10, "--sample-every", 10, "--hist-every", 10, "--log-every", 5)


def events(path):
    """EventAccumulator over one event file or a whole log folder, everything loaded."""
    acc = EventAccumulator(path, size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """A tiny run of FIRST steps, then the same command with --max-steps SECOND (resume)."""
    root = tmp_path_factory.mktemp("train")
    data = make_pandas(root / "pandas", 4)
    work = root / "work"
    run_train(work, data, "--max-steps", FIRST, *FLAGS)
    ckpt_dir = os.path.join(work, "checkpoints", "tiny")
    first = dict(files=sorted(os.listdir(ckpt_dir)), events=sorted(glob.glob(str(work / "dit_training/tiny/events.*"))),
                 state=torch.load(os.path.join(ckpt_dir, "latest.pt"), weights_only=True))
    # Event files are named by their second, then a counter of the process's writers (".10" sorts before ".9"), and
    # TensorBoard reads a folder in name order: a later second keeps that the runs' order, as between real runs.
    time.sleep(1.05)
    run_train(work, data, "--max-steps", SECOND, *FLAGS)
    return work, first


def test_run_writes_checkpoints_and_config(resumed_run):
    """A run leaves latest.pt, periodic step files and config.json in checkpoints/<run>/."""
    work, first = resumed_run
    assert {"latest.pt", "step_0000010.pt", "step_0000020.pt", "config.json"} <= set(first["files"])
    saved = json.load(open(work / "checkpoints/tiny/config.json"))
    assert saved["preset"] == "tiny" and saved["run"] == "tiny" and saved["image_size"] == 16
    assert set(saved) == {f.name for f in dataclasses.fields(config.Config)}


def test_checkpoint_is_plain_and_safe_to_load(resumed_run):
    """The checkpoint loads with weights_only=True and holds model, EMA, optimizer, step and a plain config dict."""
    state = resumed_run[1]["state"]
    assert state["step"] == FIRST
    assert isinstance(state["config"], dict) and state["config"]["max_steps"] == FIRST
    assert all(isinstance(v, (int, float, str, bool)) for v in state["config"].values())
    assert state["ema"] is not None and state["optimizer"]["state"]
    model = DiT.from_config(config.config_from_dict(state["config"]))
    model.load_state_dict(state["model"])  # no DDP/compile prefixes
    model.load_state_dict(state["ema"])


def test_tensorboard_has_every_tag(resumed_run):
    """The first run's events hold losses, histograms, samples, the graph, lr, grad norm and throughput."""
    acc = events(resumed_run[1]["events"][0])
    tags = acc.Tags()
    for tag in ("Loss/batch", "Loss/epoch", "Train/lr", "Train/grad_norm", "Train/images_per_s"):
        assert tag in tags["scalars"], tag
    assert {"Noise/predicted", "Noise/target"} <= set(tags["histograms"])
    assert "Samples" in tags["images"]
    assert tags["graph"]
    assert [e.step for e in acc.Scalars("Loss/batch")] == list(range(5, FIRST + 1, 5))
    assert len(acc.Scalars("Loss/epoch")) >= 5  # 4 images, batch 8: one step per epoch
    assert all(np.isfinite(e.value) for e in acc.Scalars("Loss/batch"))


def test_tensorboard_sample_grid_shows_each_image_at_128_px(resumed_run):
    """The tiny preset's 16 px samples are enlarged nearest-neighbour in the grid: 4 images, 2 x 2 of 128 px."""
    image = events(resumed_run[1]["events"][0]).Images("Samples")[0]
    assert (image.width, image.height) == (2 * 130 + 2, 2 * 130 + 2)


def test_resume_continues_steps(resumed_run):
    """The second run starts at the saved step: new checkpoints and TensorBoard steps continue, not restart at 0."""
    work, first = resumed_run
    files = os.listdir(work / "checkpoints/tiny")
    assert "step_0000030.pt" in files
    assert torch.load(work / "checkpoints/tiny/latest.pt", weights_only=True)["step"] == SECOND
    later = sorted(set(glob.glob(str(work / "dit_training/tiny/events.*"))) - set(first["events"]))
    assert len(later) == 1
    steps = [e.step for e in events(later[0]).Scalars("Loss/batch")]
    assert steps == list(range(FIRST + 5, SECOND + 1, 5))
    merged = [e.step for e in events(str(work / "dit_training/tiny")).Scalars("Loss/batch")]
    assert merged == list(range(5, SECOND + 1, 5))


def test_print_config_shows_what_would_run_and_writes_nothing(resumed_run, tmp_path, capsys):
    """--print-config prints the settings the command would train with: a resume's checkpoint values under the
    flags, with --fresh the preset's; it makes, moves or fills no folder."""
    work, _ = resumed_run
    before = {d: sorted(os.listdir(work / d)) for d in ("checkpoints", "checkpoints/tiny", "dit_training")}
    capsys.readouterr()

    def shown(workdir, *flags):
        run_train(workdir, tmp_path / "no_data", "--print-config", *flags)
        out = capsys.readouterr().out
        return json.loads(out[out.index("{"):])  # after the "resuming ..." line, if any

    resumed = shown(work, "--lr", "0.5")
    assert (resumed["max_steps"], resumed["ckpt_every"], resumed["lr"]) == (SECOND, 10, 0.5)  # checkpoint, then flag
    fresh = shown(work, "--fresh")
    assert (fresh["max_steps"], fresh["ckpt_every"]) == (50, 25)  # the tiny preset's
    assert before == {d: sorted(os.listdir(work / d)) for d in before}
    assert shown(tmp_path / "new")["preset"] == "tiny"
    assert os.listdir(tmp_path / "new") == [] and not (tmp_path / "no_data").exists()


def test_tensorboard_drops_what_a_crash_logged_after_the_checkpoint(tmp_path):
    """A run that crashed at step 30 after its last checkpoint at 0 (none yet) restarts at 0: the plot shows
    the new steps 1..10 once, not the crashed run's 1..30 folded under them."""
    cfg = config.build_config({"preset": "tiny", "log_dir": str(tmp_path), "run": "r"})
    for last in (30, 10):  # the crashed run, then the restart from step 0
        if last == 10:
            time.sleep(1.05)  # the restart's file in a later second: names sort in the runs' order (resumed_run)
        log = train.Logger(cfg, 0, enabled=True)
        for step in range(1, last + 1):
            log.scalars(step, x=step)
        log.close()
    assert [e.step for e in events(str(tmp_path / "r")).Scalars("x")] == list(range(1, 11))


def test_missing_data_dir_is_a_clear_error(tmp_path):
    """An explicit --data-dir that does not exist exits non-zero with a message naming the folder."""
    missing = tmp_path / "no_such_pandas"
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path / "work", missing, "--max-steps", 1)
    assert e.value.code not in (0, None)
    assert str(missing) in str(e.value.code) and "does not exist" in str(e.value.code)
    assert not missing.exists()  # nothing is generated for an explicit folder
    # nor left behind: the run folders made for the write check are removed again, so the run's name is free
    assert sorted(os.listdir(tmp_path / "work")) == []


def test_num_labels_that_disagree_with_the_label_folders_are_refused(tmp_path, capsys):
    """--num-labels 3 on two label folders is one error line, not silently replaced by 2; the matching value trains."""
    make_pandas(tmp_path / "pandas" / "giant", 2, seed=0)
    make_pandas(tmp_path / "pandas" / "red", 2, seed=1)
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path / "work", tmp_path / "pandas", "--max-steps", 1, "--num-labels", 3)
    assert str(e.value.code).startswith("error: --num-labels 3") and "2 label(s)" in str(e.value.code)
    run_train(tmp_path / "work", tmp_path / "pandas", "--max-steps", 1, "--num-labels", 2, "--sample-every", 0, "--no-log-graph")
    assert torch.load(tmp_path / "work/checkpoints/tiny/latest.pt", weights_only=True)["config"]["num_labels"] == 2


def test_failed_start_keeps_folders_it_did_not_make(tmp_path):
    """A failed start removes only the empty folders it created itself: an existing run folder stays."""
    (tmp_path / "work" / "checkpoints" / "tiny").mkdir(parents=True)
    with pytest.raises(SystemExit):
        run_train(tmp_path / "work", tmp_path / "no_such_pandas", "--max-steps", 1)
    assert sorted(os.listdir(tmp_path / "work")) == ["checkpoints"]
    assert os.listdir(tmp_path / "work" / "checkpoints") == ["tiny"]


def test_max_minutes_counts_minutes(tmp_path, monkeypatch):
    """--max-minutes 1 stops and saves at the first step past sixty seconds of the clock (here 20 s a step)."""
    clock, real_account = [0.0], train.account

    def account(run, progress, out):
        real_account(run, progress, out)
        clock[0] += 20.0

    monkeypatch.setattr(train, "account", account)
    monkeypatch.setattr(train, "time", types.SimpleNamespace(time=lambda: clock[0], strftime=time.strftime))
    ckpts = run_train(tmp_path, make_pandas(tmp_path / "pandas", 4), "--max-minutes", 1, "--no-log-graph")
    assert torch.load(os.path.join(ckpts, "tiny", "latest.pt"), weights_only=True)["step"] == 4  # 80 s > 60 s


def test_auto_preset_picks_panda48_on_cpu(tmp_path, image_dir, monkeypatch, capsys):
    """--preset auto resolves to panda48 (v-prediction, the hybrid L1/MSE loss) without CUDA for a --data-dir,
    to cartoon48 (x0-prediction, 6 px patches) for the procedural pandas, to panda256 with CUDA, and says so."""
    assert config.build_config({"data_dir": "photos"}, cuda_available=False).preset == "panda48"
    cartoon = config.build_config({}, cuda_available=False)
    assert (cartoon.preset, cartoon.patch_size, cartoon.emb_dim, cartoon.num_heads, cartoon.prediction, cartoon.hybrid_t,
            cartoon.sampler) == ("cartoon48", 6, 192, 6, "x0", 400, "dpm2m")
    assert config.build_config({"preset": "auto"}, cuda_available=True).preset == "panda256"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run_train(tmp_path / "work", image_dir, "--preset", "auto", "--max-steps", 0, "--num-workers", 0, "--no-log-graph")
    assert "preset panda48" in capsys.readouterr().out
    saved = json.load(open(tmp_path / "work/checkpoints/panda48/config.json"))
    assert (saved["preset"], saved["image_size"], saved["patch_size"], saved["prediction"], saved["loss"], saved["hybrid_t"],
            saved["sampler"]) == ("panda48", 48, 3, "v", "hybrid", 700, "dpm2m")
    flow = config.build_config({"preset": "panda48", "objective": "flow"})  # the preset's diffusion sampler gives way
    assert config.resolve_sampler(flow) == "heun"
    seed = config.build_config({"preset": "seed"})
    assert seed.prediction == "eps" and seed.loss == "l1"  # the description's model stays as described


def test_every_config_field_is_a_flag(capsys):
    """Each Config field has a documented --flag, `--help` exits 0, and flags reach the config."""
    with pytest.raises(SystemExit) as e:
        config.parse_train_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(config.Config):
        assert "--" + f.name.replace("_", "-") in text, f.name
    overrides, actions = config.parse_train_args(["--image-size", "32", "--no-hflip", "--lr", "0.5", "--loss", "mse", "--fresh"])
    assert overrides == {"image_size": 32, "hflip": False, "lr": 0.5, "loss": "mse"} and actions.fresh
    assert not actions.print_config
    cfg = config.build_config({**overrides, "preset": "tiny"})
    assert (cfg.image_size, cfg.hflip, cfg.lr, cfg.loss, cfg.depth) == (32, False, 0.5, "mse", 2)


# ---------------------------------------------------------------------------------------------
# overfitting: the model, loss and sampler together can learn


def four_pandas():
    images = [np.asarray(draw_panda(random.Random(i), 16)) for i in range(4)]
    return torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (4, 3, 16, 16) in [-1, 1]


def nearest(samples, images):
    """(MSE to the nearest training image, its index) for each sample."""
    d = ((samples[:, None] - images[None]) ** 2).mean(dim=(2, 3, 4))  # (S, 4)
    return d.min(dim=1)


def test_tiny_model_overfits_four_images():
    """On 4 fixed images the loss drops several-fold, and DDIM then draws and reconstructs those images."""
    torch.manual_seed(0)
    images, steps = four_pandas(), 300
    model = DiT(image_size=16, patch_size=4, emb_dim=64, depth=2, num_heads=4, head_dim=16)
    diffusion = Diffusion(1000, loss="mse")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1, (i + 1) / 30) * (1 - i / steps))  # warm-up, decay
    y = torch.zeros(32, dtype=torch.long)

    def held_out_loss():  # same (t, noise) draws before and after
        with torch.no_grad():
            return diffusion.training_loss(model, images.repeat(16, 1, 1, 1), y.repeat(2), torch.Generator().manual_seed(1))[0]

    before, g = held_out_loss(), torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = diffusion.training_loss(model, images.repeat(8, 1, 1, 1), y, g)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    model.eval()
    assert held_out_loss() < before / 5

    noise = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    # From pure noise, DDIM draws pictures far nearer the training set than noise is (~0.27 vs 0.74 MSE).
    # Not yet copies: 300 steps teach little about the highest noise levels, where an image is chosen.
    samples = diffusion.sample(model, noise, y[:8], "ddim", 20)
    assert nearest(samples, images).values.mean() < 0.6 * nearest(noise.clamp(-1, 1), images).values.mean()

    # Noised to t = 300 (signal still identifiable) and denoised by DDIM, each image comes back as itself.
    x = diffusion.q_sample(images, torch.full((4,), 300), torch.randn(images.shape, generator=torch.Generator().manual_seed(3)))
    ts = list(range(300, -1, -20)) + [-1]
    with torch.no_grad():
        for t, t_prev in zip(ts[:-1], ts[1:]):
            t, t_prev = torch.full((4,), t), torch.full((4,), t_prev)
            x, _ = diffusion.ddim_step(model(x, t, y[:4]), x, t, t_prev)
    dist, which = nearest(x, images)
    between = ((images[:, None] - images[None]) ** 2).mean(dim=(2, 3, 4))
    assert which.tolist() == [0, 1, 2, 3]
    assert dist.max() < 0.6 * between[between > 0].min()


@pytest.mark.parametrize("field, value", [("log_every", 0), ("ckpt_every", 0), ("patch_size", 0), ("sample_n", 0),
                                          ("num_generated", 0), ("max_bad_steps", 0), ("warmup_steps", -5),
                                          ("ema_gamma", -1.0), ("hybrid_t", 1001), ("loss", "huber"), ("prediction", "score"),
                                          ("noise_schedule", "quadratic"), ("optimizer", "sgd"), ("lr_schedule", "step"),
                                          ("mlp_act", "silu"), ("sample_steps", 0), ("lr", 0.0), ("mlp_ratio", 0.0),
                                          ("ema_decay", 1.0), ("in_channels", 1), ("label_dropout", 1.0)])
def test_out_of_range_settings_are_one_clear_error(field, value):
    """A zero interval, a negative warm-up or an unknown choice stops at the start with the field named, not a crash mid-run."""
    with pytest.raises(SystemExit) as e:
        config.build_config({"preset": "tiny", field: value})
    assert str(e.value).startswith("error: ") and field in str(e.value)
    if field in config.CHOICES:  # a bad choice lists the good ones
        assert ", ".join(config.CHOICES[field]) in str(e.value)


def test_epoch_loss_is_the_mean_over_its_batches():
    """Loss/epoch is the epoch's summed batch losses over its batch count; the epoch counters then start again."""
    log = FakeLog()
    p = types.SimpleNamespace(step=6, epoch=0, epoch_pos=8, epoch_loss_sum=3.0, epoch_batches=2)
    train.end_epoch(types.SimpleNamespace(log=log), p)
    assert log.calls == [("scalars", 6, {"Loss/epoch": 1.5})] and (p.epoch, p.epoch_pos, p.epoch_batches) == (1, 0, 0)


def test_meter_counts_images_per_second(monkeypatch):
    """Images/s: the steps since the last reading times the global batch, over the seconds between."""
    now = [100.0]
    monkeypatch.setattr(train.time, "time", lambda: now[0])
    meter = train.Meter(10)
    now[0] = 102.0
    assert meter.rate(14, 8) == pytest.approx(16.0)


class FakeLog:
    """Records what train.py hands its TensorBoard logger."""

    def __init__(self):
        self.calls = []

    def scalars(self, step, **values):
        self.calls.append(("scalars", step, values))

    def histograms(self, step, **values):
        self.calls.append(("histograms", step, values))

    def images(self, tag, grid, step):
        self.calls.append(("images", tag, grid, step))

    def text(self, tag, text, step):
        self.calls.append(("text", tag, text, step))


def test_sample_grid_is_as_square_as_its_count_allows(monkeypatch):
    """8 samples make a 3-wide grid (ceil(sqrt(8))), each enlarged to 128 px with 2 px borders."""
    monkeypatch.setattr(train, "shared_samples", lambda run, noise, y, steps, seed: torch.zeros(8, 3, 16, 16))
    run = types.SimpleNamespace(cfg=config.Config(sample_n=8, image_size=16, in_channels=3), data=types.SimpleNamespace(classes=["a"]))
    assert train.sample_grid(run).shape[-1] == 3 * (128 + 2) + 2


def test_periodic_logs_samples_and_histograms_at_their_step(monkeypatch):
    """At a sample/histogram step the grid goes under Samples and the prediction and target under their own tags,
    at that step."""
    monkeypatch.setattr(train, "sample_grid", lambda run: "grid")
    log, out = FakeLog(), {"pred": torch.ones(2), "target": torch.zeros(2)}
    cfg = types.SimpleNamespace(log_every=1000, hist_every=10, sample_every=10, eval_every=0)
    train.periodic(types.SimpleNamespace(cfg=cfg, log=log), types.SimpleNamespace(step=10), out, None, None)
    assert ("images", "Samples", "grid", 10) in log.calls
    (_, step, values), = [c for c in log.calls if c[0] == "histograms"]
    assert step == 10 and values["Noise/predicted"] is out["pred"] and values["Noise/target"] is out["target"]


def test_the_config_is_logged_as_json_at_step_0():
    """log_start writes the whole config as JSON text, so TensorBoard shows exactly what ran."""
    log, cfg = FakeLog(), config.Config(log_graph=False)
    train.log_start(types.SimpleNamespace(cfg=cfg, log=log))
    (_, _, text, step), = log.calls
    assert json.loads(text.strip("`\n")) == vars(cfg) and step == 0


def test_fresh_moves_a_run_aside_under_a_stamp_to_the_second(tmp_path):
    """--fresh renames the old folder to <name>-old-YYYYmmdd-HHMMSS, so two on one day do not collide."""
    (tmp_path / "run").mkdir()
    train.move_aside(str(tmp_path / "run"))
    assert re.fullmatch(r"run-old-\d{8}-\d{6}", os.listdir(tmp_path)[0])

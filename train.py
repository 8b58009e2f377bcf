"""Train a DiT to draw pandas.

    python train.py                                  # procedural pandas: cartoon48 on CPU, panda256 on CUDA
    python train.py --preset panda64 --data-dir ~/my_pandas --run mine
    torchrun --nproc_per_node=2 train.py ...         # same flags, DDP
    tensorboard --logdir=./dit_training

Runs resume automatically from checkpoints/<run>/latest.pt: weights, EMA, optimizer, step,
data position and RNG states, so a resumed run continues exactly where it stopped.
"""
import dataclasses
import json
import math
import os
import random
import time
import warnings

import torch
from torchvision.utils import make_grid
from tqdm.auto import tqdm

import metrics
from checkpoint import (CheckpointError, Progress, atomic_save, check_not_in_use, check_writable, hold_run, load_latest,
                        make_state, remove_empty, restore, save_checkpoint)
from config import ARCH_FIELDS, Config, build_config, config_from_dict, parse_train_args, resolve_sampler
from dataset import (DEFAULT_DATA_DIR, DataError, EpochBatches, ImageCache, enlarge, generate_pandas, held_out_files,
                     make_loader)
from diffusion import make_diffusion
from distributed import (Stopper, autocast_for, barrier, distributed, gather, precision, rank_max, reseed_rank, say,
                         select_device, setup_distributed, share)
from optim import build_training, ema_decay_at, ema_update, lr_at, train_step


# ---------------------------------------------------------------------------------------------
# set-up


# Choices of one invocation, not of the run: a resume takes them from its own flags or the preset,
# never from the checkpoint (a 10-minute budget, 10 GPU-box workers or cuda:3 must not follow the run).
RUNTIME_FIELDS = ("max_minutes", "device", "num_workers", "compile", "dist_timeout")


def resolve_config(overrides, fresh, rank, peek=False):
    """Config from preset + flags, or from the run's checkpoint + flags when resuming (peek: only to show it)."""
    cfg = build_config(overrides, torch.cuda.is_available())
    run_dir = os.path.join(cfg.ckpt_dir, cfg.run)
    if rank == 0 and not peek:
        check_not_in_use(run_dir)  # before a word about resuming it, and before --fresh moves it away under its writer
    if fresh and rank == 0:
        move_aside(run_dir, os.path.join(cfg.log_dir, cfg.run))
    barrier()
    state, path = load_latest(run_dir)
    if state is None:
        return cfg, None
    # Fields newer than the checkpoint read as their defaults: what the code that wrote it did.
    state["config"] = saved = vars(config_from_dict(state["config"]))
    state["path"] = path
    if "preset" not in overrides or cfg.preset == saved.get("preset"):  # else: the new preset + flags, checked below
        kept = {k: v for k, v in saved.items() if k not in RUNTIME_FIELDS}
        cfg = build_config({**kept, **overrides, "preset": saved["preset"], "run": cfg.run}, torch.cuda.is_available())
    check_architecture(saved, cfg, [k for k in ARCH_FIELDS if k != "num_labels"], path)  # labels: once the data is read
    changed = {k: (saved.get(k), v) for k, v in vars(cfg).items() if saved.get(k) != v}
    say(f"resuming '{cfg.run}' from {path} at step {state['step']}"
        + (f"; changed: {', '.join(f'{k} {a} -> {b}' for k, (a, b) in changed.items())}" if changed else ""), rank)
    return cfg, state


def move_aside(*folders):
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for folder in folders:
        if os.path.exists(folder):
            os.replace(folder, f"{folder.rstrip(os.sep)}-old-{stamp}")
            say(f"--fresh: moved {folder} to {folder.rstrip(os.sep)}-old-{stamp}")


def load_data(cfg, rank):
    """(the cached dataset, the held-out files); a missing default folder is filled with procedural pandas first."""
    data_dir = cfg.data_dir or DEFAULT_DATA_DIR
    if not cfg.data_dir and rank == 0 and not (os.path.isdir(data_dir) and os.listdir(data_dir)):
        say(f"no images in {data_dir}: drawing {cfg.num_generated} procedural pandas there "
            "(pass --data-dir to train on your own photos)")
        generate_pandas(data_dir, cfg.num_generated, size=max(256, cfg.image_size), seed=cfg.seed)
    barrier()  # the other ranks list the folder only once it is complete
    held = held_out_files(data_dir, cfg.holdout)
    if rank == 0:  # rank 0 builds the cache, the others then read it
        ImageCache(data_dir, cfg.image_size, cfg.cache_dir, exclude=held)
    barrier()
    return ImageCache(data_dir, cfg.image_size, cfg.cache_dir, exclude=held), held


def check_architecture(saved, cfg, fields=ARCH_FIELDS, path=""):
    """Refuse to resume across a change of the network's shape or meaning."""
    diff = [f"{k} {saved.get(k)} -> {getattr(cfg, k)}" for k in fields if saved.get(k) != getattr(cfg, k)]
    if diff:
        where = f" ({path})" if path else ""
        raise SystemExit(f"error: run '{cfg.run}'{where} was trained with a different architecture ({'; '.join(diff)}); "
                         "drop those flags to resume it, or use --fresh to start over (old files are moved aside) "
                         "or --run NAME for a new run")


@dataclasses.dataclass
class Run:
    """Everything the loop touches, built once by `setup_run`."""
    cfg: Config
    data: ImageCache
    held_out: list  # the SWD reference files, never trained on (empty: evaluate against training files)
    model: torch.nn.Module  # the plain module: checkpoints, EMA, graph
    ema: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    train_model: torch.nn.Module  # what the step calls: maybe compiled and/or DDP-wrapped
    diffusion: object
    batches: EpochBatches
    loader: torch.utils.data.DataLoader
    log: "Logger"
    autocast: object
    device: torch.device
    rank: int


def setup_run(cfg, data, held_out, state, device, rank, world_size):
    model, ema, optimizer, train_model = build_training(cfg, device, world_size)
    progress = restore(state, model, ema, optimizer, device) if state is not None else Progress()
    reseed_rank(cfg.seed, rank, progress.step)
    batches = EpochBatches(len(data), cfg.batch_size, cfg.seed, cfg.hflip, rank, world_size)
    loader = make_loader(data, batches, cfg.num_workers, pin_memory=device.type == "cuda")
    dtype, why = precision(device, cfg.amp)
    if rank_max([dtype != "bf16"], device)[0]:  # one rank's CPU without bf16 units: every rank trains in fp32
        dtype, why = "fp32", why if dtype == "fp32" else "another process's CPU has no fast bf16"
    log = Logger(cfg, progress.step, enabled=rank == 0)
    log.scalars(progress.step, **{"Train/global_batch": batches.global_batch, "Train/world_size": world_size,
                                  "Train/bf16": float(dtype == "bf16")})
    run = Run(cfg, data, held_out, model, ema, optimizer, train_model, make_diffusion(cfg, device), batches, loader, log,
              autocast_for(device, dtype), device, rank)
    say(f"preset {cfg.preset}, run '{cfg.run}': {len(data)} images, {len(data.classes)} label(s), "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, device {device}, "
        f"precision {dtype} ({why}), global batch {batches.global_batch} ({cfg.batch_size} x {world_size} process(es))", rank)
    return run, progress


def log_start(run):
    """Config text and the model graph, once per run."""
    cfg = run.cfg
    run.log.text("config", "```\n" + json.dumps(vars(cfg), indent=2) + "\n```", 0)
    if cfg.log_graph:
        x = torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size, device=run.device)
        t = torch.zeros(1, dtype=torch.long, device=run.device)
        run.log.graph(run.model, (x, t, t))


# ---------------------------------------------------------------------------------------------
# logging (rank 0 only; on other ranks every call is a no-op)


class Logger:
    """TensorBoard writer in <log_dir>/<run>; continues the step axis of a resumed run."""

    def __init__(self, cfg, step, enabled):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(cfg.log_dir, cfg.run), purge_step=step + 1)  # drop events a crash left after the checkpoint

    def scalars(self, step, **values):
        for tag, value in values.items():
            if self.writer is not None:
                self.writer.add_scalar(tag, float(value), step)

    def histograms(self, step, **values):
        for tag, value in values.items():
            if self.writer is not None:
                self.writer.add_histogram(tag, value.float().cpu(), step)

    def images(self, tag, grid, step):
        if self.writer is not None:
            self.writer.add_image(tag, grid, step)

    def graph(self, model, inputs):
        if self.writer is not None:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                self.writer.add_graph(model, inputs)

    def text(self, tag, text, step):
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def close(self):
        if self.writer is not None:
            self.writer.close()


def shared_samples(run, noise, y, steps, seed):
    """Samples of the EMA (or raw) weights from CPU noise, each rank drawing its share, joined on every rank:
    no rank sits in a collective (whose timeout would end the job) while another samples alone."""
    model, part = run.ema or run.model, share(len(noise))
    was_training = model.training
    model.eval()
    mine = noise[part]
    if len(mine):
        with run.autocast:  # the network in the run's precision, the sampler's arithmetic in fp32
            mine = run.diffusion.sample_batches(model, mine, y[part], run.cfg.batch_size, run.device, run.diffusion.sampler,
                                                min(steps, run.cfg.max_t), seed=seed, start=part.start)
    model.train(was_training)
    return gather(mine.float(), len(noise), run.device)


def sample_grid(run):
    """A grid of samples (--sampler) from fixed noise, so grids at different steps are comparable."""
    cfg = run.cfg
    noise = torch.randn(cfg.sample_n, cfg.in_channels, cfg.image_size, cfg.image_size,
                        generator=torch.Generator().manual_seed(cfg.seed + 1))
    y = torch.arange(cfg.sample_n) % len(run.data.classes)
    images = shared_samples(run, noise, y, cfg.sample_steps, seed=cfg.seed + 2)
    return make_grid(enlarge((images + 1) / 2), nrow=int(math.ceil(math.sqrt(cfg.sample_n))))


class Meter:
    """Images per second between two log points."""

    def __init__(self, step):
        self.time, self.step = time.time(), step

    def rate(self, step, global_batch):
        now = time.time()
        rate = (step - self.step) * global_batch / max(now - self.time, 1e-9)
        self.time, self.step = now, step
        return rate


def log_step(run, step, out, meter, bar):
    rate = meter.rate(step, run.batches.global_batch)
    run.log.scalars(step, **{"Loss/batch": out["loss"], "Train/lr": out["lr"],
                             "Train/grad_norm": out["grad_norm"], "Train/images_per_s": rate})
    bar.set_postfix(loss=f"{float(out['loss']):.4f}", img_s=f"{rate:.1f}")


def log_samples(run, step):
    grid = sample_grid(run)  # every rank draws its share
    run.log.images("Samples", grid, step)  # a no-op on ranks > 0


def periodic(run, progress, out, meter, bar):
    """Scalars, histograms, sample grids and evaluations, each at its own interval."""
    cfg, step = run.cfg, progress.step
    if step % cfg.log_every == 0:
        log_step(run, step, out, meter, bar)
    if cfg.hist_every and step % cfg.hist_every == 0:
        run.log.histograms(step, **{"Noise/predicted": out["pred"], "Noise/target": out["target"]})
    if cfg.sample_every and step % cfg.sample_every == 0:
        log_samples(run, step)
    if cfg.eval_every and step % cfg.eval_every == 0:
        evaluate(run, progress)


def eval_samples(run):
    """eval_n samples (--sampler) from fixed noise: they depend only on the weights."""
    cfg = run.cfg
    noise, seed = metrics.eval_noise(cfg.eval_n, cfg)
    y = torch.arange(cfg.eval_n) % len(run.data.classes)
    return shared_samples(run, noise, y, cfg.eval_steps, seed=seed)


def evaluate(run, progress):
    """SWD (metrics.py) of eval_n EMA samples vs the reference photos at 64 px; a new best is saved as best.pt."""
    cfg, step, t0 = run.cfg, progress.step, time.time()
    fake = eval_samples(run)  # every rank draws its share; rank 0 alone scores them (seconds)
    if run.rank != 0:
        return
    try:
        reference = tuple(metrics.reference_paths(run.held_out, run.data.files, len(fake)))
        result = metrics.score_samples(fake, reference)
        faces = metrics.faces_against(fake, metrics.reference_faces(reference, cfg.image_size))  # None unless procedural pandas
    except DataError as e:  # the reference photos are read only now: moved or corrupted since the start
        say(f"warning: step {step}: no SWD this time ({e}); training goes on")
        return
    levels = dict(zip(result["resolutions"], result["levels"]))
    counts = {"Quality/swd_n_samples": result["n_fake"], "Quality/swd_n_reference": result["n_real"]}  # SWD depends on both
    run.log.scalars(step, **{"Quality/swd": result["mean"], "Quality/seams": metrics.seams(fake, cfg.patch_size)}, **counts,
                    **{f"Quality/swd_level_{res}": v for res, v in levels.items()})
    if faces:
        run.log.scalars(step, **{"Quality/faces": faces[0]})
    nrow = int(math.ceil(math.sqrt(min(cfg.sample_n, cfg.eval_n))))
    run.log.images("Quality/samples", make_grid(enlarge((fake[:cfg.sample_n] + 1) / 2), nrow=nrow), step)
    # SWD moves with the image counts, the sampler and the reference: a best measured otherwise is no yardstick
    measured_on = (f"{result['n_fake']} samples vs {result['n_real']} reference images, {resolve_sampler(cfg)}-{cfg.eval_steps} "
                   f"spacing {cfg.sample_spacing:g}, --holdout {cfg.holdout} of {cfg.data_dir or DEFAULT_DATA_DIR}")
    if progress.best_swd and progress.best_of not in ("", measured_on):  # "": a checkpoint older than best_of
        say(f"step {step}: the evaluation changed since best.pt ({progress.best_of} -> {measured_on}); "
            "this score starts a new best")
        progress.best_swd = 0.0
    best = progress.best_swd or math.inf  # 0: no best yet
    say(f"step {step}: SWD {result['mean']:.1f} (" + ", ".join(f"{res}px {v:.1f}" for res, v in levels.items())
        + f"), {result['n_fake']} samples vs {result['n_real']} reference images, best {min(best, result['mean']):.1f}"
        + (f"; {faces[0]:.0%} with a panda's face ({faces[1]:.0%} of the data)" if faces else "") + f" [{time.time() - t0:.0f}s]")
    if result["mean"] < best:
        progress.best_swd, progress.best_of = result["mean"], measured_on
        save_best(run, progress)


# ---------------------------------------------------------------------------------------------
# checkpoints (rank 0 only)


def state_of(run, progress):
    return make_state(run.model, run.ema, run.optimizer, progress, run.cfg, run.data.classes, run.device)


def save(run, progress):
    """Save on rank 0; refuse to write non-finite weights."""
    if run.rank != 0:
        return
    weights = list(run.model.parameters()) + (list(run.ema.parameters()) if run.ema is not None else [])
    if not all(torch.isfinite(t).all() for t in weights):
        say(f"warning: weights are not finite at step {progress.step}; checkpoint NOT written (the previous one is kept)")
        return
    folder = os.path.join(run.cfg.ckpt_dir, run.cfg.run)
    try:
        save_checkpoint(state_of(run, progress), folder, run.cfg.keep_last, run.cfg.milestone_every)
    except OSError as e:
        raise SystemExit(f"error: could not write a checkpoint to {folder} ({e}); "
                         "free space or choose another --ckpt-dir (the previous checkpoint is intact)")


def save_best(run, progress):
    try:
        atomic_save(state_of(run, progress), os.path.join(run.cfg.ckpt_dir, run.cfg.run, "best.pt"))
    except OSError as e:
        say(f"warning: could not write best.pt ({e}); training goes on")


# ---------------------------------------------------------------------------------------------
# main


def print_config(overrides, fresh):
    """--print-config: the settings a command would train with, as JSON; nothing is written or moved."""
    try:
        cfg = build_config(overrides, torch.cuda.is_available()) if fresh else resolve_config(overrides, False, 0, peek=True)[0]
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")
    print(json.dumps(vars(cfg), indent=2))


def main(argv=None):
    overrides, actions = parse_train_args(argv)
    if actions.print_config:
        return print_config(overrides, actions.fresh)
    rank, world_size, local_rank = setup_distributed(overrides.get("device", "auto"), overrides.get("dist_timeout", 10.0))
    run = None  # once set up, its TensorBoard writer is closed however main ends (flushed, thread ended)
    created, started, lock = [], False, None  # run folders this call made: removed again if it fails before training
    try:
        cfg, state = resolve_config(overrides, actions.fresh, rank)
        device = select_device(cfg.device, local_rank, cfg.amp)
        if rank == 0:  # before minutes of decoding images, not after
            created = check_writable(os.path.join(cfg.ckpt_dir, cfg.run), os.path.join(cfg.log_dir, cfg.run),
                                     fix="fix its permissions/free space or pass another --ckpt-dir/--log-dir")
            lock = hold_run(os.path.join(cfg.ckpt_dir, cfg.run))
        data, held_out = load_data(cfg, rank)
        fit_config_to_data(cfg, data, state, rank, overrides)
        run, progress = setup_run(cfg, data, held_out, state, device, rank, world_size)
        if progress.step == 0:
            log_start(run)
    except (DataError, CheckpointError) as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:  # no Stopper yet, and nothing trained that could be saved
        say("interrupted before training started; nothing to save")
        raise SystemExit(130)
    else:
        started = True
        run_loop(run, progress)
    finally:
        if run is not None:
            run.log.close()
        if lock is not None:
            if not started and os.path.abspath(os.path.dirname(lock.name)) in created:
                os.remove(lock.name)  # so that remove_empty can take the run folder this call made
            lock.close()
        if not started:
            remove_empty(created)
    if distributed():
        torch.distributed.destroy_process_group()


def fit_config_to_data(cfg, data, state, rank, overrides):
    """Labels from the data; a resume must match the checkpoint's architecture; config.json for the record."""
    if overrides.get("num_labels", len(data.classes)) != len(data.classes):
        raise SystemExit(f"error: --num-labels {overrides['num_labels']} but {cfg.data_dir or DEFAULT_DATA_DIR} has "
                         f"{len(data.classes)} label(s) (one per sub-folder); drop --num-labels, the data sets it")
    cfg.num_labels = len(data.classes)
    random.seed(cfg.seed)  # unused by training today, but saved and restored like every RNG: make it reproducible
    if state is not None:
        check_architecture(state["config"], cfg, path=state["path"])
    if rank == 0:
        with open(os.path.join(cfg.ckpt_dir, cfg.run, "config.json"), "w") as f:
            json.dump(vars(cfg), f, indent=2)


# ---------------------------------------------------------------------------------------------
# the loop


def account(run, progress, out):
    """After a step: EMA, epoch loss sums, the count of non-finite steps (in a row, and in all)."""
    p = progress
    if out["finite"]:
        if run.ema is not None:
            ema_update(run.ema, run.model, ema_decay_at(run.cfg, p.step))
        p.bad_steps, p.epoch_loss_sum, p.epoch_batches = 0, p.epoch_loss_sum + float(out["loss"]), p.epoch_batches + 1
    else:  # train_step skipped the update
        p.bad_steps += 1
        p.skipped_steps += 1
        run.log.scalars(p.step + 1, **{"Train/skipped_nonfinite": p.skipped_steps})
        say(f"warning: non-finite loss or gradient at step {p.step + 1}: update skipped "
            f"({p.bad_steps} in a row, {p.skipped_steps} in all)", run.rank)
    p.step += 1
    p.epoch_pos += run.batches.global_batch
    if p.bad_steps >= run.cfg.max_bad_steps:
        raise SystemExit(f"error: {p.bad_steps} consecutive non-finite losses/gradients at step {p.step}; "
                         "lower --lr or --grad-clip (the last good checkpoint is kept)")


def end_epoch(run, progress):
    if progress.epoch_batches:
        run.log.scalars(progress.step, **{"Loss/epoch": progress.epoch_loss_sum / progress.epoch_batches})
    progress.epoch, progress.epoch_pos, progress.epoch_loss_sum, progress.epoch_batches = progress.epoch + 1, 0, 0.0, 0


def run_loop(run, progress):
    """Train until max_steps, the time budget, or a signal; checkpoint on the way out."""
    bar = tqdm(total=run.cfg.max_steps, initial=progress.step, disable=run.rank != 0, desc=run.cfg.run, dynamic_ncols=True)
    with Stopper() as stopper, bar:
        train_until_stop(run, progress, stopper, bar)
        # End the persistent loader workers while the Stopper still owns SIGCHLD: after a SIGTERM to the
        # group they are dead, and the DataLoader's own handler would raise from their shutdown.
        run.loader = None
    more = "reached --max-steps; raise it" if progress.step >= run.cfg.max_steps else "run the same command"
    say(f"stopped at step {progress.step} ({more} to continue); checkpoints in {os.path.join(run.cfg.ckpt_dir, run.cfg.run)}", run.rank)


def train_until_stop(run, progress, stopper, bar):
    cfg, start, meter, elapsed = run.cfg, time.time(), Meter(progress.step), 0.0
    while progress.step < cfg.max_steps:
        run.batches.set_position(progress.epoch, progress.epoch_pos)
        for x, y in loader_batches(run.loader, stopper):
            x = x.to(run.device, non_blocking=True).float().div_(127.5).sub_(1.0)  # uint8 -> [-1, 1]
            lr = lr_at(cfg, progress.step, elapsed)
            out = train_step(run.train_model, run.optimizer, run.diffusion, x, y.to(run.device), lr, cfg, run.autocast)
            account(run, progress, out)
            bar.update(1)
            periodic(run, progress, out, meter, bar)
            requested, elapsed = rank_max([stopper.requested, time.time() - start], run.device)
            stop = requested or (cfg.max_minutes > 0 and elapsed > cfg.max_minutes * 60)
            done = progress.step >= cfg.max_steps
            milestone = cfg.milestone_every and progress.step % cfg.milestone_every == 0  # whatever --ckpt-every is
            if progress.step % cfg.ckpt_every == 0 or milestone or stop or done:
                save(run, progress)
            if stop or done:
                break
        else:
            if stopper.requested:  # the loader ended because its workers died of the same signal
                save(run, progress)
                break
            end_epoch(run, progress)
            continue
        break


def loader_batches(loader, stopper):
    """The loader's batches; once a stop is requested, a loader whose workers died just ends: a SIGTERM to the whole
    process group (timeout, Slurm, kill -- -PGID) kills them too, and the trainer still has a step to save.
    Any other error propagates."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except (RuntimeError, EOFError, ConnectionError) as e:
            if stopper.requested and worker_died(e):
                return
            raise
        yield batch


def worker_died(error):
    """The DataLoader's own error for a worker that exited or was killed (not one a worker's dataset raised), or a
    batch's shared memory whose sending worker died mid-transfer (EOFError/ConnectionError from multiprocessing)."""
    return isinstance(error, (EOFError, ConnectionError)) or str(error).startswith("DataLoader worker (pid")


if __name__ == "__main__":
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"  # one line, no source line
    main()

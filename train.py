"""Train a DiT to draw pandas.

    python train.py                                  # procedural pandas: cartoon48 on CPU, panda256 on CUDA
    python train.py --preset panda64 --data-dir ~/my_pandas --run mine
    torchrun --nproc_per_node=2 train.py ...         # same flags, DDP
    tensorboard --logdir=./dit_training

Runs resume automatically from checkpoints/<run>/latest.pt: weights, EMA, optimizer, step,
data position and RNG states, so a resumed run continues exactly where it stopped.
"""
import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import math
import os
import random
import signal
import threading
import time
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from checkpoint import CheckpointError, atomic_save, check_writable, load_latest, remove_empty, save_checkpoint
from config import ARCH_FIELDS, PRESETS, Config, add_config_flags, build_config, config_from_dict
from dataset import DEFAULT_DATA_DIR, DataError, EpochBatches, ImageCache, generate_pandas, make_loader
from diffusion import make_diffusion
from dit import DiT
import metrics
from sample import pick_device


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train a Diffusion Transformer on a folder of panda pictures.",
                                     epilog=f"Defaults shown are Config's; the preset ({', '.join(PRESETS)}) overrides many of them (see README.md).")
    add_config_flags(parser)
    parser.add_argument("--fresh", action="store_true",
                        help="start over: existing checkpoints and logs of this run are moved aside, not deleted")
    args = vars(parser.parse_args(argv))
    fresh = args.pop("fresh")
    return args, fresh


# ---------------------------------------------------------------------------------------------
# set-up


def setup_distributed(device="auto"):
    """(rank, world_size, local_rank); initialises the process group only under torchrun (RANK set).

    gloo for CPU training, nccl for CUDA with one GPU per process (LOCAL_RANK), bound before the
    first collective. A rank that dies closes its connections and the others fail at their next
    collective; one that hangs makes them fail after the timeout; either way torchrun then stops
    every process. The timeout also bounds how long ranks wait for rank 0 to decode the image cache.
    """
    if "RANK" not in os.environ:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and not device.startswith("cpu")
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=10),
                            device_id=torch.device("cuda", local_rank) if cuda else None)
    return dist.get_rank(), dist.get_world_size(), local_rank


def select_device(name, local_rank, amp):
    device = pick_device(name)  # a clear error for an unknown or unavailable device
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise SystemExit(f"error: --device {device} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = amp  # TF32 matmuls: ~free speed, no visible loss; --no-amp = true fp32
        torch.backends.cudnn.allow_tf32 = amp
    return device


# Choices of one invocation, not of the run: a resume takes them from its own flags or the preset,
# never from the checkpoint (a 10-minute budget, 10 GPU-box workers or cuda:3 must not follow the run).
RUNTIME_FIELDS = ("max_minutes", "device", "num_workers", "compile")


def resolve_config(overrides, fresh, rank):
    """Config from preset + flags, or from the run's checkpoint + flags when resuming."""
    cfg = build_config(overrides, torch.cuda.is_available())
    run_dir = os.path.join(cfg.ckpt_dir, cfg.run)
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
    """The cached dataset; a missing default folder is filled with procedural pandas first."""
    data_dir = cfg.data_dir or DEFAULT_DATA_DIR
    if not cfg.data_dir and rank == 0 and not (os.path.isdir(data_dir) and os.listdir(data_dir)):
        say(f"no images in {data_dir}: drawing {cfg.num_generated} procedural pandas there "
            "(pass --data-dir to train on your own photos)")
        generate_pandas(data_dir, cfg.num_generated, size=max(256, cfg.image_size), seed=cfg.seed)
    barrier()  # the other ranks list the folder only once it is complete
    held = metrics.holdout_split(metrics.folder_files(data_dir), cfg.holdout)[1] if cfg.holdout else []
    if rank == 0:  # rank 0 builds the cache, the others then read it
        ImageCache(data_dir, cfg.image_size, cfg.cache_dir, exclude=held)
    barrier()
    return ImageCache(data_dir, cfg.image_size, cfg.cache_dir, exclude=held)


def check_architecture(saved, cfg, fields=ARCH_FIELDS, path=""):
    """Refuse to resume across a change of the network's shape or meaning."""
    diff = [f"{k} {saved.get(k)} -> {getattr(cfg, k)}" for k in fields if saved.get(k) != getattr(cfg, k)]
    if diff:
        where = f" ({path})" if path else ""
        raise SystemExit(f"error: run '{cfg.run}'{where} was trained with a different architecture ({'; '.join(diff)}); "
                         "drop those flags to resume it, or use --fresh to start over (old files are moved aside) "
                         "or --run NAME for a new run")


def build_training(cfg, device, world_size):
    """Model, EMA copy, optimizer and the module to call for training (compiled / DDP)."""
    torch.manual_seed(cfg.seed)
    model = DiT.from_config(cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval() if cfg.ema_decay > 0 or cfg.ema_gamma > 0 else None
    opt_class = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # The fused kernel exists for CUDA and the CPU: on two CPU threads it steps the 1.3M-parameter CPU
    # presets in ~1 ms instead of ~5.5 ms for the default for-loop.
    fused = {"fused": True} if device.type in ("cuda", "cpu") else {}
    optimizer = opt_class(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    train_model = model
    if world_size > 1:
        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)
    return model, ema, optimizer, train_model


def lr_at(cfg, step, elapsed=0.0):
    """Linear warm-up to cfg.lr, then constant, or cosine down to 10% over whichever budget ends
    first: --max-steps, or the --max-minutes of this invocation (elapsed seconds so far)."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
    if cfg.lr_schedule != "cosine":
        return lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.max_minutes > 0:
        progress = max(progress, elapsed / (cfg.max_minutes * 60))
    progress = min(1.0, max(0.0, progress))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def ema_decay_at(cfg, step):
    """The EMA decay for the update after optimizer step `step` (0-based)."""
    if cfg.ema_gamma > 0:  # weights ~ t^gamma over the whole run; t counts from 1
        return (1 - 1 / (step + 1)) ** (cfg.ema_gamma + 1)
    if cfg.ema_warmup:
        return min(cfg.ema_decay, (1 + step) / (10 + step))
    return cfg.ema_decay


@torch.no_grad()
def ema_update(ema, model, decay):
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


# ---------------------------------------------------------------------------------------------
# the step


def train_step(train_model, optimizer, diffusion, x, y, lr, cfg, autocast):
    """One optimisation step. The update is skipped when the loss or gradient is not finite."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast:
        loss, pred, target = diffusion.training_loss(train_model, x, y)  # predicted and true noise (or v)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(train_model.parameters(), max_norm)
    loss = all_mean(loss.detach())
    finite = bool(torch.isfinite(loss) and torch.isfinite(grad_norm))  # same on every rank
    if finite:
        optimizer.step()
    return dict(loss=loss, grad_norm=grad_norm, pred=pred.detach(), target=target, finite=finite, lr=lr)


class Stopper:
    """Turns SIGINT/SIGTERM into 'save and exit at the end of this step'; a second Ctrl-C exits at once."""

    def __enter__(self):
        self.requested, self.pid, self.previous = False, os.getpid(), {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):  # give Ctrl-C back to its previous owner (a notebook, pytest)
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:  # a forked DataLoader worker (Ctrl-C reaches the whole group): the trainer decides
            return
        if self.requested and signum == signal.SIGINT:
            os._exit(130)  # checkpoints are written atomically: exiting mid-save loses nothing
        self.requested = True
        # A SIGTERM to the whole group (timeout, Slurm, kill -- -PGID) kills the loader workers too, and
        # the DataLoader's SIGCHLD handler would raise that from inside the last save; stop listening.
        if hasattr(signal, "SIGCHLD") and signal.SIGCHLD not in self.previous:
            self.previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda *args: None)  # not SIG_DFL: a
            # SIGCHLD already pending would then print "ignored due to race condition"
        tqdm.write(f"{signal.Signals(signum).name}: saving a checkpoint and stopping (a second Ctrl-C quits at once)")


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


def sample_grid(cfg, model, diffusion, device, num_labels):
    """A grid of samples (--sampler) from fixed noise, so grids at different steps are comparable."""
    from torchvision.utils import make_grid
    g = torch.Generator().manual_seed(cfg.seed + 1)
    noise = torch.randn(cfg.sample_n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g).to(device)
    y = (torch.arange(cfg.sample_n) % num_labels).to(device)
    was_training = model.training
    model.eval()
    images = diffusion.sample(model, noise, y, diffusion.sampler, min(cfg.sample_steps, cfg.max_t),
                              generator=torch.Generator(device).manual_seed(cfg.seed + 2))
    model.train(was_training)
    return make_grid((images.float().cpu() + 1) / 2, nrow=int(math.ceil(math.sqrt(cfg.sample_n))))


# ---------------------------------------------------------------------------------------------
# distributed helpers (no-ops in a single process)


def distributed():
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def peers_alive():
    """A collective that fails because another rank died (or hung past the timeout) ends this rank
    with one line pointing at the real error, not a traceback from deep inside gloo/nccl."""
    try:
        yield
    except RuntimeError as e:  # gloo: 'Connection closed by peer'; nccl/timeouts: DistBackendError
        raise SystemExit(f"error: rank {dist.get_rank()} lost contact with the other processes "
                         f"({str(e).splitlines()[0][:160]}); most likely another rank failed first: see its error above") from None


def barrier():
    if distributed():
        with peers_alive():
            dist.barrier()


def all_mean(x):
    """Mean over ranks (the logged loss is the global batch's, not rank 0's)."""
    if distributed():
        x = x.clone()
        with peers_alive():
            dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def rank_max(values, device):
    """Element-wise max over ranks, so every rank takes the same decision (a signal or the time
    budget seen by one rank stops all; every rank schedules the learning rate by the same clock)."""
    if distributed():
        t = torch.tensor(values, dtype=torch.float64, device=device)
        with peers_alive():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()
    return list(values)


def reseed_rank(seed, rank, step):
    """Give rank r > 0 its own stream for noise, timesteps and label dropout.

    Every rank starts from torch.manual_seed(seed) (identical weights) or from rank 0's saved RNG
    state, so without this all ranks would draw the same noise for different images. Rank 0
    keeps its exact (restored) stream; the others' streams are not checkpointed but are a pure
    function of (seed, rank, step at start), so a resumed multi-process run is reproducible.
    """
    if rank > 0:
        torch.manual_seed(random.Random(f"{seed}/{rank}/{step}").getrandbits(63))


def say(message, rank=0):
    if rank == 0:
        tqdm.write(message)


# ---------------------------------------------------------------------------------------------
# checkpoints


def rng_states(device):
    states = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states, device):
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in states["python"]))
    torch.set_rng_state(states["torch"].cpu())
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"].cpu(), device)


def make_state(r, p):
    return {
        "model": r.model.state_dict(),
        "ema": r.ema.state_dict() if r.ema is not None else None,
        "optimizer": r.optimizer.state_dict(),
        **p,
        "rng": rng_states(r.device),
        "config": vars(r.cfg).copy(),
        "classes": list(r.data.classes),
    }


def restore(state, model, ema, optimizer, device):
    """Weights, EMA, optimizer and RNG states from a checkpoint; returns the loop's counters."""
    try:
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"])
        # the saved groups carry the Adam kernel of the run that wrote them (unfused before fused was the
        # default, or another device's choice): keep the one build_training made for this machine
        kernels = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
        optimizer.load_state_dict(state["optimizer"])
        for group, chosen in zip(optimizer.param_groups, kernels):
            group.update(chosen)
        set_rng_states(state["rng"], device)
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise SystemExit(f"error: checkpoint '{state.get('path', '?')}' does not fit this model or is incomplete "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:100]}); "
                         "use --fresh to start over or --run NAME for a new run") from None
    keys = ("step", "epoch", "epoch_pos", "epoch_loss_sum", "epoch_batches", "bad_steps", "skipped_steps", "best_swd")
    return {k: state.get(k, 0) for k in keys}


def save(r, p):
    """Save on rank 0; refuse to write non-finite weights."""
    if r.rank != 0:
        return
    weights = list(r.model.parameters()) + (list(r.ema.parameters()) if r.ema is not None else [])
    if not all(torch.isfinite(t).all() for t in weights):
        say(f"warning: weights are not finite at step {p['step']}; checkpoint NOT written (the previous one is kept)")
        return
    folder = os.path.join(r.cfg.ckpt_dir, r.cfg.run)
    try:
        save_checkpoint(make_state(r, p), folder, r.cfg.keep_last, r.cfg.milestone_every)
    except OSError as e:
        raise SystemExit(f"error: could not write a checkpoint to {folder} ({e}); "
                         "free space or choose another --ckpt-dir (the previous checkpoint is intact)")


# ---------------------------------------------------------------------------------------------
# main


def main(argv=None):
    overrides, fresh = parse_args(argv)
    rank, world_size, local_rank = setup_distributed(overrides.get("device", "auto"))
    r = None  # once set up, its TensorBoard writer is closed however main ends (flushed, thread ended)
    created, started = [], False  # run folders this call made: removed again if it fails before training
    try:
        cfg, state = resolve_config(overrides, fresh, rank)
        device = select_device(cfg.device, local_rank, cfg.amp)
        run_dir = os.path.join(cfg.ckpt_dir, cfg.run)
        if rank == 0:  # before minutes of decoding images, not after
            created = check_writable(run_dir, os.path.join(cfg.log_dir, cfg.run),
                                     fix="fix its permissions/free space or pass another --ckpt-dir/--log-dir")
        data = load_data(cfg, rank)
        cfg.num_labels = len(data.classes)
        random.seed(cfg.seed)  # unused by training today, but saved and restored like every RNG: make it reproducible
        if state is not None:
            check_architecture(state["config"], cfg, path=state["path"])
        if rank == 0:
            with open(os.path.join(run_dir, "config.json"), "w") as f:
                json.dump(vars(cfg), f, indent=2)
        r, progress = setup_run(cfg, data, state, device, rank, world_size)
        if progress["step"] == 0:
            log_start(r)
    except (DataError, CheckpointError) as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:  # no Stopper yet, and nothing trained that could be saved
        say("interrupted before training started; nothing to save")
        raise SystemExit(130)
    else:
        started = True
        run_loop(r, progress)
    finally:
        if r is not None:
            r.log.close()
        if not started:
            remove_empty(created)
    if distributed():
        dist.destroy_process_group()


@dataclasses.dataclass
class Run:
    """Everything the loop touches, built once by `setup_run`."""
    cfg: Config
    data: ImageCache
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


def setup_run(cfg, data, state, device, rank, world_size):
    model, ema, optimizer, train_model = build_training(cfg, device, world_size)
    progress = dict(step=0, epoch=0, epoch_pos=0, epoch_loss_sum=0.0, epoch_batches=0, bad_steps=0)
    if state is not None:
        progress = restore(state, model, ema, optimizer, device)
    reseed_rank(cfg.seed, rank, progress["step"])
    batches = EpochBatches(len(data), cfg.batch_size, cfg.seed, cfg.hflip, rank, world_size)
    loader = make_loader(data, batches, cfg.num_workers, pin_memory=device.type == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.amp and device.type == "cuda" else contextlib.nullcontext()
    log = Logger(cfg, progress["step"], enabled=rank == 0)
    log.scalars(progress["step"], **{"Train/global_batch": batches.global_batch, "Train/world_size": world_size})
    r = Run(cfg, data, model, ema, optimizer, train_model, make_diffusion(cfg, device), batches, loader, log, autocast, device, rank)
    say(f"preset {cfg.preset}, run '{cfg.run}': {len(data)} images, {len(data.classes)} label(s), "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, device {device}, "
        f"global batch {batches.global_batch} ({cfg.batch_size} x {world_size} process(es))", rank)
    return r, progress


def log_start(r):
    """Config text and the model graph, once per run."""
    cfg = r.cfg
    r.log.text("config", "```\n" + json.dumps(vars(cfg), indent=2) + "\n```", 0)
    if cfg.log_graph:
        x = torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size, device=r.device)
        t = torch.zeros(1, dtype=torch.long, device=r.device)
        r.log.graph(r.model, (x, t, t))


def account(r, p, out):
    """After a step: EMA, epoch loss sums, the count of non-finite steps (in a row, and in all)."""
    if out["finite"]:
        if r.ema is not None:
            ema_update(r.ema, r.model, ema_decay_at(r.cfg, p["step"]))
        p.update(bad_steps=0, epoch_loss_sum=p["epoch_loss_sum"] + float(out["loss"]), epoch_batches=p["epoch_batches"] + 1)
    else:  # train_step skipped the update
        p["bad_steps"] += 1
        p["skipped_steps"] = p.get("skipped_steps", 0) + 1
        r.log.scalars(p["step"] + 1, **{"Train/skipped_nonfinite": p["skipped_steps"]})
        say(f"warning: non-finite loss or gradient at step {p['step'] + 1}: update skipped "
            f"({p['bad_steps']} in a row, {p['skipped_steps']} in all)", r.rank)
    p["step"] += 1
    p["epoch_pos"] += r.batches.global_batch
    if p["bad_steps"] >= r.cfg.max_bad_steps:
        raise SystemExit(f"error: {p['bad_steps']} consecutive non-finite losses/gradients at step {p['step']}; "
                         "lower --lr or --grad-clip (the last good checkpoint is kept)")


class Meter:
    """Images per second between two log points."""

    def __init__(self, step):
        self.time, self.step = time.time(), step

    def rate(self, step, global_batch):
        now = time.time()
        rate = (step - self.step) * global_batch / max(now - self.time, 1e-9)
        self.time, self.step = now, step
        return rate


def periodic(r, p, out, meter, bar):
    """Scalars, histograms and sample grids, each at its own interval."""
    cfg, step = r.cfg, p["step"]
    if step % cfg.log_every == 0:
        rate = meter.rate(step, r.batches.global_batch)
        r.log.scalars(step, **{"Loss/batch": out["loss"], "Train/lr": out["lr"],
                               "Train/grad_norm": out["grad_norm"], "Train/images_per_s": rate})
        bar.set_postfix(loss=f"{float(out['loss']):.4f}", img_s=f"{rate:.1f}")
    if cfg.hist_every and step % cfg.hist_every == 0:
        r.log.histograms(step, **{"Noise/predicted": out["pred"], "Noise/target": out["target"]})
    if cfg.sample_every and step % cfg.sample_every == 0 and r.rank == 0:
        r.log.images("Samples", sample_grid(cfg, r.ema or r.model, r.diffusion, r.device, len(r.data.classes)), step)
    if cfg.eval_every and step % cfg.eval_every == 0:
        evaluate(r, p)


def evaluate(r, p):
    """SWD (metrics.py) of eval_n EMA samples vs the reference photos at 64 px; a new best is saved as best.pt."""
    from torchvision.utils import make_grid
    cfg, step, t0 = r.cfg, p["step"], time.time()
    if r.rank != 0:
        return
    model, size, chunk = r.ema or r.model, cfg.image_size, cfg.batch_size
    noise = torch.randn(cfg.eval_n, cfg.in_channels, size, size, generator=torch.Generator().manual_seed(metrics.EVAL_NOISE_SEED))
    y = torch.arange(cfg.eval_n) % len(r.data.classes)
    was_training = model.training
    model.eval()
    # from fixed noise (and fixed ancestral draws for ddpm): depends only on the weights
    fake = r.diffusion.sample_batches(model, noise, y, chunk, r.device, r.diffusion.sampler, min(cfg.eval_steps, cfg.max_t),
                                      seed=metrics.EVAL_NOISE_SEED)
    model.train(was_training)
    try:
        result, n_ref = metrics.score_samples(fake, cfg.data_dir or DEFAULT_DATA_DIR, cfg.holdout, r.data.files)
    except DataError as e:  # the reference photos are read only now: moved or corrupted since the start
        say(f"warning: step {step}: no SWD this time ({e}); training goes on")
        return
    levels = dict(zip(result["resolutions"], result["levels"]))
    r.log.scalars(step, **{"Quality/swd": result["mean"]}, **{f"Quality/swd_level_{res}": v for res, v in levels.items()})
    r.log.images("Quality/samples", make_grid((fake[:cfg.sample_n] + 1) / 2, nrow=int(math.ceil(math.sqrt(min(cfg.sample_n, cfg.eval_n))))), step)
    best = p.get("best_swd") or math.inf  # absent (or 0 from an older checkpoint): no best yet
    say(f"step {step}: SWD {result['mean']:.1f} (" + ", ".join(f"{res}px {v:.1f}" for res, v in levels.items())
        + f") vs {n_ref} reference images, best {min(best, result['mean']):.1f} [{time.time() - t0:.0f}s]")
    if result["mean"] < best:
        p["best_swd"] = result["mean"]
        try:
            atomic_save(make_state(r, p), os.path.join(cfg.ckpt_dir, cfg.run, "best.pt"))
        except OSError as e:
            say(f"warning: could not write best.pt ({e}); training goes on")


def end_epoch(r, p):
    if p["epoch_batches"]:
        r.log.scalars(p["step"], **{"Loss/epoch": p["epoch_loss_sum"] / p["epoch_batches"]})
    p.update(epoch=p["epoch"] + 1, epoch_pos=0, epoch_loss_sum=0.0, epoch_batches=0)


def run_loop(r, p):
    """Train until max_steps, the time budget, or a signal; checkpoint on the way out."""
    bar = tqdm(total=r.cfg.max_steps, initial=p["step"], disable=r.rank != 0, desc=r.cfg.run, dynamic_ncols=True)
    with Stopper() as stopper, bar:
        train_until_stop(r, p, stopper, bar)
        # End the persistent loader workers while the Stopper still owns SIGCHLD: after a SIGTERM to the
        # group they are dead, and the DataLoader's own handler would raise from their shutdown.
        r.loader = None
    more = "reached --max-steps; raise it" if p["step"] >= r.cfg.max_steps else "run the same command"
    say(f"stopped at step {p['step']} ({more} to continue); checkpoints in {os.path.join(r.cfg.ckpt_dir, r.cfg.run)}", r.rank)


def train_until_stop(r, p, stopper, bar):
    cfg, start, meter, elapsed = r.cfg, time.time(), Meter(p["step"]), 0.0
    while p["step"] < cfg.max_steps:
        r.batches.set_position(p["epoch"], p["epoch_pos"])
        for x, y in loader_batches(r.loader, stopper):
            x = x.to(r.device, non_blocking=True).float().div_(127.5).sub_(1.0)  # uint8 -> [-1, 1]
            lr = lr_at(cfg, p["step"], elapsed)
            out = train_step(r.train_model, r.optimizer, r.diffusion, x, y.to(r.device), lr, cfg, r.autocast)
            account(r, p, out)
            bar.update(1)
            periodic(r, p, out, meter, bar)
            requested, elapsed = rank_max([stopper.requested, time.time() - start], r.device)
            stop = requested or (cfg.max_minutes > 0 and elapsed > cfg.max_minutes * 60)
            done = p["step"] >= cfg.max_steps
            if p["step"] % cfg.ckpt_every == 0 or stop or done:
                save(r, p)
            if stop or done:
                break
        else:
            if stopper.requested:  # the loader ended because its workers died of the same signal
                save(r, p)
                break
            end_epoch(r, p)
            continue
        break


def loader_batches(loader, stopper):
    """The loader's batches; once a stop is requested, a loader that fails just ends: a SIGTERM to the whole
    process group (timeout, Slurm, kill -- -PGID) kills its workers too, and the trainer still has a step to save."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except Exception:
            if stopper.requested:
                return
            raise
        yield batch


if __name__ == "__main__":
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"  # one line, no source line
    main()

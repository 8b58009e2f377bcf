"""Multi-process training (DDP over gloo on the CPU) and the per-rank data shards.

The end-to-end test starts real processes with the environment torchrun would give them
(RANK, WORLD_SIZE, MASTER_ADDR, ...) and calls train.main in each, so the same code path as
`torchrun --nproc_per_node=2 train.py` runs. Each rank reports what it ended with (parameter
hashes, losses, files it wrote) through a queue; nothing is added to train.py for testing.
"""
import contextlib
import dataclasses
import glob
import hashlib
import multiprocessing
import os
import socket
import sys
import time

import pytest
import torch

from conftest import make_pandas, run_train, train_argv
from config import build_config
from dataset import EpochBatches
from diffusion import make_diffusion

# ---------------------------------------------------------------------------------------------
# per-rank shards of an epoch (pure functions, no processes)


def global_sequence(n, batch, world_size, epoch=0, start=0, seed=5):
    """What all ranks together draw from `start` to the end of an epoch, step by step in rank order."""
    shards = []
    for rank in range(world_size):
        batches = EpochBatches(n, batch, seed, rank=rank, world_size=world_size)
        batches.set_position(epoch, start)
        shards.append(list(batches))
        assert len(shards[-1]) == len(batches)
    assert len({len(s) for s in shards}) == 1, "every rank must take the same number of steps (DDP would hang)"
    return [pair for step in zip(*shards) for block in step for pair in block]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_rank_shards_are_disjoint_and_cover_the_epoch(world_size):
    n, batch = 23, 3  # global batch 3, 6 or 9: 23 is a multiple of none of them
    ranks = []
    for rank in range(world_size):
        ranks.append([i for b in EpochBatches(n, batch, 5, rank=rank, world_size=world_size) for i, _ in b])
    indices = [i for r in ranks for i in r]
    assert len(indices) == len(set(indices)), "ranks overlap"
    assert len(indices) == n - n % (batch * world_size)  # all but the epoch's last partial global batch
    perm, flips = EpochBatches(n, batch, 5, world_size=world_size).order(0)
    assert global_sequence(n, batch, world_size) == list(zip(perm, flips))[:len(indices)]  # one epoch order, cut in blocks
    assert global_sequence(n, batch, world_size, epoch=1) != global_sequence(n, batch, world_size, epoch=0)


@pytest.mark.parametrize("new_batch, new_world_size", [(2, 3), (6, 1), (4, 1), (3, 2)])
def test_resume_with_another_world_size_continues_the_same_order(new_batch, new_world_size):
    n, steps = 50, 3
    before = global_sequence(n, 3, 2)[:steps * 6]  # 3 steps of 2 ranks x 3 images: position 18
    after = global_sequence(n, new_batch, new_world_size, start=len(before))
    perm, flips = EpochBatches(n, 1, 5).order(0)
    assert before + after == list(zip(perm, flips))[:len(before) + len(after)]
    assert len(after) == (n - len(before)) // (new_batch * new_world_size) * new_batch * new_world_size


# ---------------------------------------------------------------------------------------------
# two real processes


def digest(state_dict):
    h = hashlib.sha256()
    for name, t in state_dict.items():
        h.update(name.encode() + t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def watch_writes(root, found):
    """Record every file created, written, renamed or removed under `root` (Python audit events)."""
    root = os.path.realpath(root) + os.sep
    writing_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    events = {"os.mkdir": 0, "os.rename": 1, "os.remove": 0, "os.rmdir": 0, "os.link": 1, "os.symlink": 1,
              "os.truncate": 0, "shutil.copyfile": 1}

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & writing_flags)
        elif event in events:
            path = args[events[event]]
            writing = not (event == "os.mkdir" and os.path.isdir(path))  # makedirs(exist_ok=True) creates nothing
        else:
            return
        if writing and isinstance(path, (str, bytes)) and os.path.realpath(os.fsdecode(path)).startswith(root):
            found.append(f"{event} {os.fsdecode(path)}")

    sys.addaudithook(hook)


def _rank_main(rank, world_size, port, workdir, argv, queue, slow_sampling=0.0):
    """One rank, started as torchrun would; reports its end state to the test through `queue`."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import diffusion
    import torch.distributed as dist
    import train

    report = dict(rank=rank, pid=os.getpid(), writes=[], local_loss=[], logged_loss=[], sample_grids=0)
    watch_writes(os.path.dirname(workdir), report["writes"])
    real_loss, real_step, real_loop, real_grid = (diffusion.Diffusion.training_loss, train.train_step,
                                                  train.run_loop, train.sample_grid)

    def training_loss(self, *args, **kwargs):  # this rank's own loss, before averaging
        out = real_loss(self, *args, **kwargs)
        report["local_loss"].append(float(out[0].detach()))
        return out

    def train_step(*args, **kwargs):  # what the loop logs
        out = real_step(*args, **kwargs)
        report["logged_loss"].append(float(out["loss"]))
        return out

    def run_loop(run, progress):
        real_loop(run, progress)
        report.update(step=progress.step, epoch=progress.epoch, epoch_pos=progress.epoch_pos, model=digest(run.model.state_dict()),
                      ema=digest(run.ema.state_dict()), rng=hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest(),
                      world_size=dist.get_world_size() if dist.is_initialized() else 1)

    def sample_grid(*args, **kwargs):
        report["sample_grids"] += 1
        return real_grid(*args, **kwargs)

    if slow_sampling:  # every rank's sampling takes this long; collectives time out sooner
        real_batches = diffusion.Diffusion.sample_batches

        def sample_batches(*args, **kwargs):
            time.sleep(slow_sampling)
            return real_batches(*args, **kwargs)
        diffusion.Diffusion.sample_batches = sample_batches

    diffusion.Diffusion.training_loss = training_loss
    train.train_step, train.run_loop, train.sample_grid = train_step, run_loop, sample_grid
    try:
        os.chdir(workdir)
        train.main(argv)
    except BaseException as e:
        report["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        queue.put(report)


def run_ranks(world_size, workdir, argv, timeout=150, slow_sampling=0.0):
    """Start `world_size` ranks; returns their reports in rank order. A failure anywhere fails the test."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.makedirs(workdir, exist_ok=True)
    procs = [ctx.Process(target=_rank_main, args=(rank, world_size, port, str(workdir), argv, queue, slow_sampling))
             for rank in range(world_size)]
    for p in procs:
        p.start()
    try:
        reports = sorted((queue.get(timeout=timeout) for _ in procs), key=lambda r: r["rank"])
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [f"rank {r['rank']}: {r['error']}" for r in reports if "error" in r]
    assert not errors and all(p.exitcode == 0 for p in procs), errors
    return reports


def assert_ranks_agree(reports, steps):
    r0, r1 = reports
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["step"] == r1["step"] == steps
    assert r0["model"] == r1["model"], "parameters differ between ranks"
    assert r0["ema"] == r1["ema"], "EMA weights differ between ranks"
    assert r0["rng"] != r1["rng"], "ranks draw the same noise"
    # logged loss = mean of the ranks' own losses, the same on both; the own losses differ
    assert r0["logged_loss"] == r1["logged_loss"]
    for mean, a, b in zip(r0["logged_loss"], r0["local_loss"], r1["local_loss"]):
        assert a != b and mean == pytest.approx((a + b) / 2, rel=1e-5)
    assert r0["writes"] and r0["sample_grids"] > 0
    assert r1["sample_grids"] == r0["sample_grids"], "the ranks must draw the sample grid together"
    assert r1["writes"] == [], "rank 1 wrote files"


def latest(workdir):
    return torch.load(os.path.join(workdir, "checkpoints", "tiny", "latest.pt"), weights_only=True)


def test_one_process_then_two_then_one(tmp_path, monkeypatch):
    """A 1-process checkpoint resumes in 2 ranks; theirs resumes in a plain `python train.py` again."""
    data = make_pandas(tmp_path / "pandas", 20)  # 20 images: a multiple of neither global batch (4 x 1, 4 x 2)
    workdir = str(tmp_path / "run")
    flags = ["--batch-size", 4, "--log-every", 1, "--sample-every", 3, "--sample-n", 2, "--sample-steps", 2,
             "--ckpt-every", 3, "--no-log-graph"]
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr("torch.distributed.init_process_group", lambda *a, **k: pytest.fail("process group in 1 process"))

    run_train(workdir, data, *flags, "--max-steps", 3)
    assert (latest(workdir)["epoch"], latest(workdir)["epoch_pos"]) == (0, 12)

    # 1 -> 2, with a new cache folder so that rank 0 builds it while rank 1 waits
    argv = train_argv(workdir, data, *flags, "--max-steps", 6, "--cache-dir", os.path.join(workdir, "cache2"))
    reports = run_ranks(2, workdir, argv)
    assert_ranks_agree(reports, 6)
    assert os.listdir(os.path.join(workdir, "cache2"))
    state = latest(workdir)
    assert (state["epoch"], state["epoch_pos"]) == (1, 16)  # one 8 at position 12 of epoch 0, then two of epoch 1
    assert digest(state["model"]) == reports[1]["model"] and digest(state["ema"]) == reports[1]["ema"]
    events = glob.glob(os.path.join(workdir, "dit_training", "tiny", "events.out.tfevents.*"))
    assert sorted(int(e.split(".")[-2]) for e in events) == sorted([os.getpid(), reports[0]["pid"]])  # not rank 1
    scalars = read_scalars(next(e for e in events if int(e.split(".")[-2]) == reports[0]["pid"]))
    assert scalars["Train/global_batch"] == [(3, 8.0)] and scalars["Train/world_size"] == [(3, 2.0)]
    assert [v for _, v in scalars["Loss/batch"]] == pytest.approx(reports[0]["logged_loss"], rel=1e-6)

    # 2 -> 1: 1 x 4 takes what 2 x 4 leaves at the end of epoch 1
    run_train(workdir, data, *flags, "--max-steps", 7)
    state = latest(workdir)
    assert (state["step"], state["epoch"], state["epoch_pos"]) == (7, 1, 20)


def read_scalars(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(path)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_time_budget_stops_every_rank_at_one_step_with_one_learning_rate(tmp_path):
    """--max-minutes in 2 ranks: both stop after the same step, and a cosine over the clock gives both
    the same learning rate each step (their weights stay equal although their clocks differ)."""
    data = make_pandas(tmp_path / "pandas", 8)
    workdir = str(tmp_path / "run")
    argv = train_argv(workdir, data, "--batch-size", 2, "--sample-every", 0, "--ckpt-every", 1000, "--no-log-graph",
                      "--max-steps", 100000, "--max-minutes", 0.05, "--lr-schedule", "cosine")
    r0, r1 = run_ranks(2, workdir, argv)
    assert 0 < r0["step"] == r1["step"] < 100000
    assert r0["model"] == r1["model"] and r0["ema"] == r1["ema"]
    assert latest(workdir)["step"] == r0["step"]


# ---------------------------------------------------------------------------------------------
# gradient averaging: two ranks on two half-batches take the step one process takes on the whole batch


class SplitDraws:
    """Diffusion.training_loss on `parts` equal slices of the batch, slice j drawing its t and noise from its
    own generator (seed first + j), losses averaged: one process on the whole batch draws what two ranks
    on its halves draw."""

    def __init__(self, diffusion, parts, first):
        self.diffusion, self.parts, self.first = diffusion, parts, first

    def training_loss(self, model, x, y):
        outs = [self.diffusion.training_loss(model, xs, ys, torch.Generator().manual_seed(100 + self.first + j))
                for j, (xs, ys) in enumerate(zip(x.chunk(self.parts), y.chunk(self.parts)))]
        loss, pred, target = zip(*outs)
        return torch.stack(loss).mean(), torch.cat(pred), torch.cat(target)


def one_sgd_step(world_size, half=None, parts=1):
    """optim.train_step with plain SGD (unlike Adam's first step, its update scales with the gradient, so a
    sum over ranks would show) on half 0 or 1 of a fixed batch of 4, or all of it (half=None) in `parts`
    slices; returns (each parameter's update, the logged loss)."""
    import optim
    cfg = dataclasses.replace(build_config({"preset": "tiny", "device": "cpu"}), adaln_zero=False, grad_clip=0.0)
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = torch.tensor([0, 0, 0, 0])
    share = slice(0, 4) if half is None else slice(2 * half, 2 * half + 2)
    model, _, _, train_model = optim.build_training(cfg, torch.device("cpu"), world_size)
    sgd = torch.optim.SGD(model.parameters(), lr=0.0)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    out = optim.train_step(train_model, sgd, SplitDraws(make_diffusion(cfg), parts, half or 0), x[share], y[share], 0.5, cfg,
                           contextlib.nullcontext())
    return {k: (p.detach() - before[k]).numpy() for k, p in model.named_parameters()}, float(out["loss"])


def _sgd_rank(rank, port, queue):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    import distributed
    try:
        distributed.setup_distributed("cpu")
        queue.put((rank, one_sgd_step(2, half=rank)))
    except BaseException as e:
        queue.put((rank, f"{type(e).__name__}: {e}"))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_ranks_average_their_gradients():
    """One step of 2 gloo ranks on two half-batches leaves both with the weights of one process's step on the
    whole batch (the same draws): DDP averages the ranks' gradients. Ranks agreeing with each other would not
    show that: summed gradients, or none exchanged, would each give other weights here."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_sgd_rank, args=(rank, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(isinstance(r, tuple) for r in results.values()), results
    whole, whole_loss = one_sgd_step(1, parts=2)
    alone, _ = one_sgd_step(1, half=0)  # rank 0's half in one process
    for rank, (update, loss) in results.items():
        assert loss == pytest.approx(whole_loss, rel=1e-6)  # the logged loss is the global batch's
        for name, u in update.items():
            torch.testing.assert_close(torch.from_numpy(u), torch.from_numpy(whole[name]), atol=1e-6, rtol=1e-4)
    assert max(abs(u).max() for u in whole.values()) > 1e-3  # a real step: a sum over ranks would double it
    assert max(abs(u - alone[name]).max() for name, u in whole.items()) > 1e-3  # one half's step is another


def test_evaluation_slower_than_the_collective_timeout_does_not_end_the_job(tmp_path):
    """Every rank draws its share of the evaluation samples: an evaluation that takes longer than the process
    group's timeout finishes, where rank 1 waiting at a collective for rank 0 to sample alone would time out."""
    data = make_pandas(tmp_path / "pandas", 8)
    workdir = str(tmp_path / "run")
    argv = train_argv(workdir, data, "--batch-size", 2, "--max-steps", 2, "--eval-every", 2, "--eval-n", 4,
                      "--sample-every", 0, "--no-log-graph", "--dist-timeout", 0.2)  # 12 s
    reports = run_ranks(2, workdir, argv, slow_sampling=20.0)
    assert [r["step"] for r in reports] == [2, 2]
    assert latest(workdir)["best_swd"] > 0  # the evaluation ran to its end on rank 0

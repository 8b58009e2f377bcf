"""Device and precision choice, process groups, and rank-aware helpers (no-ops in a single process).

DDP is detected from the environment (`RANK` set by torchrun), so the same `python train.py`
runs on one CPU. `Stopper` turns SIGINT/SIGTERM into a request the loop honours at a step's end.
"""
import contextlib
import datetime
import functools
import os
import platform
import random
import signal
import threading
import time

import torch
import torch.distributed as dist
from tqdm.auto import tqdm


def setup_distributed(device="auto", timeout_minutes=10.0):
    """(rank, world_size, local_rank); initialises the process group only under torchrun (RANK set).

    gloo for CPU training, nccl for CUDA with one GPU per process (LOCAL_RANK), bound before the
    first collective. A rank that dies closes its connections and the others fail at their next
    collective; one that hangs makes them fail after the timeout; either way torchrun then stops
    every process. The timeout also bounds how long ranks wait for rank 0 to decode the image cache,
    so work done by rank 0 alone must stay well inside it (sampling is shared: `share`, `gather`).
    """
    if "RANK" not in os.environ:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and not device.startswith("cpu")
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes),
                            device_id=torch.device("cuda", local_rank) if cuda else None)
    return dist.get_rank(), dist.get_world_size(), local_rank


def pick_device(name):
    """auto -> cuda if available, else cpu; an unknown or unavailable device is a clear error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: unknown --device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} was asked for but CUDA is not available; use --device cpu")
    return device


def select_device(name, local_rank, amp):
    """pick_device, bound to this process's GPU under torchrun, with TF32 matmuls when amp is on."""
    device = pick_device(name)  # a clear error for an unknown or unavailable device
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise SystemExit(f"error: --device {device} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = amp  # TF32 matmuls: faster, no visible loss; --no-amp = true fp32
        torch.backends.cudnn.allow_tf32 = amp
    return device


def precision(device, amp):
    """'bf16' (autocast) or 'fp32', and why: bf16 on CUDA, and on a CPU with bf16 units (AVX512-BF16/AMX);
    other CPUs emulate bf16 and would run slower."""
    if not amp:
        return "fp32", "--no-amp"
    if device.type == "cuda":
        return ("bf16", "CUDA") if torch.cuda.is_bf16_supported() else ("fp32", "this GPU has no bf16")
    if device.type != "cpu":
        return "fp32", f"no bf16 autocast on {device.type}"
    fast, why = cpu_bf16()
    return ("bf16" if fast else "fp32"), why


# A training step gains far less than its matmuls (casts and element-wise work stay), so only a clear win counts.
CPU_BF16_MIN_SPEEDUP = 2.0
X86 = ("x86_64", "amd64", "i386", "i686")  # platform.machine() of an x86 CPU, lower-cased


@functools.cache
def cpu_bf16():
    """(True, why) where bf16 matmuls beat fp32's clearly, else (False, why). On x86 the CPU's features decide
    (AVX512-BF16 or AMX; without them bf16 is emulated), so every process of a run decides alike, which a timing on
    a busy machine did not (docs/experiments.md); other CPUs (ARM) are timed, their features not read here."""
    if platform.machine().lower() in X86:
        units = [name for name, has in (("AMX", torch.cpu._is_amx_tile_supported()),
                                        ("AVX512-BF16", torch.cpu._is_avx512_bf16_supported())) if has]
        if units:
            return True, f"this CPU has bf16 units: {', '.join(units)}"
        return False, f"no bf16 units on this CPU ({torch.backends.cpu.get_cpu_capability()}; bf16 would be emulated)"
    speedup = cpu_bf16_speedup()
    if speedup >= CPU_BF16_MIN_SPEEDUP:
        return True, f"bf16 matmuls {speedup:.1f}x as fast as fp32 on this CPU"
    return False, f"bf16 matmuls only {speedup:.1f}x as fast as fp32 on this CPU (bf16 needs {CPU_BF16_MIN_SPEEDUP:g}x)"


def cpu_bf16_speedup(n=1024, repeats=4):
    """fp32 time / bf16 time of an n x n matmul on this CPU (best of `repeats` after a warm-up pass)."""
    best = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16):  # twice: the first pass warms up
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - start)
        best[dtype] = min(times)
    return best[torch.float32] / best[torch.bfloat16]


def autocast_for(device, choice):
    """The context a training step runs in: bf16 autocast, or nothing (fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if choice == "bf16" else contextlib.nullcontext()


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


def share(n):
    """The contiguous part of n items this process handles: every rank a share, in rank order."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)
    per = -(-n // world_size)
    return slice(min(n, rank * per), min(n, (rank + 1) * per))


def gather(part, n, device):
    """Each rank's `share(n)` of an (n, ...) CPU tensor, joined in rank order on every rank."""
    if not distributed():
        return part
    per = -(-n // dist.get_world_size())
    padded = torch.zeros(per, *part.shape[1:], dtype=part.dtype, device=device)  # all_gather needs equal shapes
    padded[:len(part)] = part.to(device)
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    with peers_alive():
        dist.all_gather(parts, padded)
    return torch.cat(parts)[:n].cpu()


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

"""Training state <-> checkpoint dict, and checkpoint files that survive crashes and refuse foreign code.

A checkpoint is a dict of tensors and plain Python data (model, ema, optimizer, the Progress counters: step, epoch,
data position, RNG states, config as a dict, class names). Each is written to a temporary file
in the same folder, fsynced, then renamed over its final name, so a crash at any moment
leaves either the old file or the new one (a killed writer's temp file is removed by the next
save). `latest.pt` is a copy of the newest `step_XXXXXXX.pt`; resuming tries the newest step file,
then latest.pt (a kill between the two renames leaves it one checkpoint behind), then the older
step files, and skips any unreadable file with a warning. Loading always uses `weights_only=True`,
so a file that would run code when unpickled is refused.
"""
import dataclasses
import os
import pickle
import random
import re
import shutil
import warnings

import torch

try:
    import fcntl
except ImportError:  # Windows: no advisory file locks, so two runs on one folder go unchecked there
    fcntl = None

STEP_FILE = re.compile(r"^step_(\d+)\.pt$")
RUN_LOCK = ".lock"  # in the run folder, held by the train.py writing it (hold_run)
TEMP_FILE = re.compile(r"^\..+\.pt\.tmp(\d+)$")  # what atomic_save/_copy_latest leave if killed


class CheckpointError(Exception):
    """A checkpoint that cannot be used, explained in one sentence."""


@dataclasses.dataclass
class Progress:
    """The loop's counters, saved as top-level checkpoint keys: where the run is and how it went."""
    step: int = 0
    epoch: int = 0
    epoch_pos: int = 0  # images of this epoch already trained on, across all ranks
    epoch_loss_sum: float = 0.0
    epoch_batches: int = 0
    bad_steps: int = 0  # non-finite steps in a row
    skipped_steps: int = 0  # non-finite steps in all
    best_swd: float = 0.0  # 0: no evaluation yet
    best_of: str = ""  # what best_swd was measured on (counts, sampler, reference): a best on others is no best


# ---------------------------------------------------------------------------------------------
# training state <-> checkpoint dict


# Optimizer settings a resume takes from this run's config and machine, not from the checkpoint (lr is set every step).
OPTIMIZER_SETTINGS = ("fused", "foreach", "weight_decay", "decoupled_weight_decay")


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


def make_state(model, ema, optimizer, progress, cfg, classes, device):
    """The checkpoint dict: tensors and plain data only, so weights_only loading accepts it."""
    return {
        "model": model.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        **dataclasses.asdict(progress),
        "rng": rng_states(device),
        "config": vars(cfg).copy(),
        "classes": list(classes),
    }


def restore(state, model, ema, optimizer, device):
    """Weights, EMA, optimizer and RNG states from a checkpoint; returns the loop's Progress."""
    try:
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"])
        # the saved groups carry the settings of the run that wrote them: keep those build_training chose for this
        # machine (the Adam kernel) and this config (weight decay; AdamW is Adam with decoupled decay), so a
        # resume with a new --weight-decay or --optimizer trains and saves with it
        chosen = [{k: g[k] for k in OPTIMIZER_SETTINGS if k in g} for g in optimizer.param_groups]
        optimizer.load_state_dict(state["optimizer"])
        for group, settings in zip(optimizer.param_groups, chosen):
            group.update(settings)
        set_rng_states(state["rng"], device)
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint '{state.get('path', '?')}' does not fit this model or is incomplete "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:100]}); "
                              "use --fresh to start over or --run NAME for a new run") from None
    return Progress(**{f.name: state.get(f.name, f.default) for f in dataclasses.fields(Progress)})


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(state, path):
    """torch.save to a temp file, fsync, rename. On any error the old `path` is untouched."""
    folder = os.path.dirname(path) or "."
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def _copy_latest(folder, target):
    """Make latest.pt a copy of `target`, atomically. A copy, not a link: a file written over or truncated
    in place (`cp x latest.pt`, an editor) then damages latest.pt alone, never the step file."""
    tmp = os.path.join(folder, f".latest.pt.tmp{os.getpid()}")
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        shutil.copyfile(target, tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, os.path.join(folder, "latest.pt"))
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def pid_alive(pid):
    """Whether a process runs under this pid, for the temp files a killed writer leaves (named by its pid)."""
    if os.name == "nt":  # signal 0 there is CTRL_C_EVENT, no probe: never take another process's files for dead
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def remove_stale_temps(folder):
    """Delete temp files left by a writer that was killed mid-save (never those of a live process)."""
    for name in os.listdir(folder):
        m = TEMP_FILE.match(name)
        if m and (int(m.group(1)) == os.getpid() or not pid_alive(int(m.group(1)))):
            os.remove(os.path.join(folder, name))


def save_checkpoint(state, folder, keep_last=3, milestone_every=0):
    """Write step_<step>.pt, copy it to latest.pt, prune old ones. Returns the path."""
    os.makedirs(folder, exist_ok=True)
    remove_stale_temps(folder)
    path = os.path.join(folder, f"step_{state['step']:07d}.pt")
    atomic_save(state, path)
    _copy_latest(folder, path)
    prune(folder, keep_last, milestone_every)
    return path


def step_files(folder):
    """[(step, path)] of a run folder, newest first."""
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, name)) for name in os.listdir(folder) if (m := STEP_FILE.match(name))]
    return sorted(found, reverse=True)


def prune(folder, keep_last, milestone_every):
    """Keep the newest `keep_last` step files and every milestone (step % milestone_every == 0)."""
    for i, (step, path) in enumerate(step_files(folder)):
        milestone = milestone_every > 0 and step % milestone_every == 0
        if i >= max(1, keep_last) and not milestone:
            os.remove(path)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint safely; any problem becomes a CheckpointError naming the file and the fix."""
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint '{path}' is a folder; pass --ckpt {os.path.join(path, 'latest.pt')} "
                              "or another .pt file in it")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist; pass --ckpt with a .pt file written by train.py")
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols would only add noise here
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():  # plain garbage also fails as an UnpicklingError
            raise CheckpointError(f"'{path}' is truncated or not a checkpoint (UnpicklingError); "
                                  "delete it or pass another file") from None
        raise CheckpointError(f"'{path}' was refused: {_refused_object(e)}, which could run code when unpickled; "
                              "only load checkpoints written by train.py") from None
    except Exception as e:  # truncated zip, empty file, text, a folder...: torch raises many types
        raise CheckpointError(f"'{path}' is truncated or not a checkpoint ({type(e).__name__}); "
                              "delete it or pass another file") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"'{path}' is not a checkpoint written by this project's train.py (no model/config)")
    return state


def _refused_object(error):
    """What torch's weights_only unpickler refused, in a few words, from its long message."""
    if m := re.search(r"GLOBAL ([\w.]+)", str(error)):
        return f"it asks to import {m.group(1)}"
    detail = re.search(r"Unsupported[^\n.]*", str(error))
    return "it holds objects other than tensors and plain data" + (f" ({detail.group(0)})" if detail else "")


def load_latest(folder, map_location="cpu", fix="use --fresh to start over (the old files are kept aside) or another --run name"):
    """Newest readable checkpoint of a run folder as (state, path), or (None, None) if there is none.

    An unreadable newer file is reported and skipped; if every file is unreadable, that is an error
    rather than a silent fresh start, ending in `fix`.
    """
    candidates = [path for _, path in step_files(folder)]  # newest step first: latest.pt may lag behind it
    latest = os.path.join(folder, "latest.pt")
    if os.path.exists(latest) and not any(_same(latest, path) for path in candidates):  # (runs of old linked it)
        candidates.insert(1, latest)  # the newest step or the one before it, or a lone file
    problems = []
    for path in candidates:
        try:
            return load_checkpoint(path, map_location), path
        except CheckpointError as e:
            problems.append(os.path.basename(path))
            alias = " (= latest.pt)" if path != latest and os.path.exists(latest) and _same(latest, path) else ""
            warnings.warn(f"skipping unusable checkpoint{alias}: {e}", stacklevel=2)
    if problems:
        raise CheckpointError(f"no readable checkpoint in '{folder}' ({', '.join(problems)}: see the warnings above); {fix}")
    return None, None


def _same(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_writable(*folders, fix):
    """Create each folder and write a 4 KB probe into it, so a read-only or full disk stops a command
    before its work, not at its first save; `fix` ends the one-line error. Returns the folders it
    created (parents first), for `remove_empty` if the command then fails before writing anything."""
    created = []
    for folder in folders:
        try:
            missing = []
            path = os.path.abspath(folder)
            while not os.path.exists(path):
                missing.insert(0, path)
                path = os.path.dirname(path)
            os.makedirs(folder, exist_ok=True)
            created += missing
            probe = os.path.join(folder, f".write_test{os.getpid()}")
            with open(probe, "wb") as f:
                f.write(b"0" * 4096)
            os.remove(probe)
        except OSError as e:
            raise SystemExit(f"error: cannot write to '{folder}' ({e.strerror}); {fix}") from None
    return created


def _locked_by(f):
    """The pid written in a lock file another process holds, or None if this process could take the lock (or the
    file system cannot lock at all, e.g. some network mounts: the run then goes unchecked, as on Windows)."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        f.seek(0)
        return f.read().strip() or "?"
    except OSError:
        return None


def _in_use(folder, pid):
    return (f"run folder '{folder}' is in use by another train.py (pid {pid}); wait for it or stop it, "
            "or pass --run NAME to train another run")


def check_not_in_use(folder):
    """Refuse (CheckpointError) when a live train.py holds `folder`, e.g. before --fresh moves it away under it."""
    path = os.path.join(folder, RUN_LOCK)
    if fcntl is None or not os.path.exists(path):
        return
    with open(path, "a+") as f:  # writable: NFS locks a read-only file for reading only; closing frees what it took
        pid = _locked_by(f)
    if pid is not None:
        raise CheckpointError(_in_use(folder, pid))


def hold_run(folder):
    """Lock the run folder for this process's life: a second train.py on the same run would overwrite its
    checkpoints step for step. Returns the open lock file (closing it, or exiting, frees the run)."""
    if fcntl is None:
        return None
    f = open(os.path.join(folder, RUN_LOCK), "a+")
    pid = _locked_by(f)
    if pid is not None:
        f.close()
        raise CheckpointError(_in_use(folder, pid))
    # A forked child (a DataLoader worker) shares the lock: it would keep the run locked after this process is killed.
    os.register_at_fork(after_in_child=f.close)
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def remove_empty(folders):
    """Remove those of `folders` that are still empty, innermost first; the others stay."""
    for folder in reversed(folders):
        try:
            os.rmdir(folder)
        except OSError:
            pass

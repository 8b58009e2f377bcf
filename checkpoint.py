"""Checkpoints that survive crashes and refuse foreign code.

A checkpoint is a dict of tensors and plain Python data (model, ema, optimizer, step, epoch,
data position, RNG states, config as a dict, class names). Each is written to a temporary file
in the same folder, fsynced, then renamed over its final name, so a crash at any moment
leaves either the old file or the new one (a killed writer's temp file is removed by the next
save). `latest.pt` is a copy of the newest `step_XXXXXXX.pt`; resuming tries the newest step file,
then latest.pt (a kill between the two renames leaves it one checkpoint behind), then the older
step files, and skips any unreadable file with a warning. Loading always uses `weights_only=True`,
so a file that would run code when unpickled is refused.
"""
import os
import pickle
import re
import shutil
import warnings

import torch

STEP_FILE = re.compile(r"^step_(\d+)\.pt$")
TEMP_FILE = re.compile(r"^\..+\.pt\.tmp(\d+)$")  # what atomic_save/_copy_latest leave if killed


class CheckpointError(Exception):
    """A checkpoint that cannot be used, explained in one sentence."""


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


def _alive(pid):
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
        if m and (int(m.group(1)) == os.getpid() or not _alive(int(m.group(1)))):
            os.remove(os.path.join(folder, name))


def save_checkpoint(state, folder, keep_last=3, milestone_every=0):
    """Write step_<step>.pt, point latest.pt at it, prune old ones. Returns the path."""
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


def remove_empty(folders):
    """Remove those of `folders` that are still empty, innermost first; the others stay."""
    for folder in reversed(folders):
        try:
            os.rmdir(folder)
        except OSError:
            pass

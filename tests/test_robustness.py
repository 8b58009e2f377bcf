"""Crash-proof training and hostile inputs (issue 5).

Exact resume, atomic checkpoints with fallback, SIGINT/SIGTERM/SIGKILL, safe loading, config
mismatch, non-finite losses and weights, a matrix of bad images, full or unwritable folders.

Exit codes, as tested here: SIGINT or SIGTERM saves a checkpoint and exits 0 (the run is
resumable and the last line says how); a second Ctrl-C exits 130 at once; a fatal user error
exits 1 with one line starting 'error:'.

Runs use the tiny preset on 10 images of ~20 px with batch 4: an epoch is 2 steps, so every odd
step ends mid-epoch. Killed runs are child processes (forked, or spawned afresh on a GPU
machine) paused at exact points by the hooks of tests/kill_test.py; the Ctrl-C test runs the
real `python train.py`.
"""
import errno
import filecmp
import glob
import multiprocessing
import os
import pickle
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import types
import warnings
import zlib

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
import config  # noqa: E402
import diffusion  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from checkpoint import CheckpointError, load_checkpoint, save_checkpoint, step_files  # noqa: E402
import dataset  # noqa: E402
from dataset import DataError, ImageCache, draw_panda, held_out_files  # noqa: E402

import kill_test  # noqa: E402

STEPS = 12
RUN_DIR = os.path.join("ck", "tiny")
WAIT = 120  # seconds to wait for a child to reach a pause point before failing (not a timing assertion)


# ---------------------------------------------------------------------------------------------
# helpers


def make_images(folder, n=10):
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        draw_panda(random.Random(i), 18 + i % 4).save(os.path.join(folder, f"panda_{i:02d}.png"))


def argv(*extra, steps=STEPS, workers=0):
    """Flags of a tiny CPU run; every output lands in the current (temporary) folder."""
    return ["--preset", "tiny", "--device", "cpu", "--data-dir", "imgs", "--ckpt-dir", "ck", "--log-dir", "tb",
            "--cache-dir", "cache", "--batch-size", "4", "--num-workers", str(workers), "--max-steps", str(steps),
            "--ckpt-every", "3", "--sample-every", "4", "--hist-every", "4", "--no-log-graph", *map(str, extra)]


def run(*extra, steps=STEPS, workers=0):
    train.main(argv(*extra, steps=steps, workers=workers))


def writer_threads():
    """TensorBoard's event-writer threads now alive: one a run leaves behind writes into a folder a later test removed."""
    return {t for t in threading.enumerate() if type(t).__name__ == "_AsyncWriterThread"}


def latest():
    return load_checkpoint(os.path.join(RUN_DIR, "latest.pt"))


def temp_files(folder=RUN_DIR):
    return sorted(n for n in os.listdir(folder) if ".tmp" in n)


def assert_same_training_state(a, b):
    """Bitwise equality of everything a resumed run carries on with."""
    keys = ("step", "epoch", "epoch_pos", "epoch_loss_sum", "epoch_batches", "bad_steps")
    assert [a[k] for k in keys] == [b[k] for k in keys]
    for part in ("model", "ema"):
        for name, value in a[part].items():
            assert torch.equal(value, b[part][name]), f"{part}.{name} differs"
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for index, slots in a["optimizer"]["state"].items():
        for slot, value in slots.items():
            assert torch.equal(value, b["optimizer"]["state"][index][slot]), f"optimizer state {index}.{slot} differs"
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]) and a["rng"]["python"] == b["rng"]["python"]


@pytest.fixture(autouse=True)
def sandbox(tmp_path, monkeypatch):
    """cwd = a fresh folder with 10 images; one thread; signal handlers restored afterwards."""
    monkeypatch.chdir(tmp_path)
    make_images("imgs")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same in every run and child, so that results can be bitwise equal
    yield tmp_path
    torch.set_num_threads(threads)
    for s, h in handlers.items():
        signal.signal(s, h)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The state after STEPS uninterrupted steps: every interrupted-and-resumed run must equal it."""
    folder, cwd, threads = tmp_path_factory.mktemp("straight"), os.getcwd(), torch.get_num_threads()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    os.chdir(folder)
    torch.set_num_threads(1)
    try:
        make_images("imgs")
        run()
        return latest()
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
        for s, h in handlers.items():
            signal.signal(s, h)


# Killed runs are train.main under kill_test's hooks in a child process: forked where that is safe (torch
# is already imported, so a child starts at once), started afresh where there is a GPU, since a fork of a
# process that has run autograd on such a machine cannot run backward.
FORK_IS_SAFE = not (torch.cuda.is_available() or torch.backends.mps.is_available())
CHILDREN = multiprocessing.get_context("fork" if FORK_IS_SAFE else "spawn")


def start_train(log, pause, *extra):
    """A training child paused by kill_test at `pause`, its output in log."""
    open(log, "w").close()
    env = dict(KILL_TEST_PAUSE=pause, KILL_TEST_MARK=os.path.abspath(log + ".paused"))
    proc = CHILDREN.Process(target=kill_test.child_logged, args=(log, env, argv(*extra)))
    proc.start()
    return proc


def wait_for(condition, proc, log, what):
    """Poll until condition() holds; fail (and show the child's log) if the child (a multiprocessing
    Process or a subprocess.Popen) exits first."""
    deadline = time.time() + WAIT
    while not condition():
        done = proc.poll() is not None if isinstance(proc, subprocess.Popen) else not proc.is_alive()
        if done or time.time() > deadline:
            proc.kill() if not done else None
            pytest.fail(f"child never reached {what}; its log:\n{open(log).read()[-3000:]}")
        time.sleep(0.01)


def exit_status(proc):
    """('signal', n) or ('exit', code) of a finished child."""
    proc.join(WAIT)
    assert proc.exitcode is not None, f"child still running after {WAIT} s"
    return ("signal", -proc.exitcode) if proc.exitcode < 0 else ("exit", proc.exitcode)


def kill_at(pause, log, *extra):
    """Start a run, SIGKILL it at the pause point, return its log text."""
    proc = start_train(log, pause, *extra)
    wait_for(lambda: os.path.exists(log + ".paused"), proc, log, pause)
    proc.kill()
    assert exit_status(proc) == ("signal", signal.SIGKILL)
    return open(log).read()


def resumed_at(text):
    m = re.search(r"resuming 'tiny' from (\S+) at step (\d+)", text)
    return (os.path.basename(m.group(1)), int(m.group(2))) if m else None


# ---------------------------------------------------------------------------------------------
# exact resume


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_is_bitwise_exact(straight, workers):
    """N/2 steps + resume N/2 equals N straight steps: model, EMA, optimizer, counters, RNG, bit for bit."""
    run(steps=5, workers=workers)
    half = latest()
    assert (half["step"], half["epoch"], half["epoch_pos"]) == (5, 2, 4)  # stopped in the middle of epoch 2
    run(workers=workers)
    assert_same_training_state(latest(), straight)


def test_sigint_mid_epoch_then_resume_is_exact_and_tensorboard_continues(straight, monkeypatch, capsys):
    """A Ctrl-C at step 7 saves that step; the resumed run matches and continues TensorBoard's step axis."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    real_account, interrupted = train.account, []

    def account(run, progress, out):
        real_account(run, progress, out)
        if progress.step == 7 and not interrupted:
            interrupted.append(True)
            signal.raise_signal(signal.SIGINT)  # handled by distributed.Stopper, like a real Ctrl-C

    monkeypatch.setattr(train, "account", account)
    run()
    assert "SIGINT: saving a checkpoint and stopping" in capsys.readouterr().out
    assert latest()["step"] == 7
    monkeypatch.setattr(train, "account", real_account)
    run()
    assert resumed_at(capsys.readouterr().out) == ("step_0000007.pt", 7)
    assert_same_training_state(latest(), straight)
    # one reader per file: over the folder, tensorboard skips a file whose name sorts before the last one read, and
    # two writers of one process within one second differ only in a counter (.10 sorts before .9)
    readers = [EventAccumulator(f).Reload() for f in glob.glob(os.path.join("tb", "tiny", "events.*"))]
    steps = [e.step for r in readers if "Loss/batch" in r.Tags()["scalars"] for e in r.Scalars("Loss/batch")]
    assert sorted(steps) == [5, 10]  # the resumed run logged 10, not 5 again


def test_sigterm_while_waiting_for_a_batch_that_never_comes_saves_the_last_step(straight, monkeypatch, capsys):
    """A SIGTERM to the group reaches the trainer while it waits for a batch and kills the loader's workers:
    the loader then raises, and the trainer must still save its last finished step and resume exactly."""
    real_account, real_getitem = train.account, ImageCache.__getitem__
    state = {}

    def account(run, progress, out):
        real_account(run, progress, out)
        state["step"] = progress.step

    def getitem(self, item):
        if state.get("step") == 7:
            state["step"] = None
            signal.raise_signal(signal.SIGTERM)  # handled by distributed.Stopper
            raise RuntimeError("DataLoader worker (pid(s) 1234) exited unexpectedly")
        return real_getitem(self, item)

    monkeypatch.setattr(train, "account", account)
    monkeypatch.setattr(ImageCache, "__getitem__", getitem)
    run()
    out = capsys.readouterr().out
    assert "SIGTERM: saving a checkpoint and stopping" in out and "stopped at step 7" in out
    assert latest()["step"] == 7
    monkeypatch.setattr(ImageCache, "__getitem__", real_getitem)
    run()
    assert resumed_at(capsys.readouterr().out) == ("step_0000007.pt", 7)
    assert_same_training_state(latest(), straight)


# ---------------------------------------------------------------------------------------------
# kills and signals


def test_sigkill_at_several_points_resumes_from_a_readable_checkpoint(straight, capsys):
    """SIGKILL inside the first write, a later write, before latest.pt moves, and mid-epoch: every restart resumes."""
    log = kill_at("write:3", "1.log")  # inside the very first checkpoint write: nothing complete yet
    assert step_files(RUN_DIR) == [] and len(temp_files()) == 1
    log = kill_at("write:6", "2.log")  # so this run starts fresh (not an error) and dies writing step 6
    assert resumed_at(log) is None and "error" not in log
    assert [s for s, _ in step_files(RUN_DIR)] == [3] and len(temp_files()) == 1  # run 1's temp file was cleaned up
    log = kill_at("latest:9", "3.log")  # step_9.pt complete, latest.pt still at step 6
    assert resumed_at(log) == ("step_0000003.pt", 3)
    assert filecmp.cmp(os.path.join(RUN_DIR, "latest.pt"), os.path.join(RUN_DIR, "step_0000006.pt"), shallow=False)
    log = kill_at("step:11", "4.log")  # in the middle of training, mid-epoch, two steps after a checkpoint
    assert resumed_at(log) == ("step_0000009.pt", 9)  # the newest step file wins over a stale latest.pt
    run()
    assert resumed_at(capsys.readouterr().out) == ("step_0000009.pt", 9)
    assert temp_files() == []
    assert_same_training_state(latest(), straight)  # the lost steps were redone identically


def test_sigterm_saves_the_current_step_exits_0_and_resumes_exactly(straight, capsys):
    """SIGTERM at step 5 (mid-epoch): that step is saved, exit 0, and the resumed run equals the straight one."""
    proc = start_train("t.log", "step:5")
    wait_for(lambda: os.path.exists("t.log.paused"), proc, "t.log", "step 5")
    proc.terminate()
    assert exit_status(proc) == ("exit", 0)
    text = open("t.log").read()
    assert "SIGTERM: saving a checkpoint and stopping" in text and "stopped at step 5 (run the same command to continue)" in text
    assert latest()["step"] == 5
    run()
    assert resumed_at(capsys.readouterr().out) == ("step_0000005.pt", 5)
    assert_same_training_state(latest(), straight)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_on_python_train_py_with_workers_saves_and_exits_0(sig, capsys):
    """Ctrl-C (or `timeout`'s SIGTERM) to the process group of `python train.py` (2 loader workers): saved, no
    traceback, exit 0, resumable. SIGTERM kills the workers, which must not break the last save."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open("c.log", "w") as log:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *argv(steps=100000, workers=2)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_for(lambda: step_files(RUN_DIR), proc, "c.log", "the first checkpoint")
        os.killpg(proc.pid, sig)  # what a terminal does: the loader workers get it too
        rc = proc.wait(timeout=WAIT)
    text = open("c.log").read()
    assert rc == 0, text[-2000:]
    assert text.count(f"{sig.name}: saving a checkpoint and stopping") == 1  # workers stay quiet
    assert "Traceback" not in text and not re.search(r"\w+Error", text), text[-2000:]
    step = int(re.search(r"stopped at step (\d+) \(run the same command to continue\)", text).group(1))
    assert latest()["step"] == step
    run(steps=step + 1)
    assert resumed_at(capsys.readouterr().out) == (f"step_{step:07d}.pt", step)


@pytest.mark.parametrize("requested", [False, True])
@pytest.mark.parametrize("error", [RuntimeError("DataLoader worker (pid(s) 1) exited unexpectedly"), EOFError()],
                         ids=["worker-exited", "died-mid-batch"])
def test_a_loader_failing_after_a_stop_request_ends_the_epoch_instead_of_raising(requested, error):
    """Dead loader workers (a SIGTERM to the group kills them too; one killed while handing over a batch leaves the
    trainer an EOFError) must not cost the last save; before any stop request the same failure is real and propagates."""
    def dying_loader():
        yield "batch 0"
        raise error

    stopper = types.SimpleNamespace(requested=requested)
    if requested:
        assert list(train.loader_batches(dying_loader(), stopper)) == ["batch 0"]
    else:
        with pytest.raises(type(error), match=re.escape(str(error)) or None):
            list(train.loader_batches(dying_loader(), stopper))


@pytest.mark.parametrize("error", [ValueError("a bad batch"), RuntimeError("CUDA error: out of memory")])
def test_a_loader_failing_otherwise_after_a_stop_request_still_raises(error):
    """Only the loader's own dead-worker error is taken for the stop's doing: any other error is real, stop or not."""
    def failing_loader():
        yield "batch 0"
        raise error

    with pytest.raises(type(error), match=str(error)):
        list(train.loader_batches(failing_loader(), types.SimpleNamespace(requested=True)))


@pytest.mark.parametrize("during", ["load_data", "log_start"])
def test_ctrl_c_before_training_starts_exits_130_without_a_traceback(during, monkeypatch, capsys):
    """Ctrl-C while images are decoded or the model is built and logged (no Stopper yet) is a one-line exit 130,
    not a KeyboardInterrupt trace."""
    monkeypatch.setattr(train, during, lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    before = writer_threads()
    with pytest.raises(SystemExit) as e:
        run()
    assert e.value.code == 130 and "interrupted before training started; nothing to save" in capsys.readouterr().out
    assert writer_threads() - before == set()  # the writer opened before log_start is closed, not left running


def test_second_ctrl_c_during_a_save_exits_130_and_loses_nothing(straight, capsys):
    """Ctrl-C twice while step 6 is being written: exit 130 at once; step 3 intact; the next run resumes exactly."""
    proc = start_train("c.log", "write:6")
    wait_for(lambda: os.path.exists("c.log.paused"), proc, "c.log", "the write of step 6")
    os.kill(proc.pid, signal.SIGINT)
    wait_for(lambda: "SIGINT: saving" in open("c.log").read(), proc, "c.log", "the first SIGINT")
    os.kill(proc.pid, signal.SIGINT)
    assert exit_status(proc) == ("exit", 130)
    assert [s for s, _ in step_files(RUN_DIR)] == [3] and len(temp_files()) == 1
    run()
    assert resumed_at(capsys.readouterr().out) == ("step_0000003.pt", 3)
    assert temp_files() == []
    assert_same_training_state(latest(), straight)


# ---------------------------------------------------------------------------------------------
# checkpoint files


def test_a_truncated_checkpoint_loses_no_step(straight, capsys):
    """latest.pt is a copy, so truncating it in place leaves the step file whole (training resumes at step 6);
    a truncated newest step file is named in one warning and its copy, latest.pt, is used instead."""
    run(steps=6)
    with open(os.path.join(RUN_DIR, "latest.pt"), "r+b") as f:
        f.truncate(1000)
    run(steps=7)
    assert resumed_at(capsys.readouterr().out) == ("step_0000006.pt", 6)
    with open(os.path.join(RUN_DIR, "step_0000007.pt"), "r+b") as f:
        f.truncate(1000)
    with pytest.warns(UserWarning, match=r"skipping unusable checkpoint: 'ck/tiny/step_0000007\.pt' is truncated or not a checkpoint"):
        run()
    assert resumed_at(capsys.readouterr().out) == ("latest.pt", 7)
    assert_same_training_state(latest(), straight)


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start():
    """When every checkpoint is unreadable, train.py stops with a clear error instead of silently starting over."""
    run(steps=6)
    for path in [p for _, p in step_files(RUN_DIR)] + [os.path.join(RUN_DIR, "latest.pt")]:
        with open(path, "r+b") as f:
            f.truncate(100)
    before = sorted(os.listdir(RUN_DIR))
    with pytest.warns(UserWarning, match="skipping unusable checkpoint"), pytest.raises(SystemExit) as e:
        run()
    assert str(e.value) == ("error: no readable checkpoint in 'ck/tiny' (step_0000006.pt, latest.pt, step_0000003.pt: see the "
                            "warnings above); use --fresh to start over (the old files are kept aside) or another --run name")
    assert sorted(os.listdir(RUN_DIR)) == before


def test_a_file_without_model_or_config_is_not_a_checkpoint():
    """A torch file that lacks the model or the config is refused in one line (so a resume skips it for an older
    readable one), not a KeyError later."""
    for state in ({"model": {}, "step": 0}, {"config": {}, "step": 0}, [1, 2]):
        torch.save(state, "x.pt")
        with pytest.raises(CheckpointError, match=r"^'x.pt' is not a checkpoint written by this project's train.py"):
            load_checkpoint("x.pt")


def test_retention_keeps_the_last_k_and_the_milestones():
    """keep_last newest step files survive, plus every milestone_every-th step; latest.pt is the newest."""
    for step in range(1, 14):
        save_checkpoint({"model": {"w": torch.full((2,), float(step))}, "config": {}, "step": step}, "r",
                        keep_last=2, milestone_every=5)
    assert [s for s, _ in step_files("r")] == [13, 12, 10, 5]  # 11 pruned: not among the last 2, no milestone
    assert filecmp.cmp(os.path.join("r", "latest.pt"), os.path.join("r", "step_0000013.pt"), shallow=False)
    assert temp_files("r") == []


def test_a_second_train_py_on_a_live_run_is_refused_and_fresh_does_not_move_it(capsys):
    """While one train.py holds a run, another on the same run (resuming, or --fresh) stops in one line naming the
    holder, and writes or moves nothing; once the holder is gone the run resumes as usual."""
    run(steps=2)
    holder = checkpoint.hold_run(RUN_DIR)  # stands for a live train.py (a lock taken on another open file)
    before = sorted(os.listdir(RUN_DIR))
    for extra in ((), ("--fresh",)):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            run(*extra, steps=4)
        assert capsys.readouterr().out == ""  # not a word about resuming first
        assert str(e.value) == (f"error: run folder '{RUN_DIR}' is in use by another train.py (pid {os.getpid()}); "
                                "wait for it or stop it, or pass --run NAME to train another run")
        assert sorted(os.listdir(RUN_DIR)) == before and not glob.glob(RUN_DIR + "-old-*")
    train.main([*argv(steps=4), "--print-config"])  # only shows the settings: no reason to refuse
    assert '"max_steps": 4' in capsys.readouterr().out
    holder.close()
    run(steps=4)
    assert latest()["step"] == 4


@pytest.mark.skipif(checkpoint.fcntl is None, reason="no file locks on this platform")
def test_a_file_system_that_cannot_lock_trains_unchecked(monkeypatch):
    """Some network mounts refuse locks (ENOLCK, or EBADF for a lock they cannot take): a run there goes on as on a
    platform without locks, and resumes, instead of failing on the lock."""
    def refuse(*args):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(checkpoint.fcntl, "flock", refuse)
    run(steps=2)
    run(steps=4)
    assert latest()["step"] == 4


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_killed_runs_lock_is_not_kept_by_its_forked_workers():
    """DataLoader workers are forked and would share the run's lock: after a SIGKILL of train.py they live on for
    seconds, and the same command run again at once would be refused. A fork closes the lock in the child."""
    os.makedirs(RUN_DIR)
    holder = checkpoint.hold_run(RUN_DIR)
    child = os.fork()
    if child == 0:  # a worker that outlives its parent's lock file
        time.sleep(5)
        os._exit(0)
    try:
        holder.close()  # as the killed train.py's own file is closed by the kernel
        deadline = time.time() + 3  # the child closes its copy just after the fork returns here
        while True:
            try:
                checkpoint.hold_run(RUN_DIR).close()  # the same command again: not refused
                break
            except CheckpointError:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_milestones_are_saved_when_ckpt_every_does_not_divide_them():
    """A milestone is a checkpoint kept for good: it is written at its step even when --ckpt-every skips that step."""
    run("--ckpt-every", 3, "--milestone-every", 4, "--keep-last", 1, steps=8)
    assert [s for s, _ in step_files(RUN_DIR)] == [8, 4]


@pytest.mark.parametrize("where", ["step file", "latest.pt"])
def test_disk_full_during_a_save_is_a_clear_error_and_keeps_the_previous_checkpoint(monkeypatch, where):
    """ENOSPC in the middle of writing: one-line error, the previous latest.pt still loads, no temp file left."""
    run(steps=3)

    def full(src_or_obj, dst, *args, **kwargs):  # stands in for torch.save / shutil.copyfile
        f = open(dst, "wb") if isinstance(dst, str) else dst
        f.write(b"half a checkpoint")
        f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch, pytest.raises(SystemExit) as e:
        if where == "step file":
            patch.setattr(checkpoint.torch, "save", full)
        else:  # the step file is written; copying it to latest.pt fails
            patch.setattr(checkpoint.shutil, "copyfile", full)
        run(steps=6)
    assert str(e.value) == ("error: could not write a checkpoint to ck/tiny ([Errno 28] No space left on device); "
                            "free space or choose another --ckpt-dir (the previous checkpoint is intact)")
    assert latest()["step"] == 3 and temp_files() == []
    assert checkpoint.load_latest(RUN_DIR)[0]["step"] == (3 if where == "step file" else 6)


@pytest.mark.parametrize("case", ["ckpt under a file", "log under a file", "disk full", "read-only"])
def test_unwritable_output_folder_is_refused_before_any_work(monkeypatch, case):
    """An unwritable or full checkpoint/log folder stops train.py at start, before decoding any image."""
    open("blocker", "w").close()
    flags = {"ckpt under a file": ["--ckpt-dir", "blocker/ck"], "log under a file": ["--log-dir", "blocker/tb"]}.get(case, [])
    if case == "disk full":
        real_open = open
        monkeypatch.setattr("builtins.open", lambda path, *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
                            if ".write_test" in str(path) else real_open(path, *a, **k))
    if case == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root ignores file permissions; 'disk full' and 'under a file' cover the same code path")
        os.makedirs(RUN_DIR)
        os.chmod(RUN_DIR, 0o500)
    with pytest.raises(SystemExit) as e:
        run(*flags)
    folder = {"ckpt under a file": "blocker/ck/tiny", "log under a file": "blocker/tb/tiny"}.get(case, RUN_DIR)
    reason = {"disk full": "No space left on device", "read-only": "Permission denied"}.get(case, "Not a directory")
    assert str(e.value) == (f"error: cannot write to '{folder}' ({reason}); "
                            "fix its permissions/free space or pass another --ckpt-dir/--log-dir")
    assert not os.path.exists("cache")  # checked before the images were decoded


# ---------------------------------------------------------------------------------------------
# hostile checkpoints


class _System:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch '{self.path}'",)


class _Open:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def write_malicious(kind, path, marker):
    """A checkpoint-shaped file whose unpickling would create `marker`."""
    if kind == "torch zip, os.system":
        torch.save({"model": _System(marker), "config": {}, "step": 0}, path)
    elif kind == "torch legacy, open()":
        torch.save({"model": _Open(marker), "config": {}, "step": 0}, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            pickle.dump({"model": _System(marker), "config": {}, "step": 0}, f, protocol=2)


@pytest.mark.parametrize("kind", ["torch zip, os.system", "torch legacy, open()", "raw pickle, os.system"])
def test_malicious_checkpoint_is_refused_everywhere_and_runs_nothing(kind):
    """A pickle that would create a file is refused by load_checkpoint, sample.py and train.py; no file appears."""
    marker = os.path.abspath("pwned")
    write_malicious(kind, "evil.pt", marker)
    refused = r"'.*' was refused: it (asks to import \S+|holds objects other than tensors).*could run code when unpickled"
    with pytest.raises(CheckpointError, match=refused):
        load_checkpoint("evil.pt")
    with pytest.raises(SystemExit, match="^error: " + refused):
        sample.main(["--ckpt", "evil.pt", "--device", "cpu", "--out", "out"])
    os.makedirs(RUN_DIR)
    shutil.copy("evil.pt", os.path.join(RUN_DIR, "step_0000003.pt"))
    with pytest.warns(UserWarning, match=refused), pytest.raises(SystemExit, match="no readable checkpoint in 'ck/tiny'"):
        run()
    with pytest.warns(UserWarning, match=refused), pytest.raises(SystemExit, match="no readable checkpoint in 'ck/tiny'"):
        sample.main(["--ckpt-dir", "ck", "--device", "cpu", "--out", "out"])
    assert not os.path.exists(marker) and not os.path.exists("out")
    if kind == "torch zip, os.system":  # the payload is live: an unsafe load would have run it
        torch.load("evil.pt", weights_only=False)
        assert os.path.exists(marker)


# ---------------------------------------------------------------------------------------------
# configuration changes on resume


def test_architecture_change_is_refused_with_the_fields_and_the_way_out(capsys):
    """Different shapes are refused with each differing field and --fresh/--run; lr/log changes are allowed and logged."""
    run(steps=3)
    with pytest.raises(SystemExit) as e:
        run("--emb-dim", 64, "--depth", 3, steps=6)
    assert str(e.value) == ("error: run 'tiny' (ck/tiny/step_0000003.pt) was trained with a different architecture "
                            "(emb_dim 32 -> 64; depth 2 -> 3); drop those flags to resume it, or use --fresh to start "
                            "over (old files are moved aside) or --run NAME for a new run")
    with pytest.raises(SystemExit, match=r"\(image_size 16 -> 64; emb_dim 32 -> 128; depth 2 -> 4; num_heads 2 -> 4; "
                                          r"head_dim 16 -> 32; prediction eps -> v\); .*--fresh"):
        train.main([*argv(steps=6), "--preset", "panda64", "--run", "tiny"])  # a new preset brings its own shapes
    for label in ("a", "b"):
        make_images(os.path.join("labelled", label), 2)
    with pytest.raises(SystemExit, match=r"\(num_labels 1 -> 2\); .*--fresh .*--run NAME"):
        train.main([*argv(steps=6), "--data-dir", "labelled"])
    capsys.readouterr()
    run("--lr", "0.002", "--log-every", 2, steps=6)
    assert "resuming 'tiny' from ck/tiny/step_0000003.pt at step 3; changed: lr 0.001 -> 0.002, max_steps 3 -> 6, " \
           "log_every 5 -> 2" in capsys.readouterr().out
    assert latest()["step"] == 6 and latest()["config"]["lr"] == 0.002
    run("--fresh", "--emb-dim", 64, steps=3)
    assert latest()["config"]["emb_dim"] == 64 and any(n.startswith("tiny-old-") for n in os.listdir("ck"))


def test_checkpoint_older_than_a_field_resumes_with_the_field_default(capsys):
    """A run saved before prediction/noise_schedule/mlp_act existed resumes as what it was (eps, linear, GELU),
    silently; asking it for the cosine schedule is refused like any other architecture change."""
    run(steps=3)
    state = latest()
    for field in ("prediction", "noise_schedule", "mlp_act"):
        del state["config"][field]
    save_checkpoint(state, RUN_DIR)
    capsys.readouterr()
    run(steps=6)
    out = capsys.readouterr().out
    assert "resuming 'tiny'" in out and "noise_schedule" not in out and "prediction" not in out and "mlp_act" not in out
    assert latest()["step"] == 6 and latest()["config"]["noise_schedule"] == "linear"
    assert latest()["config"]["mlp_act"] == "gelu"
    with pytest.raises(SystemExit, match=r"\(noise_schedule linear -> cosine\); .*--fresh"):
        run("--noise-schedule", "cosine", steps=9)


# ---------------------------------------------------------------------------------------------
# non-finite losses and weights


def poison_loss(monkeypatch, bad_calls):
    """Make the training loss NaN on the given (1-based) calls."""
    real, calls = diffusion.Diffusion.training_loss, []

    def training_loss(self, *args, **kwargs):
        loss, eps, noise = real(self, *args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if bad_calls(len(calls)) else loss), eps, noise

    monkeypatch.setattr(diffusion.Diffusion, "training_loss", training_loss)


def test_nonfinite_loss_skips_the_update_and_is_counted(monkeypatch, capsys):
    """A NaN loss at step 2 leaves weights, EMA and Adam state untouched, is logged, and training goes on."""
    logged = []
    monkeypatch.setattr(train.Logger, "scalars", lambda self, step, **v: logged.append((step, v)))
    poison_loss(monkeypatch, lambda call: call == 2)
    run("--ckpt-every", 1, "--keep-last", 10, steps=4)
    s1, s2, s3 = (load_checkpoint(os.path.join(RUN_DIR, f"step_{i:07d}.pt")) for i in (1, 2, 3))
    for part in ("model", "ema"):
        assert all(torch.equal(s1[part][k], s2[part][k]) for k in s1[part])
        assert not all(torch.equal(s2[part][k], s3[part][k]) for k in s2[part])
    assert all(torch.equal(s1["optimizer"]["state"][i]["step"], s2["optimizer"]["state"][i]["step"]) for i in s1["optimizer"]["state"])
    assert (s2["bad_steps"], s3["bad_steps"], s3["skipped_steps"]) == (1, 0, 1)
    assert (2, {"Train/skipped_nonfinite": 1}) in logged
    assert "warning: non-finite loss or gradient at step 2: update skipped (1 in a row, 1 in all)" in capsys.readouterr().out


def test_k_consecutive_nonfinite_losses_stop_training_with_a_message(monkeypatch):
    """max_bad_steps NaN losses in a row stop the run with one sentence; the last checkpoint is finite and kept."""
    poison_loss(monkeypatch, lambda call: call > 3)
    before = writer_threads()
    with pytest.raises(SystemExit) as e:
        run("--max-bad-steps", 4)
    assert str(e.value) == ("error: 4 consecutive non-finite losses/gradients at step 7; lower --lr or --grad-clip "
                            "(the last good checkpoint is kept)")
    assert writer_threads() - before == set()  # the TensorBoard writer was closed on the way out, not left running
    assert [s for s, _ in step_files(RUN_DIR)] == [6, 3]  # step 6 had skipped updates but finite weights
    assert all(torch.isfinite(t).all() for t in latest()["model"].values())


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")  # TensorBoard's sample grid of NaN weights
def test_nonfinite_weights_are_never_written(monkeypatch, capsys):
    """Weights that became NaN are not saved: checkpoints stop at the last finite step, then training stops."""
    real_step, calls = train.train_step, []

    def train_step(train_model, *args, **kwargs):
        out = real_step(train_model, *args, **kwargs)
        calls.append(1)
        if len(calls) == 4:
            next(train_model.parameters()).data.fill_(float("nan"))  # a finite loss, then a blown-up update
        return out

    monkeypatch.setattr(train, "train_step", train_step)
    with pytest.raises(SystemExit, match="consecutive non-finite"):
        run("--max-bad-steps", 3)
    assert "warning: weights are not finite at step 6; checkpoint NOT written" in capsys.readouterr().out
    assert [s for s, _ in step_files(RUN_DIR)] == [3]
    for _, path in step_files(RUN_DIR):
        state = load_checkpoint(path)
        assert all(torch.isfinite(t).all() for part in ("model", "ema") for t in state[part].values())


# ---------------------------------------------------------------------------------------------
# the bad-input matrix


def png_declaring(width, height):
    """A tiny PNG whose header claims width x height pixels: a decompression bomb without the bytes."""
    Image.new("RGB", (1, 1)).save("one.png")
    data = bytearray(open("one.png", "rb").read())
    ihdr = bytes(data[12:17 + 12])  # b'IHDR' + 13 bytes of header data
    ihdr = ihdr[:4] + struct.pack(">II", width, height) + ihdr[12:]
    data[12:12 + 17] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    os.remove("one.png")
    return bytes(data)


def write_bad(kind, folder, monkeypatch):
    """One unusable file of the given kind in folder; returns (its name, the reason the warning gives)."""
    def path(name):
        return os.path.join(folder, name)
    if kind == "zero-byte file":
        open(path("empty.jpg"), "wb").close()
        return "empty.jpg", "empty file"
    if kind == "truncated JPEG":
        draw_panda(random.Random(0), 64).save("whole.jpg", quality=95)
        data = open("whole.jpg", "rb").read()
        open(path("truncated.jpg"), "wb").write(data[:len(data) // 2])
        return "truncated.jpg", "truncated"
    if kind == "text file named .jpg":
        open(path("text.jpg"), "w").write("not a panda\n")
        return "text.jpg", "not an image"
    if kind == "decompression bomb":
        open(path("bomb.png"), "wb").write(png_declaring(100_000, 100_000))
        return "bomb.png", f"100000x100000 is over PIL's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels"
    if kind == "unreadable permissions":
        draw_panda(random.Random(0), 20).save(path("locked.jpg"), "PNG")
        os.chmod(path("locked.jpg"), 0)
        if os.geteuid() == 0:  # root reads anything: make opening this one file fail as it would for a user
            real_open = open
            monkeypatch.setattr("builtins.open", lambda p, *a, **k: (_ for _ in ()).throw(
                PermissionError(errno.EACCES, "Permission denied", p)) if str(p).endswith("locked.jpg") else real_open(p, *a, **k))
        return "locked.jpg", "permission denied"
    if kind == "symlink loop":
        os.symlink("loop.jpg", path("loop.jpg"))
        return "loop.jpg", "symlink loop"
    if kind == "dangling symlink":
        os.symlink("gone.jpg", path("dangling.jpg"))
        return "dangling.jpg", "dangling link"
    if kind == "FIFO named .jpg":
        os.mkfifo(path("fifo.jpg"))
        return "fifo.jpg", "not a regular file"
    raise ValueError(kind)


BAD = ["zero-byte file", "truncated JPEG", "text file named .jpg", "decompression bomb", "unreadable permissions",
       "symlink loop", "dangling symlink", "FIFO named .jpg"]


def cache_of(folder):
    """ImageCache of folder at 16 px, with every warning it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = ImageCache(folder, 16, "cache")
    return data, [str(w.message) for w in caught]


@pytest.mark.parametrize("kind", BAD)
def test_unusable_file_is_skipped_with_one_summary_warning(kind, monkeypatch):
    """Each kind of unusable file is skipped; one warning names it and says why; the good image is kept."""
    os.makedirs("d")
    Image.new("RGB", (20, 20), (200, 30, 30)).save(os.path.join("d", "good.png"))
    name, reason = write_bad(kind, "d", monkeypatch)
    data, caught = cache_of("d")
    assert data.files == [os.path.join("d", "good.png")]
    assert caught == [f"skipped 1 of 2 image files in 'd' that cannot be used: {name} ({reason})"]


def test_many_unusable_files_give_one_warning_with_count_and_first_names(monkeypatch):
    """All bad kinds in one folder: exactly one warning, with the count and the first five names."""
    os.makedirs("d")
    Image.new("RGB", (20, 20)).save(os.path.join("d", "good.png"))
    for kind in BAD:
        write_bad(kind, "d", monkeypatch)
    data, caught = cache_of("d")
    assert len(data) == 1 and len(caught) == 1
    assert caught[0] == (f"skipped {len(BAD)} of {len(BAD) + 1} image files in 'd' that cannot be used: "
                         f"bomb.png (100000x100000 is over PIL's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} "
                         "pixels), dangling.jpg (dangling link), empty.jpg (empty file), fifo.jpg (not a regular file), "
                         "locked.jpg (permission denied), ...")


def odd_image(kind, path):
    """An unusual but valid image; returns the RGB pixel its centre must decode to."""
    if kind == "PNG named .jpg":
        Image.new("RGB", (20, 20), (10, 200, 30)).save(path, "PNG")
        return (10, 200, 30)
    if kind == "grayscale":
        Image.new("L", (20, 20), 90).save(path, "JPEG", quality=100)
        return (90, 90, 90)
    if kind == "LA":
        Image.new("LA", (20, 20), (0, 0)).save(path, "PNG")  # fully transparent black -> white
        return (255, 255, 255)
    if kind == "palette with transparency":
        img = Image.new("P", (20, 20), 1)
        img.putpalette([0, 0, 0, 20, 40, 220] + [0] * 762)
        img.save(path, "PNG", transparency=0)  # index 0 transparent, the image uses opaque index 1
        return (20, 40, 220)
    if kind == "RGBA":
        Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(path, "PNG")  # transparent red -> white
        return (255, 255, 255)
    if kind == "CMYK JPEG":
        Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(path, "JPEG", quality=100)  # pure red in ink
        return (255, 0, 0)
    if kind == "16-bit PNG":
        Image.frombytes("I;16", (20, 20), struct.pack("<H", 40000) * 400).save(path, "PNG")
        return (40000 // 256,) * 3
    if kind == "8x8":
        Image.new("RGB", (8, 8), (1, 2, 3)).save(path, "PNG")
        return (1, 2, 3)
    if kind == "JPEG over the pixel limit":  # fine: libjpeg decodes it at 1/4 scale, under the limit
        Image.new("RGB", (100, 100), (30, 60, 90)).save(path, "JPEG", quality=100)
        return (30, 60, 90)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["PNG named .jpg", "grayscale", "LA", "palette with transparency", "RGBA",
                                  "CMYK JPEG", "16-bit PNG", "8x8", "JPEG over the pixel limit"])
def test_unusual_but_valid_images_load_as_rgb(kind, monkeypatch):
    """Odd modes and sizes decode to 16x16 RGB with the right colours and no warning."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # the 100x100 JPEG is over it, as decoded it is not
    os.makedirs("d")
    expected = odd_image(kind, os.path.join("d", "img.jpg"))
    data, caught = cache_of("d")
    assert caught == [] and len(data) == 1
    x, _ = data[(0, False)]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8
    assert all(abs(int(x[c, 8, 8]) - expected[c]) <= 3 for c in range(3)), (x[:, 8, 8].tolist(), expected)


def test_symlinked_folder_loop_is_not_followed():
    """A sub-folder linking back to the data folder is neither a label nor a source of duplicates."""
    make_images("d", 2)
    os.symlink(".", os.path.join("d", "self"))
    os.symlink("..", os.path.join("d", "up"))
    data, caught = cache_of("d")
    assert data.classes == ["d"] and len(data) == 2 and caught == []


@pytest.mark.parametrize("case", ["missing folder", "a file, not a folder", "empty folder", "folder of non-images",
                                  "only unusable files"])
def test_no_usable_image_is_a_fatal_clear_error(case, monkeypatch):
    """No usable image at all: train.py exits with one sentence naming the folder and the fix."""
    if case == "a file, not a folder":
        open("d", "w").close()
    elif case != "missing folder":
        os.makedirs("d")
    if case == "folder of non-images":
        for name in ("notes.txt", "labels.csv", "model.pt"):
            open(os.path.join("d", name), "w").write("x")
    if case == "only unusable files":
        write_bad("zero-byte file", "d", monkeypatch)
        os.symlink("loop.jpg", os.path.join("d", "loop.jpg"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SystemExit) as e:
            train.main([*argv(), "--data-dir", "d"])
    expected = {
        "missing folder": "error: data folder 'd' does not exist; pass --data-dir with a folder of images",
        "a file, not a folder": "error: data folder 'd' is not a folder; pass --data-dir with a folder of images",
        "only unusable files": "error: none of the 2 image files in 'd' can be used (empty.jpg (empty file), "
                               "loop.jpg (symlink loop)); add JPEG/PNG photos or pass another --data-dir",
    }.get(case, "error: no images (.jpg, .jpeg, .png, .bmp, .gif, .webp, .tif, .tiff) found in 'd'; "
                "add some or point --data-dir elsewhere")
    assert str(e.value) == expected


def test_loose_images_beside_label_folders_are_a_clear_error():
    """Photos next to label sub-folders would be dropped without a word: refused, naming both and the fix."""
    make_images("d", 2)
    make_images(os.path.join("d", "red"), 2)
    with pytest.raises(SystemExit) as e:
        train.main([*argv(), "--data-dir", "d"])
    assert str(e.value) == ("error: data folder 'd' holds both 2 images and label sub-folders (red); move the loose "
                            "images into a sub-folder of their own, or pass --data-dir with one of the sub-folders")


def test_procedural_pandas_appear_only_when_all_are_drawn(monkeypatch):
    """An interrupted drawing leaves no data folder (so no partial dataset is trained on); the next one completes."""
    def one_then_ctrl_c(items, **kwargs):
        yield next(iter(items))
        raise KeyboardInterrupt
    real_tqdm = dataset.tqdm
    monkeypatch.setattr(dataset, "tqdm", one_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        dataset.generate_pandas("data", 3, size=32)
    assert not os.path.exists("data") and not glob.glob("data.part*")
    monkeypatch.setattr(dataset, "tqdm", real_tqdm)
    dataset.generate_pandas("data", 3, size=32)
    assert sorted(os.listdir("data")) == ["panda_00000.png", "panda_00001.png", "panda_00002.png"]
    assert not glob.glob("data.part*")


def test_two_runs_drawing_the_pandas_at_once_both_go_on(monkeypatch):
    """Two trainings started together on a fresh clone both draw the pandas: each into its own folder, and the one
    that finishes second keeps the first one's folder instead of failing; a killed run's drawing is cleared."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.makedirs(f"data.part{dead.pid}")  # what a SIGKILLed drawing leaves
    real_tqdm = dataset.tqdm

    def the_other_run_finishes_first(items, **kwargs):
        yield from real_tqdm(items, **kwargs)
        make_images("data", n=2)
    monkeypatch.setattr(dataset, "tqdm", the_other_run_finishes_first)
    dataset.generate_pandas("data", 3, size=32)
    assert sorted(os.listdir("data")) == ["panda_00.png", "panda_01.png"]
    assert not glob.glob("data.part*")


def test_budget_and_workers_of_one_invocation_do_not_follow_the_run(capsys):
    """--max-minutes and --num-workers belong to the command that gave them: a plain resume does not inherit them."""
    run("--max-minutes", 30, steps=3, workers=1)
    assert latest()["config"]["max_minutes"] == 30 and latest()["config"]["num_workers"] == 1
    plain = argv(steps=6)
    del plain[plain.index("--num-workers"):plain.index("--num-workers") + 2]
    train.main(plain)
    assert latest()["step"] == 6
    assert latest()["config"]["max_minutes"] == 0 and latest()["config"]["num_workers"] == 0  # the tiny preset's


def test_unwritable_cache_folder_is_a_clear_error():
    """An image cache folder that cannot be created is one DataError naming it and the flag to change."""
    open("blocker", "w").close()
    with pytest.raises(DataError) as e:
        ImageCache("imgs", 16, os.path.join("blocker", "cache"))
    assert str(e.value) == ("cannot create the image cache folder 'blocker/cache' (Not a directory); "
                            "pass another --cache-dir")


def test_cache_is_rebuilt_when_an_image_changes_but_not_its_size():
    """The cache key holds each file's modification time: an image rewritten at the same byte size is decoded anew."""
    os.makedirs("d")
    path = os.path.join("d", "a.bmp")
    Image.new("RGB", (16, 16), (255, 0, 0)).save(path)
    assert ImageCache("d", 16, "c")[(0, False)][0][:, 8, 8].tolist() == [255, 0, 0]
    Image.new("RGB", (16, 16), (0, 0, 255)).save(path)  # a BMP: the same byte size
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert ImageCache("d", 16, "c")[(0, False)][0][:, 8, 8].tolist() == [0, 0, 255]


def cache_path(folder, size, cache_dir):
    return os.path.join(cache_dir, f"{dataset.cache_key(dataset.find_images(folder)[0], size)}.u8")


def test_a_cache_rewrite_cut_short_leaves_the_whole_file_list(monkeypatch):
    """A second run building the same cache that dies while writing its file list (a full disk, a kill) must not
    leave a truncated list beside the whole cache: every later run would silently train on the first few images."""
    assert len(ImageCache("imgs", 16, "c")) == 10
    path = cache_path("imgs", 16, "c")

    class CutShort(list):  # the list of kept files, whose writing fails after one line
        def __iter__(self):
            yield self[0]
            raise OSError(errno.ENOSPC, "No space left on device")

    decode = dataset.decode_all
    monkeypatch.setattr(dataset, "decode_all", lambda *a: (CutShort(decode(*a)[0]), []))
    with pytest.raises(DataError, match="No space left on device"):
        dataset.build_cache(dataset.find_images("imgs")[0], 16, path)
    monkeypatch.setattr(dataset, "decode_all", decode)  # not undo(): that would leave the sandbox's folder too
    assert len(ImageCache("imgs", 16, "c")) == 10
    assert sorted(os.listdir("c")) == sorted(os.path.basename(path) + ext for ext in ("", ".files"))


def test_a_hold_out_that_takes_a_whole_label_is_a_clear_error():
    """--holdout takes the last files in sorted order, so with label folders it can take every image of the last
    label; training would then never see that label, and its samples come from an untrained embedding."""
    make_images(os.path.join("labelled", "giant"), n=6)
    make_images(os.path.join("labelled", "red"), n=2)
    assert len(ImageCache("labelled", 16, "c", exclude=held_out_files("labelled", 1))) == 7
    with pytest.raises(DataError) as e:
        ImageCache("labelled", 16, "c", exclude=held_out_files("labelled", 3))
    assert str(e.value) == ("label folder(s) 'red' of 'labelled' keep no training image (the hold-out takes the last "
                            "files in sorted order); lower --holdout")
    os.makedirs(os.path.join("labelled", "aaa"))
    with open(os.path.join("labelled", "aaa", "bad.png"), "wb") as f:  # a label whose one image cannot be read
        f.write(b"not a png")
    with pytest.warns(UserWarning), pytest.raises(DataError, match=r"^label folder\(s\) 'aaa' .*\(none of its images can "
                                                                 r"be used\); add images it can read$"):
        ImageCache("labelled", 16, "c2", exclude=held_out_files("labelled", 1))  # the hold-out takes one of red's


def test_a_file_name_that_is_not_utf8_is_read_like_any_other():
    """Photos unzipped from another system can have names in another encoding (bytes that are not UTF-8): such an
    image trains like the rest, and the cache's file list reads back, instead of a UnicodeEncodeError traceback."""
    shutil.copy(os.path.join("imgs", "panda_00.png"), os.path.join(b"imgs", b"pand\xe4.png"))
    first = ImageCache("imgs", 16, "c")
    again = ImageCache("imgs", 16, "c")  # from the cache
    assert len(first) == len(again) == 11 and first.files == again.files
    assert torch.equal(again[(again.files.index(os.path.join("imgs", os.fsdecode(b"pand\xe4.png"))), False)][0],
                       again[(again.files.index(os.path.join("imgs", "panda_00.png")), False)][0])


def test_cache_temps_of_a_dead_process_are_removed_and_a_live_ones_kept():
    """A run killed while decoding leaves partial cache files; the next build removes them, not a live process's."""
    os.makedirs("c")
    path = cache_path("imgs", 16, "c")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name in (f"{path}.tmp{dead.pid}", f"{path}.files.tmp{dead.pid}", f"{path}.tmp1", f"{path}.files.tmp1"):
        open(name, "w").close()  # pid 1 is alive
    ImageCache("imgs", 16, "c")
    base = os.path.basename(path)
    assert sorted(n for n in os.listdir("c") if ".tmp" in n) == [f"{base}.files.tmp1", f"{base}.tmp1"]


def test_generated_pandas_all_differ():
    """Each procedural panda is drawn from its own seed: no two files are the same."""
    dataset.generate_pandas("data", 3, size=32)
    assert len({open(os.path.join("data", f), "rb").read() for f in os.listdir("data")}) == 3


def test_signal_handlers_are_given_back_after_training():
    """train.main catches Ctrl-C only while it trains: afterwards the caller's handlers are back."""
    mine = lambda signum, frame: None  # noqa: E731
    signal.signal(signal.SIGINT, mine)
    signal.signal(signal.SIGTERM, mine)
    run(steps=2)
    assert signal.getsignal(signal.SIGINT) is mine and signal.getsignal(signal.SIGTERM) is mine


def test_a_checkpoint_field_this_code_no_longer_has_is_ignored():
    """An older checkpoint's config with a field since removed still reads as a Config (the field dropped)."""
    assert config.config_from_dict({**vars(config.Config()), "removed_field": 1}) == config.Config()

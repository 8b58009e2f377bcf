"""SIGKILL tiny training runs at random moments, resume each time, and check that nothing is lost.

    python tests/kill_test.py                      # 20 kills; about 2-3 minutes on 2 CPU cores
    python tests/kill_test.py --kills 5 --seed 3

Each round starts `train.py --preset tiny` on a dozen generated images, checkpointing every step
with each write slowed down (so many kills land inside a write), and SIGKILLs it after a random
delay. Before the next round the script notes the newest readable checkpoint; the next round must
resume exactly from it. After the last kill one run trains to the end, and its model, EMA and
optimizer state must equal, bit for bit, those of an uninterrupted run of the same length: a kill
only loses steps since the last checkpoint, and resuming redoes them with the same data order
and the same noise.

`--child TRAIN_ARGS...` (internal; tests/test_robustness.py calls child_logged) runs train.main(TRAIN_ARGS)
with hooks set by environment variables:
  KILL_TEST_PAUSE=write:K   write half of step_K's checkpoint, then hang (to be killed mid-write)
  KILL_TEST_PAUSE=latest:K  hang after step_K.pt is written, before latest.pt is copied from it
  KILL_TEST_PAUSE=step:K    after step K, hang until a SIGINT/SIGTERM has been handled
  KILL_TEST_MARK=PATH       file created when the pause begins
  KILL_TEST_SLOW_WRITE=S    every checkpoint write takes about S seconds more
  KILL_TEST_STARTED=PATH    file created when the training loop starts
"""
import argparse
import io
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANG_SECONDS = 120  # a paused child that is never killed gives up instead of hanging a test forever


# ---------------------------------------------------------------------------------------------
# the child: train.main with pause points


def _touch(path):
    if path:
        open(path, "w").close()


def _hang(until=lambda: False):
    _touch(os.environ.get("KILL_TEST_MARK"))
    deadline = time.time() + HANG_SECONDS
    while time.time() < deadline:
        if until():
            return
        time.sleep(0.01)
    os._exit(3)


def child_logged(log, env, train_args):
    """child(train_args) with env added and all output appended to the file log: the target of
    tests/test_robustness.py's multiprocessing children (forked, or spawned on a GPU machine)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = sys.stderr = open(log, "a", buffering=1)
    os.environ.update(env)
    import torch
    torch.set_num_threads(1)
    child(train_args)


def child(train_args):
    """Run train.main(train_args) with the hooks described in the module docstring."""
    sys.path.insert(0, os.environ.get("KILL_TEST_ROOT", ROOT))
    import torch
    import checkpoint
    import train
    kind, _, k = os.environ.get("KILL_TEST_PAUSE", "").partition(":")
    target = f"step_{int(k):07d}.pt" if k else None
    slow = float(os.environ.get("KILL_TEST_SLOW_WRITE", 0))
    signalled = []

    real_save, real_copy, real_account = torch.save, checkpoint._copy_latest, train.account
    real_handle, real_loop = train.Stopper._handle, train.run_loop

    def save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        if kind == "write" and target in getattr(f, "name", ""):
            f.write(data[:len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            _hang()
        chunks = 8 if slow else 1
        for i in range(chunks):
            f.write(data[i * len(data) // chunks:(i + 1) * len(data) // chunks])
            f.flush()
            time.sleep(slow / chunks)

    def copy_latest(folder, path):
        if kind == "latest" and path.endswith(target):
            _hang()
        real_copy(folder, path)

    def account(run, progress, out):
        real_account(run, progress, out)
        if kind == "step" and progress.step == int(k):
            _hang(until=lambda: signalled)

    def handle(self, signum, frame):
        signalled.append(signum)
        real_handle(self, signum, frame)

    def run_loop(*args, **kwargs):
        _touch(os.environ.get("KILL_TEST_STARTED"))
        return real_loop(*args, **kwargs)

    torch.save, checkpoint._copy_latest, train.account = save, copy_latest, account
    train.Stopper._handle, train.run_loop = handle, run_loop
    train.main(train_args)


# ---------------------------------------------------------------------------------------------
# the parent: kill, inspect, resume, compare


def make_images(folder, n=12):
    """n small procedural pandas, so that an epoch is a few steps and kills land mid-epoch."""
    from dataset import draw_panda
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        draw_panda(random.Random(i), 24).save(os.path.join(folder, f"panda_{i:02d}.png"))


def train_args(work, ckpt_dir, args):
    """Flags of every run; outputs (checkpoints, TensorBoard, image cache) go under ckpt_dir."""
    return ["--preset", "tiny", "--device", "cpu", "--run", "kill", "--data-dir", os.path.join(work, "images"),
            "--ckpt-dir", ckpt_dir, "--log-dir", os.path.join(ckpt_dir, "tb"), "--cache-dir", os.path.join(ckpt_dir, "cache"),
            "--max-steps", str(args.steps), "--batch-size", "4", "--ckpt-every", "1", "--keep-last", "2",
            "--num-workers", str(args.num_workers), "--sample-every", "0", "--no-log-graph"]


def child_env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def start_child(args_list, log_path, **env):
    """`--child` in the work folder, importing the source snapshot in work/src."""
    work = os.path.dirname(log_path)
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", *args_list], cwd=work, stdout=log,
                            stderr=subprocess.STDOUT, env=child_env(KILL_TEST_ROOT=os.path.join(work, "src"), **env))
    return proc, log


def snapshot_source(work):
    """Copy the repository's modules, so every run of this test uses the same code even while it is edited."""
    os.makedirs(os.path.join(work, "src"), exist_ok=True)
    for name in os.listdir(ROOT):
        if name.endswith(".py"):
            shutil.copy(os.path.join(ROOT, name), os.path.join(work, "src", name))


def newest_readable(folder):
    """(step, file name) of the checkpoint a resume should use, or (None, None)."""
    import warnings
    from checkpoint import CheckpointError, load_latest
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            state, path = load_latest(folder)
        except CheckpointError:
            return None, "unreadable"
    return (state["step"], os.path.basename(path)) if state else (None, None)


def temp_files(folder):
    return sorted(n for n in os.listdir(folder) if ".tmp" in n) if os.path.isdir(folder) else []


def resumed_step(log_path):
    """The step a run's log says it resumed at, or None for a fresh start."""
    m = re.search(r"resuming '\w+' from \S+ at step (\d+)", open(log_path).read())
    return int(m.group(1)) if m else None


def one_round(i, work, ckpt_dir, args, rng, expect):
    """Start a run, SIGKILL it after a random delay; returns a report row."""
    log_path, started = os.path.join(work, f"round_{i:02d}.log"), os.path.join(work, "started")
    if os.path.exists(started):
        os.remove(started)
    proc, log = start_child(train_args(work, ckpt_dir, args), log_path, KILL_TEST_STARTED=started,
                            KILL_TEST_SLOW_WRITE=str(args.slow_write))
    while not os.path.exists(started) and proc.poll() is None:
        time.sleep(0.01)
    delay = rng.uniform(0, args.window)
    time.sleep(delay)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    rc = proc.wait()
    log.close()
    got = resumed_step(log_path)
    leftovers = temp_files(os.path.join(ckpt_dir, "kill"))
    step, name = newest_readable(os.path.join(ckpt_dir, "kill"))
    ok = got == expect[0] and (rc == -signal.SIGKILL if killed else rc == 0)
    return dict(round=i, delay=delay, killed=killed, rc=rc, resumed=got, expected=expect[0], ok=ok,
                mid_write=bool(leftovers), after=(step, name))


def compare(a_path, b_path):
    """Which of model / ema / optimizer / step differ between two checkpoints (bitwise)."""
    import torch
    a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (a_path, b_path))
    diff = [k for k in ("model", "ema") if any(not torch.equal(a[k][n], b[k][n]) for n in a[k])]
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    if any(not torch.equal(opt_a[p][s], opt_b[p][s]) for p in opt_a for s in opt_a[p]):
        diff.append("optimizer")
    if a["step"] != b["step"]:
        diff.append(f"step {a['step']} != {b['step']}")
    return diff


def run_rounds(work, args):
    rng = random.Random(args.seed)
    ckpt = os.path.join(work, "killed")
    rows, expect = [], (None, None)
    for i in range(1, args.kills + 1):
        row = one_round(i, work, ckpt, args, rng, expect)
        rows.append(row)
        expect = row["after"]
        print(f"round {i:2d}: {'SIGKILL' if row['killed'] else 'finished'} {row['delay']:.2f}s into training; "
              f"started {'fresh' if row['resumed'] is None else 'at step ' + str(row['resumed'])}"
              f"{'' if row['ok'] else ' (EXPECTED ' + str(row['expected']) + ', rc ' + str(row['rc']) + ')'}; "
              f"{'killed inside a checkpoint write; ' if row['mid_write'] else ''}"
              f"newest readable now: {row['after'][1] or 'none'}", flush=True)
    return rows, ckpt, expect


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="SIGKILL tiny training runs at random moments and check every resume.",
                                epilog="`--child TRAIN_ARGS...` is internal: train.main with test hooks (see the source).")
    p.add_argument("--kills", type=int, default=20, help="number of SIGKILLed runs (default: 20)")
    p.add_argument("--steps", type=int, default=200, help="total training steps, across all runs (default: 200)")
    p.add_argument("--window", type=float, default=1.2, help="kill after uniform(0, WINDOW) s of training (default: 1.2)")
    p.add_argument("--slow-write", type=float, default=0.02, help="extra seconds per checkpoint write (default: 0.02)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers of each run (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill delays (default: 0)")
    p.add_argument("--workdir", default="", help="keep all files here (default: a temporary folder, deleted)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    work = os.path.abspath(args.workdir) if args.workdir else tempfile.mkdtemp(prefix="kill_test_")
    os.makedirs(work, exist_ok=True)
    snapshot_source(work)
    sys.path.insert(0, os.path.join(work, "src"))  # this process reads checkpoints with the same code
    make_images(os.path.join(work, "images"))
    t0 = time.time()
    print(f"kill_test: {args.kills} SIGKILLs of tiny training, {args.steps} steps in all, a checkpoint every step; "
          f"work folder {work}", flush=True)
    straight, straight_log = start_child(train_args(work, os.path.join(work, "straight"), args),
                                         os.path.join(work, "straight.log"))  # the reference, alongside
    rows, ckpt, expect = run_rounds(work, args)
    proc, log = start_child(train_args(work, ckpt, args), os.path.join(work, "final.log"))
    final_rc = proc.wait()
    log.close()
    final_ok = final_rc == 0 and resumed_step(os.path.join(work, "final.log")) == expect[0]
    straight_rc = straight.wait()
    straight_log.close()
    diff = compare(os.path.join(ckpt, "kill", "latest.pt"), os.path.join(work, "straight", "kill", "latest.pt")) \
        if final_rc == 0 and straight_rc == 0 else ["a run failed: see final.log / straight.log"]
    summarise(rows, final_ok, expect, diff, temp_files(os.path.join(ckpt, "kill")), time.time() - t0)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["ok"] for r in rows) and final_ok and not diff else 1


def summarise(rows, final_ok, expect, diff, leftovers, seconds):
    killed = [r for r in rows if r["killed"]]
    # every start after the first: (step of the newest readable checkpoint it found, did it resume from exactly that)
    starts = [(prev["after"][0], row["ok"]) for prev, row in zip(rows, rows[1:])] + [(expect[0], final_ok)]
    with_ckpt = [ok for step, ok in starts if step is not None]
    print(f"\nsummary ({seconds:.0f}s): {len(killed)} runs SIGKILLed, {sum(r['mid_write'] for r in killed)} of them "
          f"inside a checkpoint write")
    print(f"  restarts with a checkpoint on disk: {len(with_ckpt)}; resumed from the newest readable one: "
          f"{sum(with_ckpt)}; failed or fresh despite a checkpoint: {len(with_ckpt) - sum(with_ckpt)}")
    print(f"  final run resumed at step {expect[0]} and finished: {'yes' if final_ok else 'NO'}; "
          f"temp files left after it: {len(leftovers)}")
    print(f"  final weights vs an uninterrupted run: "
          f"{'bitwise EQUAL (model, EMA, optimizer, step)' if not diff else 'DIFFERENT: ' + ', '.join(diff)}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        sys.exit(main())

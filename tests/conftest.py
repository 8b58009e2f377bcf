"""Shared fixtures: a tiny config, small image folders, and a helper that runs train.main in a tmp dir."""
import os
import random
import signal
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from config import build_config  # noqa: E402
from dataset import draw_panda  # noqa: E402

collect_ignore = ["kill_test.py"]  # a harness (and a command) that drives train.py, not a test module


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Two shared CPU cores and tiny tensors: one intra-op thread is faster than two fighting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture
def tiny_cfg():
    """The `tiny` preset (16 px, 2 blocks, width 32, max_t 1000) on the CPU."""
    return build_config({"preset": "tiny", "device": "cpu"}, cuda_available=False)


def make_pandas(folder, n, size=32, seed=0):
    """Write n small procedural pandas as PNGs into folder; returns the folder."""
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        draw_panda(random.Random(seed * 1000 + i), size).save(os.path.join(folder, f"panda_{i:02d}.png"))
    return str(folder)


@pytest.fixture
def image_dir(tmp_path):
    """A flat folder of 4 small pandas (one label; with batch 8 an epoch is a single step)."""
    return make_pandas(tmp_path / "pandas", 4)


def train_argv(workdir, data_dir, *extra):
    """train.py flags for a tiny CPU run whose outputs all land inside workdir."""
    return ["--preset", "tiny", "--device", "cpu", "--data-dir", str(data_dir),
            "--ckpt-dir", os.path.join(workdir, "checkpoints"), "--log-dir", os.path.join(workdir, "dit_training"),
            "--cache-dir", os.path.join(workdir, "cache"), *map(str, extra)]


def run_train(workdir, data_dir, *extra):
    """Run train.main for the tiny preset with cwd = workdir; restores cwd and signal handlers."""
    import train
    old_cwd = os.getcwd()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    os.makedirs(workdir, exist_ok=True)
    os.chdir(workdir)
    try:
        train.main(train_argv(str(workdir), data_dir, *extra))
    finally:
        os.chdir(old_cwd)
        for s, h in handlers.items():
            signal.signal(s, h)
    return os.path.join(str(workdir), "checkpoints")

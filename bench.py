"""How fast is it, and how far from the hardware? Training, sampling and data loading, measured.

    python bench.py                         # full bench: minutes on a CPU (docs/results.md, "Speed")
    python bench.py --quick                 # a quick check (small batches, extrapolated sampling; ~2 min on 2 cores)
    python bench.py --presets panda64 --json bench.json
    python bench.py --device cuda --compile

For each architecture (seed and panda256 share one, measured once) it reports training images/s
and peak memory of this repo's model against a NAIVE formulation of the same network (explicit
softmax(QK^T/sqrt(d))V with the full T x T matrix, separate q/k/v and modulation layers, as the
reference implementation did; same parameters, same FLOPs, same weights), the FLOPs per
training image and MFU against the matmul peak (of the precision train.py picks here: bf16 on CUDA and on
CPUs with fast bf16, else fp32) measured in the same run, training speed in fp32 and bf16, sampling speed,
and the data pipeline against the rate the model consumes images. Every training
configuration runs in a fresh subprocess so its peak memory is its own.
"""
import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from config import ARCH_FIELDS, PRESETS, build_config
from dataset import DataError, EpochBatches, ImageCache, find_images, generate_pandas, make_loader
from diffusion import make_diffusion
from distributed import autocast_for, precision, select_device
from dit import DiT
from naive_dit import NaiveDiT, naive_from
from optim import build_training, train_step

HERE = os.path.dirname(os.path.abspath(__file__))
# warm-up steps, min timed steps and seconds per training config; seconds per sampler, matmul peak,
# data-loader timing; images in the data folder (0 = all)
MODES = {"quick": dict(warmup=1, steps=1, budget=2.0, sample_budget=2.0, peak=0.5, data_seconds=0.3, data_limit=64),
         "full": dict(warmup=2, steps=2, budget=25.0, sample_budget=30.0, peak=2.0, data_seconds=2.0, data_limit=0)}


def worker_counts(text):
    """--workers '0,2' -> [0, 2] ('' -> [], the default): a typo is refused while parsing, not after the training runs."""
    try:
        counts = [int(w) for w in text.split(",")] if text else []
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of worker counts, e.g. 0,2") from None
    if any(w < 0 for w in counts):
        raise argparse.ArgumentTypeError(f"worker counts must be 0 or more, got '{text}'")
    return counts


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark training, sampling and data loading against a naive model "
                                            "and the machine's own matmul peak.")
    p.add_argument("--presets", default="seed,panda256,panda64",
                   help=f"comma-separated presets ({', '.join(PRESETS)}); presets with the same architecture are "
                        "measured once, at the smallest of their batch sizes (default: seed,panda256,panda64)")
    p.add_argument("--quick", action="store_true",
                   help="quick check (~2 minutes on 2 CPU cores): 1/4 batches, one measured step, sampling extrapolated, 64 data images")
    p.add_argument("--json", default="", metavar="PATH", help="also write every figure to this JSON file")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models being trained (extra warm-up)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: 0 = torch's default)")
    p.add_argument("--batch-size", type=int, default=0, help="training batch for every preset (default: the preset's)")
    p.add_argument("--no-naive", action="store_true", help="skip the naive model (no speed-up or memory ratio)")
    p.add_argument("--data-dir", default="",
                   help="image folder for the data pipeline, e.g. your photos (default: generated pandas)")
    p.add_argument("--workers", type=worker_counts, default="",
                   help="comma-separated DataLoader worker counts to compare (default: 0 and the config default)")
    p.add_argument("--child", default="", metavar="SPEC",
                   help="internal: run one training measurement, described by a JSON spec, in this process")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# measuring helpers


RESULT = "BENCH_RESULT "  # a child's last line of stdout: RESULT + json


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device, dtype=torch.float32, seconds=1.0):
    """Best FLOP/s of a large square torch.mm on this device at the current thread count. A product slower than
    the whole budget is timed once and ends the search: bf16 emulated on an AVX2 CPU takes ~2 s at n = 1024."""
    best = 0.0
    for n in ((1024, 2048) if device.type == "cpu" else (4096, 8192)):
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        torch.mm(a, b)
        sync(device)
        count, start = 0, time.perf_counter()
        while (count < 3 and time.perf_counter() - start < seconds) or time.perf_counter() - start < seconds / 2:
            torch.mm(a, b)
            sync(device)
            count += 1
        elapsed = time.perf_counter() - start
        best = max(best, 2 * n ** 3 * count / elapsed)
        if elapsed / count > seconds:
            break
    return best


def peaks(device, seconds):
    """({precision: FLOP/s}, the precision train.py trains in here): fp32 and bf16; TF32 too on CUDA."""
    if device.type != "cuda":
        out = {"fp32": matmul_peak(device, torch.float32, seconds), "bf16": matmul_peak(device, torch.bfloat16, seconds)}
        return out, precision(device, True)[0]
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    out = {"fp32": matmul_peak(device, torch.float32, seconds)}
    torch.backends.cuda.matmul.allow_tf32 = True
    out["tf32"] = matmul_peak(device, torch.float32, seconds)
    out["bf16"] = matmul_peak(device, torch.bfloat16, seconds)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    return out, precision(device, True)[0]


def peak_memory(device):
    """Peak bytes of this process: RSS high-water mark on CPU, allocated tensor memory on CUDA."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def available_memory(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return float("inf")


def train_flops_per_image(model_class, cfg):
    """FLOPs of one training image (forward + backward), counted on the meta device: no compute."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = model_class.from_config(cfg)
        x = torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size)
        t = torch.zeros(1, dtype=torch.long)
        counter = FlopCounterMode(display=False)
        with counter:
            model(x, t, t).sum().backward()
    return counter.get_total_flops(), sum(p.numel() for p in model.parameters())


def timed(step, warmup, steps, budget, device, min_warmup=1):
    """Seconds of each timed step: `warmup` untimed steps (fewer when slow, never below `min_warmup`:
    torch.compile needs a few), then at least `steps` timed ones, more while the time budget lasts."""
    for i in range(max(warmup, min_warmup)):
        start = time.perf_counter()
        step()
        sync(device)
        if i + 1 >= min_warmup and time.perf_counter() - start > budget / 4:
            break
    times, start = [], time.perf_counter()
    while len(times) < steps or (time.perf_counter() - start < budget and len(times) < 200):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------
# one training configuration, in a fresh process (`bench.py --child SPEC`)


def child_setup(spec):
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    overrides = dict(preset=spec["preset"], batch_size=spec["batch"], device=spec["device"],
                     compile=spec["compile"], ema_decay=0.0, ema_gamma=0.0)  # the step measured is optim.train_step: no EMA
    cfg = build_config(overrides, torch.cuda.is_available())
    return cfg, select_device(cfg.device, 0, spec["precision"] == "bf16")  # fp32 on CUDA: TF32 off too


def child_train(spec):
    """Step times and peak memory of optim.train_step for the fast or the naive model."""
    cfg, device = child_setup(spec)
    peak = peaks(device, spec["peak_seconds"])[0] if spec["peak_seconds"] else {}
    model, _, optimizer, train_model = build_training(cfg, device, 1)
    if spec["naive"]:
        model = naive_from(cfg, model)
        optimizer = type(optimizer)(model.parameters(), **optimizer.defaults)  # same class and settings
        train_model = torch.compile(model) if cfg.compile else model
    autocast = autocast_for(device, spec["precision"])
    diffusion, batches = make_diffusion(cfg, device), training_batches(spec, cfg, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        x, y = next(batches)
        train_step(train_model, optimizer, diffusion, x, y, cfg.lr, cfg, autocast)

    times = timed(step, spec["warmup"], spec["steps"], spec["budget"], device, 3 if cfg.compile else 1)
    return dict(step_times=times, peak_bytes=peak_memory(device), threads=torch.get_num_threads(), peak=peak,
                load=os.getloadavg()[0])


def training_batches(spec, cfg, device):
    """One fixed random batch forever, or (spec["workers"] set) real images through the training loader."""
    if spec.get("workers") is None:
        x = torch.rand(cfg.batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, device=device) * 2 - 1
        return itertools.repeat((x, torch.zeros(cfg.batch_size, dtype=torch.long, device=device)))
    return image_batches(spec, cfg, device)


def image_batches(spec, cfg, device):
    """What train.py's loop feeds the step: cached uint8 batches -> device -> [-1, 1], epoch after epoch."""
    data = ImageCache(spec["data_dir"], cfg.image_size, spec["cache_dir"])
    batches = EpochBatches(len(data), cfg.batch_size, cfg.seed, cfg.hflip)
    loader = make_loader(data, batches, spec["workers"], pin_memory=device.type == "cuda")
    for epoch in itertools.count():
        batches.set_position(epoch, 0)
        for x, y in loader:
            yield x.to(device, non_blocking=True).float().div_(127.5).sub_(1.0), y.to(device)


def run_child(spec):
    """Run child_train(spec) in a fresh interpreter; its result dict, or {"error": why}."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit code {proc.returncode}"
    return {"error": (proc.stderr.strip().splitlines() or [why])[-1] + f" [{why}]"}


# ---------------------------------------------------------------------------------------------
# sampling and data, measured in this process


class _Enough(Exception):
    """Stops a sampler after the steps we time."""


def sampler_step_seconds(model, diffusion, cfg, device, sampler, steps, batch, timed_steps):
    """Seconds per step of the real sampler loop (Diffusion.sample) at `batch` images; step 0 untimed."""
    noise = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    stamps = []

    def tick(i, *_):
        sync(device)
        stamps.append(time.perf_counter())
        if len(stamps) > timed_steps:
            raise _Enough

    try:
        diffusion.sample(model, noise, y, sampler, steps, callback=tick)
    except _Enough:
        pass
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def bench_sampling(cfg, device, budget, grid=64):
    """Model evaluations/s and seconds for a `grid`-image grid with DDIM-50 and DDPM-max_t.

    A grid that does not fit the time budget is extrapolated from fewer steps and/or a smaller
    batch; the result says which."""
    model, diffusion = DiT.from_config(cfg).to(device).eval(), make_diffusion(cfg, device)
    per_image = sampler_step_seconds(model, diffusion, cfg, device, "ddim", 2, 1, 1)  # also warms up
    batch = int(max(1, min(grid, budget / 3 / per_image)))
    out = {}
    for sampler, steps in (("ddim", min(50, cfg.max_t)), ("ddpm", cfg.max_t)):
        k = int(max(2, min(steps - 1, budget / (batch * per_image))))
        if steps * batch * per_image <= 2 * budget:  # batch-1 cost overestimates a batch's: usually fits
            k = steps - 1  # cheap enough: the whole trajectory
        seconds = sampler_step_seconds(model, diffusion, cfg, device, sampler, steps, batch, k)
        measured = batch == grid and k == steps - 1
        out[f"{sampler}-{steps}"] = dict(grid_seconds=seconds * steps * grid / batch, evals_per_s=batch / seconds,
                                        batch=batch, timed_steps=k, steps=steps, measured=measured)
    return out


def loader_rate(data, batch, workers, seconds):
    """Images/s through EpochBatches + make_loader from the second epoch on (workers up, cache warm)."""
    batches = EpochBatches(len(data), batch, seed=0)
    loader = make_loader(data, batches, workers)
    images, start = 0, None
    for epoch in itertools.count():
        batches.set_position(epoch, 0)
        for x, _ in loader:
            images += len(x) if start is not None else 0
        if start is None:
            start = time.perf_counter()
        elif epoch >= 2 and time.perf_counter() - start > seconds:
            break
    return images / (time.perf_counter() - start)


def bench_data(folder, cache_dir, size, batch, workers, seconds):
    """First build of the decoded cache, then loader images/s for each worker count."""
    start = time.perf_counter()
    data = ImageCache(folder, size, cache_dir)
    build = time.perf_counter() - start
    rates = {str(w): loader_rate(data, batch, w, seconds) for w in workers}
    return dict(images=len(data), build_seconds=build, images_per_s=rates)


def data_folder(args, limit, tmp):
    """The folder the data pipeline reads: --data-dir, else generated pandas."""
    folder = args.data_dir
    if not folder:
        folder = os.path.join(tmp, "generated")
        generate_pandas(folder, limit or 200, size=256)
        return folder, "generated pandas"
    files = [path for path, _ in find_images(folder)[0]]
    if not files:  # refused now, not by the data pipeline after minutes of training measurements
        raise DataError(f"no images found in '{folder}'; pass --data-dir with a folder of .jpg/.png files")
    if limit and len(files) > limit:  # --quick: a subset, linked into a flat folder
        folder = os.path.join(tmp, "subset")
        os.makedirs(folder)
        for path in files[:limit]:
            os.symlink(os.path.abspath(path), os.path.join(folder, os.path.basename(path)))
    return folder, args.data_dir


# ---------------------------------------------------------------------------------------------
# one architecture: fast vs naive training, sampling, data


def arch_groups(names):
    """Presets grouped by architecture: [(names, batch)], the batch being the smallest in the group."""
    groups = {}
    for name in names:
        if name not in PRESETS:
            raise SystemExit(f"error: unknown preset '{name}'; choose from {', '.join(PRESETS)}")
        cfg = build_config({"preset": name})
        groups.setdefault(tuple(getattr(cfg, f) for f in ARCH_FIELDS), []).append((name, cfg.batch_size))
    return [([n for n, _ in group], min(b for _, b in group)) for group in groups.values()]


def bench_arch(names, batch, args, mode, device, data, tmp):
    """Every figure for one architecture. `data` = (folder, label) of the data-pipeline images."""
    batch = args.batch_size or (max(1, batch // 4) if args.quick else batch)
    cfg = build_config({"preset": names[0], "batch_size": batch}, device.type == "cuda")
    flops, params = train_flops_per_image(DiT, cfg)
    naive_flops, naive_params = train_flops_per_image(NaiveDiT, cfg)
    r = dict(name="/".join(names), image_size=cfg.image_size, tokens=(cfg.image_size // cfg.patch_size) ** 2,
             batch=batch, params=params, naive_params=naive_params, train_flops=flops, naive_train_flops=naive_flops)
    chosen = precision(device, True)[0]  # what train.py would train in here
    spec = dict(preset=names[0], batch=batch, device=str(device), compile=args.compile, threads=args.threads,
                warmup=mode["warmup"], steps=mode["steps"], budget=mode["budget"], naive=False,
                peak_seconds=mode["peak"], precision=chosen)
    r["by_precision"] = {}
    for name in ("fp32", "bf16"):
        note(f"{r['name']}: training (this repo, {name}), batch {batch}")
        r["by_precision"][name] = run_child({**spec, "precision": name, "peak_seconds": spec["peak_seconds"] * (name == chosen)})
    r["fast"] = r["by_precision"][chosen]
    r["naive"] = bench_naive(cfg, spec, args, device)
    note(f"{r['name']}: sampling")
    with autocast_for(device, chosen):  # sample.py's precision
        r["sampling"] = bench_sampling(cfg, device, mode["sample_budget"])
    note(f"{r['name']}: data pipeline on {data[1]}")
    workers = args.workers or sorted({0, cfg.num_workers})
    r["data"] = bench_data(data[0], os.path.join(tmp, "cache"), cfg.image_size, batch, workers, mode["data_seconds"])
    r["loader_train"] = bench_loader_training(r, spec, workers, data[0], tmp, args)
    return r


def bench_naive(cfg, spec, args, device):
    if args.no_naive:
        return {"error": "skipped (--no-naive)"}
    tokens = (cfg.image_size // cfg.patch_size) ** 2
    need = (cfg.depth + 3) * cfg.batch_size * cfg.num_heads * tokens ** 2 * 4  # saved + transient T x T matrices
    if need > 0.85 * available_memory(device):
        return {"error": f"skipped: needs ~{need / 1e9:.0f} GB for its attention matrices, "
                         f"{available_memory(device) / 1e9:.0f} GB available"}
    note(f"{spec['preset']}: training (naive formulation), batch {cfg.batch_size}")
    return run_child({**spec, "naive": True, "peak_seconds": 0})


def bench_loader_training(r, spec, workers, folder, tmp, args):
    """The training step fed by the real loader, for each worker count. Full mode only, and only where
    the model eats more than 2 images/s: slower, the loader cannot matter (and it costs minutes)."""
    fast = r["fast"]
    if args.quick or "error" in fast or r["batch"] / statistics.median(fast["step_times"]) < 2:
        return {}
    note(f"{r['name']}: training on real data, DataLoader workers {workers}")
    out = {}
    for w in workers:
        cache = os.path.join(tmp, "cache")
        res = run_child({**spec, "workers": w, "data_dir": folder, "cache_dir": cache, "peak_seconds": 0})
        out[str(w)] = res if "error" in res else r["batch"] / statistics.median(res["step_times"])
    return out


def note(message):
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# derived figures, the table, main


def summarize(r, peak):
    """Images/s, speed-up, memory ratio, achieved FLOP/s and MFU (against `peak` FLOP/s)."""
    for kind in ("fast", "naive"):
        if "step_times" in r[kind]:
            r[kind]["images_per_s"] = r["batch"] / statistics.median(r[kind]["step_times"])
    for res in r.get("by_precision", {}).values():
        if "step_times" in res:
            res["images_per_s"] = r["batch"] / statistics.median(res["step_times"])
    fast, naive = r["fast"], r["naive"]
    if "images_per_s" in fast:
        r["achieved_flops"] = r["train_flops"] * fast["images_per_s"]
        r["mfu"] = r["achieved_flops"] / peak
        r["data_vs_model"] = {w: rate / fast["images_per_s"] for w, rate in r["data"]["images_per_s"].items()}
    if "images_per_s" in fast and "images_per_s" in naive:
        r["speedup"] = fast["images_per_s"] / naive["images_per_s"]
        r["memory_ratio"] = fast["peak_bytes"] / naive["peak_bytes"]


def fmt_number(x, unit=""):
    if x is None:
        return "-"
    digits = 0 if abs(x) >= 100 else 1 if abs(x) >= 10 else 2 if abs(x) >= 1 else 3
    return f"{x:,.{digits}f}{unit}"


def _error(res):
    return res.get("error", "")[:60] or None if isinstance(res, dict) else None


def table_rows(r, notes):
    """(label, value) pairs of one architecture's column: training first, then sampling and data."""
    f, n = r["fast"], r["naive"]
    same = "" if (r["params"], r["train_flops"]) == (r["naive_params"], r["naive_train_flops"]) else " (!)"
    if same:
        notes.add("(!) the naive model's parameters or FLOPs differ from this repo's: the ratio is not like for like")
    return [("image px / tokens / batch", f"{r['image_size']} / {r['tokens']} / {r['batch']}"),
            ("parameters (same for naive)", f"{r['params'] / 1e6:.3f} M{same}"),
            ("GFLOP per training image", fmt_number(r["train_flops"] / 1e9) + same),
            *precision_rows(r),
            ("train img/s, this repo", _error(f) or fmt_number(f.get("images_per_s"))),
            ("train img/s, naive", _error(n) or fmt_number(n.get("images_per_s"))),
            ("speed-up over naive", fmt_number(r.get("speedup"), "x")),
            ("peak memory, this repo", _error(f) or fmt_number(f.get("peak_bytes", 0) / 1e9, " GB")),
            ("peak memory, naive", _error(n) or fmt_number(n.get("peak_bytes", 0) / 1e9, " GB")),
            ("memory this repo / naive", fmt_number(r.get("memory_ratio"))),
            ("achieved GFLOP/s (MFU)", f"{fmt_number(r.get('achieved_flops', 0) / 1e9)} ({fmt_number(100 * r.get('mfu', 0))}%)"),
            *sampling_and_data_rows(r, notes)]


def precision_rows(r):
    """Training speed in each precision, and bf16's ratio over fp32 (train.py picks by the CPU's bf16 units)."""
    runs = r.get("by_precision", {})
    rows = [(f"train img/s, {name}", _error(res) or fmt_number(res.get("images_per_s"))) for name, res in runs.items()]
    if all("images_per_s" in res for res in runs.values()) and len(runs) == 2:
        rows.append(("train speed bf16 / fp32", fmt_number(runs["bf16"]["images_per_s"] / runs["fp32"]["images_per_s"], "x")))
    return rows


def sampling_and_data_rows(r, notes):
    rows = []
    for key, res in r["sampling"].items():
        grid = fmt_number(res["grid_seconds"])
        if not res["measured"]:
            grid += f"* ({res['timed_steps']} steps, b{res['batch']})"
            notes.add("* extrapolated: seconds per step, measured over the steps and batch in brackets, "
                      "scaled to every step and 64 images")
        rows += [(f"{key.upper()}: model evals/s (batch)", f"{fmt_number(res['evals_per_s'])} (b{res['batch']})"),
                 (f"{key.upper()}: 64-image grid, s", grid)]
    d = r["data"]
    rows.append(("data: first decode + cache, s", f"{fmt_number(d['build_seconds'])} ({d['images']} images)"))
    for w, rate in d["images_per_s"].items():
        rows.append((f"data img/s, {w} workers (x model)", f"{fmt_number(rate)} (x{fmt_number(r.get('data_vs_model', {}).get(w))})"))
    for w, rate in r["loader_train"].items():
        rows.append((f"train img/s on real data, {w} workers", _error(rate) or fmt_number(rate)))
    return rows


def print_table(report):
    m, notes = report["machine"], set()
    cols = [dict(table_rows(r, notes)) for r in report["archs"]]
    labels = list(dict.fromkeys(label for col in cols for label in col))  # rows of every column, in order
    heads = [r["name"] for r in report["archs"]]
    width = max(map(len, labels), default=0) + 2
    widths = [max(len(h), *(len(v) for v in col.values())) + 2 for h, col in zip(heads, cols)]
    print(f"\nbench.py {report['mode']} on {m['device']} ({m['gpu'] or m['cpu']}), {m['cores']} CPU cores, "
          f"torch {m['torch']} with {m['threads']} thread{'s' if m['threads'] != 1 else ''}; load average {m['load_start']:.1f} -> {m['load_end']:.1f}")
    print("matmul peak (best large torch.mm): " + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s"
                                                             for k, v in m["peak"].items()))
    print(f"train.py's precision here: {m['precision']} ({m['precision_why']}); 'this repo' rows below use it")
    print(" " * width + "".join(h.ljust(w) for h, w in zip(heads, widths)))
    for label in labels:
        print(label.ljust(width) + "".join(col.get(label, "-").ljust(w) for col, w in zip(cols, widths)))
    for note in sorted(notes) + report["notes"]:
        print(note)


def noise_warnings(report):
    """Say so when other processes shared the CPU: every figure above is then a lower bound, ratios noisy."""
    m, out = report["machine"], []
    loads = [r[k].get("load", 0) for r in report["archs"] for k in ("fast", "naive")]
    busiest = max([m["load_start"], m["load_end"]] + loads)
    if m["device"] == "cpu" and busiest > m["cores"] + 1:  # this run alone keeps the load near its thread count
        out.append(f"WARNING: load average reached {busiest:.1f} on {m['cores']} cores: other processes competed "
                   "for the CPU, so these timings are noisy; re-run on a quiet machine.")
    if any(r.get("mfu", 0) > 1 for r in report["archs"]):
        out.append("WARNING: MFU above 100%: the peak was measured while the machine was busier than during training.")
    return out


def machine_info(device):
    return dict(device=str(device), cpu=cpu_name(), cores=os.cpu_count(), threads=torch.get_num_threads(),
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "",
                torch=torch.__version__, python=platform.python_version(), load_start=os.getloadavg()[0])


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print(RESULT + json.dumps(child_train(json.loads(args.child))), flush=True)
        return
    groups = arch_groups([p for p in args.presets.split(",") if p])  # an unknown preset stops here, not minutes later
    if args.threads:
        torch.set_num_threads(args.threads)
    mode = MODES["quick" if args.quick else "full"]
    device = select_device(args.device, 0, True)  # as train.py's default --amp
    report = dict(mode="--quick" if args.quick else "full", machine=machine_info(device), archs=[], notes=[])
    report["machine"]["precision"], report["machine"]["precision_why"] = precision(device, True)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            data = data_folder(args, mode["data_limit"], tmp)
            peak, mfu_precision = peaks(device, mode["peak"])  # after the data folder: a bad --data-dir fails at once
            for names, batch in groups:
                report["archs"].append(bench_arch(names, batch, args, mode, device, data, tmp))
    except DataError as e:  # --data-dir missing, empty or unreadable: one line, as train.py says it
        raise SystemExit(f"error: {e}")
    for r in report["archs"]:  # the best peak seen anywhere in the run: MFU is never flattered by a slow moment
        peak = {k: max(v, r["fast"].get("peak", {}).get(k, 0)) for k, v in peak.items()}
    report["machine"].update(peak=peak, load_end=os.getloadavg()[0], mfu_precision=mfu_precision)
    for r in report["archs"]:
        summarize(r, peak[mfu_precision])
    report["notes"].append(f"MFU = achieved / {mfu_precision} peak. Steady state: median step after warm-up; "
                           f"full step = forward + loss + backward + clip + Adam. Data: {data[1]}.")
    report["notes"] += noise_warnings(report)
    print_table(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

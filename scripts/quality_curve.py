"""What an hour buys: train in wall-clock increments and measure SWD after each.

    python scripts/quality_curve.py --minutes 5 10 20 40 -- \\
        --preset panda64 --data-dir PHOTOS --holdout 100 --run curve64

PHOTOS is a folder of panda photos. Everything after `--` goes to train.py. Training runs in increments of `--max-minutes` (each
resumes exactly where the last stopped, so the run equals one uninterrupted run); after each,
`--n` images are sampled from the EMA weights (the run's sampler, fixed noise) and compared with the held-out
photos by SWD at 64 px (metrics.py); the first 64 are saved as <run folder>/swd_step_<step>.png; metrics.seams says how much the patch grid shows,
on the procedural pandas metrics.cartoon_faces how many samples have a face.
With --noise-sets K, K sets of `--n` images, each from other starting noise, are scored and averaged
(the first set is the one a single measurement uses). Prints a table and appends JSON lines to --json.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch
from torchvision.utils import save_image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import metrics  # noqa: E402
from checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from config import build_config, parse_train_args  # noqa: E402
from dataset import DEFAULT_DATA_DIR, DataError, enlarge, find_images, folder_files, held_out_files  # noqa: E402
from diffusion import make_diffusion  # noqa: E402
from distributed import autocast_for, pick_device, precision  # noqa: E402
from sample import load_model  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                usage="%(prog)s [--minutes M ... | --at-steps N ...] [options] -- TRAIN_FLAGS")
    p.add_argument("--minutes", type=float, nargs="+", default=[5, 10, 20], help="cumulative training minutes to measure at (default: 5 10 20)")
    p.add_argument("--at-steps", type=int, nargs="+", default=None,
                   help="measure at these cumulative steps instead of minutes (immune to a busy machine)")
    p.add_argument("--n", type=int, default=256, help="images sampled per measurement (default: 256)")
    p.add_argument("--steps", type=int, default=50, help="sampler steps for the samples (the run's --sampler; default: 50)")
    p.add_argument("--noise-sets", type=int, default=1,
                   help="score this many sets of --n samples, each from other starting noise, and report their mean: "
                        "one set of 256 moves by ~1.5 with the noise alone (default: 1)")
    p.add_argument("--reference", default="", metavar="DIR",
                   help="score against the last --reference-holdout photos of DIR (sorted) instead of the run's own "
                        "reference, e.g. the photos a scripts/layout_groups.py folder left out (default: the run's)")
    p.add_argument("--reference-holdout", type=int, default=100, help="photos of --reference to score against (default: 100)")
    p.add_argument("--json", default="", help="append one JSON line per measurement here")
    p.add_argument("train_flags", nargs=argparse.REMAINDER, help="flags for train.py, after --")
    args = p.parse_args(argv)
    args.train_flags = [a for a in args.train_flags if a != "--"]
    overrides, _ = parse_train_args(args.train_flags)
    if args.noise_sets < 1:
        p.error("--noise-sets must be at least 1")
    if args.reference and not os.path.isdir(args.reference):
        p.error(f"--reference folder '{args.reference}' not found")
    if args.reference_holdout < 1:
        p.error("--reference-holdout must be at least 1")
    photos = len(folder_files(args.reference)) if args.reference else 0
    if args.reference and args.reference_holdout >= photos:  # refused now, not after the first training increment
        p.error(f"--reference-holdout {args.reference_holdout} needs more than {args.reference_holdout} photos in "
                f"'{args.reference}', which has {photos}; lower --reference-holdout")
    if "run" not in overrides:
        p.error("pass --run NAME among the train.py flags, so the curve has its own run")
    cfg = build_config(overrides, torch.cuda.is_available())
    args.run, args.run_dir = cfg.run, os.path.join(cfg.ckpt_dir, cfg.run)
    if cfg.lr_schedule == "cosine" and len(args.at_steps or args.minutes) > 1:
        p.error("--lr-schedule cosine decays over each increment's budget, so the increments would not add up "
                "to one run; measure one point per run instead (--at-steps N or --minutes M)")
    return args


@torch.inference_mode()
def measure(state, n, steps, noise_sets=1, reference=None):
    """SWD of n EMA samples (on the GPU when there is one, in the run's precision; the noise is the same either way) against the
    run's reference photos; with noise_sets > 1, the mean over that many sets of n, each from other
    starting noise (seeds metrics.EVAL_NOISE_SEED + 0, 1, ...; the first is train.py's --eval-every noise),
    with each set's mean under "sets"; reference = (folder, n) scores against its last n files instead.
    Returns it and the first set."""
    device = pick_device("auto")
    cfg, model = load_model(state, use_ema=True, device=device)
    diffusion = make_diffusion(cfg, device)
    data_dir = cfg.data_dir or DEFAULT_DATA_DIR
    train_files = [f for f, _ in find_images(data_dir)[0]]
    held_out = held_out_files(*reference) if reference else held_out_files(data_dir, cfg.holdout)
    y = torch.arange(n) % cfg.num_labels
    results, grid_seams, grid_faces = [], [], []
    reference_paths = tuple(metrics.reference_paths(held_out, train_files, n))
    reference = metrics.reference_images(reference_paths, cfg.image_size)
    real_faces = metrics.reference_faces(reference_paths, cfg.image_size)
    for k in range(noise_sets):
        noise, seed = metrics.eval_noise(n, cfg, k)
        with autocast_for(device, precision(device, cfg.amp)[0]):  # as train.py's evaluation samples
            fake = diffusion.sample_batches(model, noise, y, 64, device, diffusion.sampler, steps, seed=seed)
        results.append(metrics.score_samples(fake, reference_paths))
        grid_seams.append(metrics.seams(fake, cfg.patch_size))
        grid_faces.append(metrics.faces_against(fake, real_faces))
        if k == 0:
            first = fake  # the grid shows the set a single measurement uses
    result = {**results[0], "mean": sum(r["mean"] for r in results) / noise_sets,
              "seams": sum(grid_seams) / noise_sets, "seams_reference": metrics.seams(reference, cfg.patch_size),
              "levels": [sum(level) / noise_sets for level in zip(*(r["levels"] for r in results))]}
    if noise_sets > 1:
        result["sets"] = [r["mean"] for r in results]
    if grid_faces[0] is not None:  # the procedural pandas: the share with a face (metrics.cartoon_face)
        result["faces"], result["faces_reference"] = sum(f[0] for f in grid_faces) / noise_sets, grid_faces[0][1]
    return result, first


def main(argv=None):
    try:
        curve(parse_args(argv))
    except (DataError, CheckpointError) as e:  # a folder moved or emptied, no latest.pt: one line, as train.py says it
        raise SystemExit(f"error: {e}")


def curve(args):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = 0.0
    print(f"| {'step' if args.at_steps else 'minutes'} | step | SWD mean | per level (64/32/16 px) |\n|---|---|---|---|", flush=True)
    for minutes in args.at_steps or args.minutes:
        budget = ["--max-steps", str(minutes)] if args.at_steps else ["--max-minutes", str(minutes - done)]
        cmd = [sys.executable, os.path.join(root, "train.py"), *args.train_flags, *budget, "--eval-every", "0"]
        code = subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode
        if code > 0:  # train.py has said why in its own error line: its exit code, no CalledProcessError traceback
            raise SystemExit(code)
        if code < 0:  # killed by signal N, so it said nothing: one line, and 128 + N as a shell reports it
            print(f"error: train.py was killed by signal {-code} (out of memory?) before the {minutes:g} point; free memory "
                  "or lower --batch-size among the train flags and run again: it resumes", file=sys.stderr)
            raise SystemExit(128 - code)
        done = minutes
        state = load_checkpoint(os.path.join(args.run_dir, "latest.pt"))
        t0 = time.time()
        reference = (args.reference, args.reference_holdout) if args.reference else None
        result, fake = measure(state, args.n, args.steps, args.noise_sets, reference)
        grid = os.path.join(args.run_dir, f"swd_step_{state['step']:07d}.png")  # kept: pruning removes old step_*.pt
        save_image(enlarge((fake[:64] + 1) / 2), grid, nrow=8)
        levels = "/".join(f"{v:.1f}" for v in result["levels"])
        spread = f"sets {' / '.join(f'{v:.1f}' for v in result['sets'])}, " if "sets" in result else ""
        counts = f"{result['n_fake']} samples vs {result['n_real']} reference"
        seams = f"seams {result['seams']:.2f} (reference {result['seams_reference']:.2f})"
        if "faces" in result:
            seams += f", faces {result['faces']:.0%} (reference {result['faces_reference']:.0%})"
        print(f"| {minutes:g} | {state['step']} | {result['mean']:.1f} | {levels} |  ({counts}, {spread}{seams}, eval {time.time() - t0:.0f}s, {grid})",
              flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"run": args.run, "minutes": minutes, "step": state["step"], **result}) + "\n")


if __name__ == "__main__":
    main()

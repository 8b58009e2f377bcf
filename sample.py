"""Draw pandas from a checkpoint.

    python sample.py                                   # newest checkpoint of the newest run
    python sample.py --ckpt checkpoints/panda64/latest.pt --n 64 --sampler ddim --steps 50
    python sample.py --sampler ddpm                    # the description's 1000-step sampler
    python sample.py --sampler heun --steps 25         # a flow checkpoint (--objective flow): heun (default) or euler
    python sample.py --trajectory                      # one image's denoising, 16 frames

Writes samples/<run>/<step>/grid.png (enlarged to at least 128 px per image) plus one PNG per image at
the model's size (and trajectory.png).
"""
import argparse
import math
import os
import re
import time
import warnings

import torch
from torchvision.utils import make_grid, save_image

from checkpoint import CheckpointError, check_writable, load_checkpoint, load_latest, step_files
from dataset import enlarge
from config import SAMPLERS, config_from_dict, resolve_sampler
from diffusion import make_diffusion
from dit import DiT
from distributed import autocast_for, pick_device, precision


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Generate pandas with a trained DiT checkpoint.")
    p.add_argument("--ckpt", default="", help="checkpoint file (default: latest.pt of the newest run in --ckpt-dir)")
    p.add_argument("--ckpt-dir", default="checkpoints", help="where train.py wrote its runs (default: checkpoints)")
    p.add_argument("--n", type=int, default=16, help="number of images (default: 16)")
    p.add_argument("--batch-size", type=int, default=64, help="images denoised at once (default: 64)")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpm2m", "euler", "heun"], default="",
                   help="diffusion checkpoints: ddpm (ancestral), ddim (deterministic with eta=0) or dpm2m (DPM-Solver++ 2M: "
                        "deterministic, second order, one model call a step); flow checkpoints (--objective flow): euler or heun "
                        "(ODE, 1 or 2 model calls a step) (default: the checkpoint's --sampler: ddim, dpm2m for panda48 and cartoon48, heun for flow)")
    p.add_argument("--steps", type=int, default=0, help="denoising steps; 0 = max_t for ddpm, else 50 (default: 0)")
    p.add_argument("--spacing", type=float, default=0.0,
                   help="spread of the steps from noise to image: 1 = even, 2 = denser near the image, where the finest "
                        "detail is drawn (default: the checkpoint's --sample-spacing)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 = ancestral; --sampler ddpm is always ancestral; "
                                                          "euler and heun take only 0 (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same images (default: 0)")
    p.add_argument("--label", default="", help="label name (sub-folder of the training data) or index (default: all labels in turn)")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale; 1 = off (needs --label-dropout > 0 at training) (default: 1)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights (default: on)")
    p.add_argument("--no-clip", dest="clip", action="store_false", help="do not clip the predicted x0 to [-1, 1] at each step")
    p.add_argument("--trajectory", action="store_true", help="also write trajectory.png: x_t and predicted x0 at 16 steps of the first image")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (default: auto)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="run the network under bf16 autocast where train.py would train in bf16 (CUDA; CPUs with fast bf16 "
                        "matmuls); the sampler's own arithmetic stays fp32; --no-amp = fp32 throughout (default: on)")
    p.add_argument("--out", default="", help="output folder (default: samples/<run>/<step>)")
    return p.parse_args(argv)


def newest_run(ckpt_dir):
    """The run folder in ckpt_dir whose newest checkpoint was written last."""
    runs = []
    for name in os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []:
        folder = os.path.join(ckpt_dir, name)
        latest = os.path.join(folder, "latest.pt")
        files = [path for _, path in step_files(folder)] + ([latest] if os.path.exists(latest) else [])
        if files:
            runs.append((max(os.path.getmtime(path) for path in files), folder))
    if not runs:
        raise CheckpointError(f"no checkpoints found in '{ckpt_dir}'; train first (python train.py) or pass --ckpt")
    return max(runs)[1]


def load_model(state, use_ema, device):
    cfg = config_from_dict(state["config"])
    model = DiT.from_config(cfg)
    weights = state.get("ema") if use_ema and state.get("ema") is not None else state["model"]
    model.load_state_dict(weights)
    return cfg, model.to(device).eval()


def parse_label(label, classes):
    """'' -> None (cycle all labels); a class name or an index -> its index."""
    if label == "":
        return None
    if label in classes:
        return classes.index(label)
    if label.isdigit() and int(label) < len(classes):
        return int(label)
    raise SystemExit(f"error: unknown label '{label}'; this checkpoint knows: "
                     + ", ".join(f"{i}={c}" for i, c in enumerate(classes)))


def check_args(args, cfg, model):
    args.sampler = args.sampler or resolve_sampler(cfg)
    if args.sampler not in SAMPLERS[cfg.objective]:
        raise SystemExit(f"error: --sampler {args.sampler} does not sample a {cfg.objective} checkpoint; use "
                         + " or ".join(SAMPLERS[cfg.objective]))
    if args.eta and (cfg.objective == "flow" or args.sampler == "dpm2m"):
        raise SystemExit(f"error: --eta is for ddim; {args.sampler} is deterministic, drop --eta")
    steps = args.steps or (cfg.max_t if args.sampler == "ddpm" else min(50, cfg.max_t))
    if not 1 <= steps <= cfg.max_t:
        raise SystemExit(f"error: --steps must be between 1 and max_t={cfg.max_t}, got {steps}")
    if args.cfg != 1.0 and model.null_label is None:
        raise SystemExit("error: --cfg needs a model trained with --label-dropout > 0 (this one had 0); use --cfg 1")
    if args.n < 1 or args.batch_size < 1:
        raise SystemExit("error: --n and --batch-size must be >= 1")
    if args.spacing and not args.spacing >= 1:
        raise SystemExit(f"error: --spacing must be >= 1 (1 = evenly spaced steps), got {args.spacing:g}")
    if not 0.0 <= args.eta <= 1.0:
        raise SystemExit(f"error: --eta must be between 0 (deterministic) and 1 (ancestral), got {args.eta:g}")
    return steps


def generate(model, diffusion, cfg, args, steps, labels, device, callback=None):
    """args.n images in [-1, 1], in batches; noise for image i depends only on (seed, i)."""
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    return diffusion.sample_batches(model, noise, labels, args.batch_size, device, args.sampler, steps, args.seed,
                                    callback, eta=args.eta, cfg_scale=args.cfg, clip=args.clip, progress=True)


def trajectory_strip(frames):
    """Two rows: x_t and predicted x0 at each recorded step."""
    x_t, x0 = zip(*frames)
    return make_grid(enlarge((torch.cat([torch.stack(x_t), torch.stack(x0)]).clamp(-1, 1) + 1) / 2), nrow=len(frames))


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    path = args.ckpt
    try:
        if path:
            state = load_checkpoint(path, map_location="cpu")
        else:  # the run's newest readable checkpoint, as train.py would resume from
            state, path = load_latest(newest_run(args.ckpt_dir), fix="pass --ckpt with a readable checkpoint file")
        cfg, model = load_model(state, args.ema, device)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")
    except (RuntimeError, KeyError, TypeError, ValueError) as e:  # a ValueError says what it refused
        detail = e if isinstance(e, ValueError) else type(e).__name__
        raise SystemExit(f"error: '{path}' does not match this project's model ({detail}); pass a checkpoint written by train.py")
    classes = state.get("classes") or [str(i) for i in range(cfg.num_labels)]
    steps = check_args(args, cfg, model)
    label = parse_label(args.label, classes)
    labels = torch.full((args.n,), label) if label is not None else torch.arange(args.n) % cfg.num_labels
    diffusion = make_diffusion(cfg, device)
    diffusion.spacing = args.spacing or diffusion.spacing
    out = args.out or os.path.join("samples", cfg.run, str(state["step"]))
    check_writable(out, fix="pass another --out")  # before minutes of sampling, not after
    frames, keep = [], set(torch.linspace(0, steps - 1, min(16, steps)).round().long().tolist())
    record = (lambda i, t, x, x0: frames.append((x[0].float().cpu(), x0[0].float().cpu())) if i in keep else None) if args.trajectory else None
    chosen = precision(device, args.amp)[0]  # "bf16" or "fp32"
    t0 = time.time()
    with autocast_for(device, chosen):
        images = generate(model, diffusion, cfg, args, steps, labels, device, record)
    seconds = time.time() - t0
    stale = earlier_output(out, args.n, args.trajectory)
    for name in stale:
        os.remove(os.path.join(out, name))
    save_image(enlarge((images + 1) / 2), os.path.join(out, "grid.png"), nrow=int(math.ceil(math.sqrt(args.n))))
    for i, img in enumerate(images):
        save_image((img + 1) / 2, os.path.join(out, f"{i:04d}.png"))
    if frames:
        save_image(trajectory_strip(frames), os.path.join(out, "trajectory.png"))
    spread = f", spacing {diffusion.spacing:g}" if diffusion.spacing != 1 else ""
    if stale:
        print(f"removed {len(stale)} file(s) an earlier sampling left in {out}: {', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}")
    print(f"{args.n} images ({args.sampler}-{steps}{spread}, {'EMA' if args.ema and state.get('ema') is not None else 'raw'} weights, "
          f"step {state['step']}, {chosen}) in {seconds:.1f}s -> {os.path.join(out, 'grid.png')}")


def earlier_output(out, n, trajectory):
    """Files an earlier sample.py wrote to `out` (its grid.png says one did) that this one will not overwrite: left
    there, metrics.py would score them with the new images, and an old trajectory.png be taken for this one's."""
    if not os.path.exists(os.path.join(out, "grid.png")):
        return []  # another folder of the user's: nothing in it is ours to remove
    names = [f for f in os.listdir(out) if re.fullmatch(r"\d{4,}\.png", f) and int(f[:-4]) >= n]
    if not trajectory and os.path.exists(os.path.join(out, "trajectory.png")):
        names.append("trajectory.png")
    return sorted(names)


if __name__ == "__main__":
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"  # one line, no source line
    main()

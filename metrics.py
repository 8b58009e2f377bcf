"""Sliced Wasserstein distance (SWD) between two sets of images, as in Karras et al. 2018.

    python metrics.py REAL_DIR FAKE_DIR --size 64 --n 256
    python metrics.py REAL_DIR --calibrate --holdout 100     # what real, blurred and noise score

"Progressive Growing of GANs", section 5 and appendix D. Each image becomes a Laplacian
pyramid (5-tap binomial filter) from full size down to 16 px: every level but the coarsest
is a band-pass image, the coarsest is the low-pass image itself. From each level 128 random
7x7 neighbourhoods per image give 3 * 7 * 7 = 147-dim descriptors. Each set's descriptors
are normalised per channel by that set's own mean and std, as in the paper (so a set's
global colour cast or contrast is not what is measured: structure at each scale is). The
distance between two descriptor sets is the 1-D Wasserstein-1 distance of their projections
on random unit directions (sorted projections matched in order), averaged over 4 x 128
directions. Reported x1e3 per level (finest first) and as the mean; lower is better.
"""
import argparse
import functools
import math
import os
import sys
import warnings

import torch
import torch.nn.functional as F

from dataset import DataError, folder_files, holdout_split, load_image

EVAL_SIZE = 64  # training measures SWD at 64 px (samples are resized), so presets are comparable
# The starting noise of the samples every SWD measurement draws (train.py's --eval-every, the first set of
# scripts/quality_curve.py): one checkpoint gets one figure, and runs are compared on the same noise.
EVAL_NOISE_SEED = 1234
SHEETS = ("grid.png", "trajectory.png")  # sample.py's composites, not samples: skipped in FAKE_DIR


# ---------------------------------------------------------------------------------------------
# the metric


def _binomial_blur(x):
    """Separable 5-tap [1, 4, 6, 4, 1] / 16 filter, reflect padding. x: (N, C, H, W) float."""
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=x.dtype, device=x.device) / 16
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="reflect"), k.view(1, 1, 1, 5).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, 2, 2), mode="reflect"), k.view(1, 1, 5, 1).repeat(c, 1, 1, 1), groups=c)


def pyr_down(x):
    return _binomial_blur(x)[..., ::2, ::2]  # (N, C, ceil(H/2), ceil(W/2))


def pyr_up(x, size):
    """Zero-insertion upsampling to `size` (H, W), then the same filter x4 to keep the mean."""
    up = torch.zeros(*x.shape[:2], 2 * x.shape[2], 2 * x.shape[3], dtype=x.dtype, device=x.device)
    up[..., ::2, ::2] = x
    return 4 * _binomial_blur(up)[..., :size[0], :size[1]]


def laplacian_pyramid(x, min_res=16):
    """[band at H, band at H/2, ..., low-pass at the last size >= min_res]; finest first."""
    levels = []
    while x.shape[-1] // 2 >= min_res and x.shape[-2] // 2 >= min_res:
        small = pyr_down(x)
        levels.append(x - pyr_up(small, x.shape[-2:]))
        x = small
    return levels + [x]


def descriptors(level, nhoods, generator, size=7):
    """`nhoods` random size x size neighbourhoods per image: (N * nhoods, C, size, size)."""
    n, c, h, w = level.shape
    ys = torch.randint(0, h - size + 1, (n, nhoods, 1, 1), generator=generator).to(level.device)
    xs = torch.randint(0, w - size + 1, (n, nhoods, 1, 1), generator=generator).to(level.device)
    offset = torch.arange(size, device=level.device)
    rows, cols = ys + offset.view(1, 1, size, 1), xs + offset.view(1, 1, 1, size)  # (N, K, 7, 1), (N, K, 1, 7)
    batch = torch.arange(n, device=level.device).view(n, 1, 1, 1)
    patches = level.permute(0, 2, 3, 1)[batch, rows, cols]  # (N, K, 7, 7, C)
    return patches.permute(0, 1, 4, 2, 3).reshape(n * nhoods, c, size, size)


def normalize(desc, mean=None, std=None):
    """Per-channel standardisation of (M, C, 7, 7) descriptors, flattened to (M, C * 49)."""
    mean = desc.mean(dim=(0, 2, 3), keepdim=True) if mean is None else mean
    std = desc.std(dim=(0, 2, 3), keepdim=True) if std is None else std
    return ((desc - mean) / std.clamp(min=1e-8)).flatten(1)


def sliced_wasserstein(a, b, generator, repeats=4, dirs=128):
    """Mean over repeats x dirs random unit directions of W1 between the projected sets."""
    m = min(len(a), len(b))
    ia = ((torch.arange(m) + 0.5) * len(a) / m).long().to(a.device)  # common quantiles when sizes differ
    ib = ((torch.arange(m) + 0.5) * len(b) / m).long().to(b.device)
    dists = []
    for _ in range(repeats):
        d = torch.randn(a.shape[1], dirs, generator=generator, dtype=torch.float64).to(a.device, a.dtype)
        d = d / d.norm(dim=0, keepdim=True)  # (D, dirs) unit directions
        pa = (d.t() @ a.t()).sort(dim=1).values  # (dirs, M) sorted projections; sorting rows is ~2x faster
        pb = (d.t() @ b.t()).sort(dim=1).values
        dists.append((pa[:, ia] - pb[:, ib]).abs().mean())
    return torch.stack(dists).mean().item()


def _as_float(images, name):
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[-1] < 7 or images.shape[-2] < 7:
        raise ValueError(f"{name} must be a tensor (N, C, H, W) with H, W >= 7, got "
                         f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()


@torch.no_grad()
def swd(real, fake, seed=0, nhoods=128, repeats=4, dirs=128, min_res=16, norm="set"):
    """SWD x1e3 between two image sets (N, C, H, W), uint8 or float (any range: see `norm`).

    Returns {'levels': [per level, finest first], 'resolutions': [H, H/2, ...], 'mean': float}.
    norm='set' (the paper): each set standardised by its own per-channel mean/std, so a
    constant colour cast or contrast change per set is ignored; norm='union': both sets by
    the statistics of their union, so such shifts count too.
    Same seed, same inputs -> same value; identical sets -> 0.
    """
    real, fake = _as_float(real, "real"), _as_float(fake, "fake")
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(f"real and fake images must have the same (C, H, W), got {tuple(real.shape[1:])} and {tuple(fake.shape[1:])}")
    if norm not in ("set", "union"):
        raise ValueError(f"norm must be 'set' or 'union', got '{norm}'")
    levels, resolutions = [], []
    for i, (lr, lf) in enumerate(zip(laplacian_pyramid(real, min_res), laplacian_pyramid(fake, min_res))):
        # same positions for both sets (same seed): identical sets give exactly 0
        dr = descriptors(lr, nhoods, torch.Generator().manual_seed(seed * 7919 + i))
        df = descriptors(lf, nhoods, torch.Generator().manual_seed(seed * 7919 + i))
        if norm == "set":
            dr, df = normalize(dr), normalize(df)
        else:
            both = torch.cat([dr, df])
            stats = both.mean(dim=(0, 2, 3), keepdim=True), both.std(dim=(0, 2, 3), keepdim=True)
            dr, df = normalize(dr, *stats), normalize(df, *stats)
        gen = torch.Generator().manual_seed(seed * 7919 + 1000 + i)
        levels.append(1e3 * sliced_wasserstein(dr, df, gen, repeats, dirs))
        resolutions.append(lr.shape[-1])
    return {"levels": levels, "resolutions": resolutions, "mean": sum(levels) / len(levels)}


# ---------------------------------------------------------------------------------------------
# images in: reference files, generated samples


def load_images(paths, size):
    """Decode files to a uint8 tensor (N, 3, size, size) (dataset.load_image); unreadable files are skipped."""
    images, bad = [], []
    for path in paths:
        try:
            images.append(torch.frombuffer(bytearray(load_image(path, size).tobytes()), dtype=torch.uint8))
        except Exception as e:  # corrupt, truncated, not an image...
            bad.append(f"{os.path.basename(path)} ({type(e).__name__})")
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable image file(s), e.g. {', '.join(bad[:3])}", stacklevel=2)
    if not images:
        raise DataError(f"none of the {len(paths)} image files could be read")
    return torch.stack(images).view(-1, size, size, 3).permute(0, 3, 1, 2).contiguous()


@functools.lru_cache(maxsize=4)
def reference_images(paths, size):
    """load_images, decoded once per process: training evaluates against the same files repeatedly."""
    return load_images(list(paths), size)


def reference_paths(held_out, train_files, n):
    """What training measures against: the held-out files, else n training files spread evenly."""
    if held_out:
        return list(held_out)
    files = sorted(train_files)
    return [files[i * len(files) // min(n, len(files))] for i in range(min(n, len(files)))]


def score_samples(fake, held_out, train_files, seed=0):
    """SWD at EVAL_SIZE of samples in [-1, 1] against a run's reference files (`reference_paths`);
    returns the result and how many reference images it used."""
    paths = reference_paths(held_out, train_files, len(fake))
    return swd(reference_images(tuple(paths), EVAL_SIZE), to_uint8(fake), seed=seed), len(paths)


def to_uint8(images, size=EVAL_SIZE):
    """Samples in [-1, 1] (N, C, h, w) -> [0, 255] values at size x size, rounded like a saved PNG.

    Stays float so that non-finite samples give a non-finite SWD instead of a fake good score.
    """
    x = (images.float() + 1) * 127.5
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=x.shape[-1] > size, align_corners=False)
    return x.round().clamp(0, 255)


# ---------------------------------------------------------------------------------------------
# calibration: what real photos, degraded photos and noise score against a reference


def gaussian_blur(images, sigma):
    """Gaussian blur (radius 3 sigma, reflect padding); uint8 in -> float in [0, 1] out."""
    x = _as_float(images, "images")
    radius = max(1, math.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    k, c = k / k.sum(), x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def down_up(images, low):
    """Downscale to low x low (antialiased bicubic) and back: the detail a low-res model lacks. [0, 1] out."""
    x = _as_float(images, "images")
    small = F.interpolate(x, size=(low, low), mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(small, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)


def calibrate(folder, size, n, holdout, seed=0, norm="set"):
    """[(name, swd dict)]: the last `holdout` files are the reference; the first n others are 'real'."""
    train, held = holdout_split(folder_files(folder), holdout)
    ref, real = load_images(held, size), load_images(train[:n], size)
    noise = torch.randint(0, 256, real.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    rows = [("real vs reference", real), ("real blurred sigma 1", gaussian_blur(real, 1.0)),
            ("real at 48 px and back", down_up(real, 48)), ("real at 32 px and back", down_up(real, 32)),
            ("real at 16 px and back", down_up(real, 16)), ("uniform noise", noise),
            ("reference itself blurred sigma 1", gaussian_blur(ref, 1.0)),
            ("reference itself at 16 px and back", down_up(ref, 16))]
    return [(name, swd(ref, x, seed, norm=norm)) for name, x in rows]


# ---------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sliced Wasserstein distance (Karras et al. 2018) between two folders of images; lower is better.")
    p.add_argument("real_dir", metavar="REAL_DIR", help="folder of reference images (flat or one sub-folder per label)")
    p.add_argument("fake_dir", metavar="FAKE_DIR", nargs="?", default="", help="folder of images to score, e.g. sample.py's output")
    p.add_argument("--size", type=int, default=EVAL_SIZE, help=f"images are resized and centre-cropped to this many pixels (default: {EVAL_SIZE})")
    p.add_argument("--n", type=int, default=256, help="images used from each folder, first in sorted order (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the neighbourhoods and projections; same seed, same value (default: 0)")
    p.add_argument("--norm", choices=["set", "union"], default="set",
                   help="descriptor standardisation: each set by its own statistics (the paper) or by their union (default: set)")
    p.add_argument("--calibrate", action="store_true",
                   help="instead of FAKE_DIR: score other real images, blurred and downscaled ones and noise against REAL_DIR's held-out files")
    p.add_argument("--holdout", type=int, default=100, help="with --calibrate: the last N files of REAL_DIR are the reference (default: 100)")
    args = p.parse_args(argv)
    if not args.calibrate and not args.fake_dir:
        p.error("FAKE_DIR is required (or pass --calibrate)")
    if args.size < 16 or args.n < 1:
        p.error("--size must be >= 16 and --n >= 1")
    return args


def format_row(name, result):
    levels = "  ".join(f"{res}px {v:7.2f}" for res, v in zip(result["resolutions"], result["levels"]))
    return f"{name:<36} SWD x1e3 mean {result['mean']:7.2f}   {levels}"


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.calibrate:
            rows = calibrate(args.real_dir, args.size, args.n, args.holdout, args.seed, args.norm)
        else:
            real = load_images(folder_files(args.real_dir)[:args.n], args.size)
            fake = load_images([f for f in folder_files(args.fake_dir) if os.path.basename(f) not in SHEETS][:args.n], args.size)
            rows = [(f"{len(real)} real vs {len(fake)} fake", swd(real, fake, args.seed, norm=args.norm))]
    except DataError as e:
        sys.exit(f"error: {e}")
    for name, result in rows:
        print(format_row(name, result))


if __name__ == "__main__":
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"  # one line, no source line
    main()

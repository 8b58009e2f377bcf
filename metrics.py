"""Image quality of samples against real images: SWD, its real-vs-real floor, KID/FID, memorisation.

    python metrics.py REAL_DIR FAKE_DIR                      # SWD x1e3, both image counts
    python metrics.py REAL_DIR FAKE_DIR --calibrate --kid --fid --memorisation
    python metrics.py REAL_DIR --calibrate --n 100 --n-fake 256   # the floor for 256 samples vs 100 photos

SWD (sliced Wasserstein distance), as in Karras et al. 2018, "Progressive Growing of GANs",
section 5 and appendix D. Each image becomes a Laplacian pyramid (5-tap binomial filter) from
full size down to 16 px: every level but the coarsest is a band-pass image, the coarsest is the
low-pass image itself. From each level 128 random 7x7 neighbourhoods per image give
3 * 7 * 7 = 147-dim descriptors. Each set's descriptors are normalised per channel by that
set's own mean and std, as in the paper (so a set's global colour cast or contrast is not what
is measured: structure at each scale is). The distance between two descriptor sets is the 1-D
Wasserstein-1 distance of their projections on random unit directions (sorted projections
matched in order), averaged over 4 x 128 directions. Reported x1e3 per level (finest first) and
as the mean; lower is better. SWD falls as the image counts grow, so a figure means something
only beside its counts and beside the floor: two disjoint sets of real images at the same counts.

KID and FID (Binkowski et al. 2018, Heusel et al. 2017) are the field's figures: torchmetrics'
arithmetic on torch-fidelity's InceptionV3 pool features (requirements-eval.txt). At a few
hundred images KID is the one to read: unbiased, where FID is biased upwards at small counts.
"""
import argparse
import contextlib
import functools
import importlib.util
import io
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


def eval_noise(n, cfg, k=0):
    """Noise set k of the SWD measurements (k = 0: train.py's) and the seed of its sampler's own draws."""
    seed = EVAL_NOISE_SEED + k
    return torch.randn(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(seed)), seed


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

    Returns {'levels': [per level, finest first], 'resolutions': [H, H/2, ...], 'mean': float,
    'n_real': len(real), 'n_fake': len(fake)}: SWD depends on the counts, so they travel with it.
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
    return {"levels": levels, "resolutions": resolutions, "mean": sum(levels) / len(levels),
            "n_real": len(real), "n_fake": len(fake)}


# ---------------------------------------------------------------------------------------------
# images in: reference files, generated samples


def load_images(paths, size):
    """Decode files to a uint8 tensor (N, 3, size, size) (dataset.load_image); unreadable files are skipped."""
    return load_images_and_paths(paths, size)[0]


def load_images_and_paths(paths, size):
    """load_images, and the paths of the images it returns (the unreadable ones left out), in order."""
    images, kept, bad = [], [], []
    for path in paths:
        try:
            images.append(torch.frombuffer(bytearray(load_image(path, size).tobytes()), dtype=torch.uint8))
            kept.append(path)
        except Exception as e:  # corrupt, truncated, not an image...
            bad.append(f"{os.path.basename(path)} ({type(e).__name__})")
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable image file(s), e.g. {', '.join(bad[:3])}", stacklevel=3)
    if not images:
        raise DataError(f"none of the {len(paths)} image files could be read")
    return torch.stack(images).view(-1, size, size, 3).permute(0, 3, 1, 2).contiguous(), kept


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


def sample_files(folder):
    """A folder's images less sample.py's composite sheets."""
    return [f for f in folder_files(folder) if os.path.basename(f) not in SHEETS]


def score_samples(fake, paths, seed=0, norm="set"):
    """SWD at EVAL_SIZE of samples in [-1, 1] against a run's reference files (`reference_paths`);
    the result's 'n_real' and 'n_fake' are the counts."""
    return swd(reference_images(tuple(paths), EVAL_SIZE), as_saved_png(fake), seed=seed, norm=norm)


def seams(images, patch):
    """How much a DiT's patch grid shows: the mean step between neighbouring pixels across patch borders
    over that within patches, both directions, at the images' own size. ~1 for images that know no grid
    (the training data), above 1 where patches are drawn apart. SWD hardly sees it (docs/experiments.md)."""
    x = images.float()
    ratios = []
    for dim in (-1, -2):
        steps = (x.narrow(dim, 1, x.shape[dim] - 1) - x.narrow(dim, 0, x.shape[dim] - 1)).abs()  # (N, C, H, W-1) or (.., H-1, W)
        steps = steps.movedim(dim, 0).flatten(1).mean(1)  # mean step between pixel i and i+1
        border = (torch.arange(1, x.shape[dim]) % patch) == 0
        ratios.append(steps[border].mean() / steps[~border].mean().clamp_min(1e-8))
    return float(sum(ratios) / 2)


def as_saved_png(images, size=EVAL_SIZE):
    """Samples in [-1, 1] (N, C, h, w) -> [0, 1] at size x size, on the 8-bit steps of a saved PNG:
    the scale _as_float gives uint8 photos, so the two sets can share one normalisation.

    Stays float so that non-finite samples give a non-finite SWD instead of a fake good score.
    """
    x = (images.float() + 1) * 127.5
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=x.shape[-1] > size, align_corners=False)
    return x.round().clamp(0, 255) / 255


# ---------------------------------------------------------------------------------------------
# calibration: what real photos, degraded photos and noise score at the same counts


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


def random_split(n_total, n_real, n_fake, generator):
    """Disjoint random index sets of sizes n_real and n_fake from range(n_total)."""
    perm = torch.randperm(n_total, generator=generator)
    return perm[:n_real], perm[n_real:n_real + n_fake]


def floor(images, n_real, n_fake, splits=5, seed=0, norm="set"):
    """SWD between disjoint random subsets of one set of real images, n_fake vs n_real, over `splits`
    random splits: the best a generator can score at those counts. swd's keys, averaged, plus
    'std' and 'splits' (each split's mean)."""
    if n_real + n_fake > len(images):
        raise DataError(f"the real-vs-real floor at {n_fake} vs {n_real} needs {n_real + n_fake} real images, "
                        f"REAL_DIR has {len(images)}; lower --n or --n-fake")
    generator = torch.Generator().manual_seed(seed)
    results = []
    for _ in range(splits):
        ir, jf = random_split(len(images), n_real, n_fake, generator)
        results.append(swd(images[ir], images[jf], seed, norm=norm))
    means = torch.tensor([r["mean"] for r in results], dtype=torch.float64)
    levels = torch.tensor([r["levels"] for r in results], dtype=torch.float64).mean(0).tolist()
    return {**results[0], "levels": levels, "mean": means.mean().item(),
            "std": means.std().item() if splits > 1 else 0.0, "splits": means.tolist()}


def calibrate(images, n_real, n_fake, splits=5, seed=0, norm="set"):
    """[(name, swd dict)] at n_fake vs n_real: the real-vs-real floor, then the first split's 'fake'
    half blurred, downscaled and replaced by noise, scored against its 'real' half (the scale above it)."""
    floor_row = ("real vs real (floor)", floor(images, n_real, n_fake, splits, seed, norm))
    ir, jf = random_split(len(images), n_real, n_fake, torch.Generator().manual_seed(seed))  # the floor's first split
    ref, real = images[ir], images[jf]
    noise = torch.randint(0, 256, real.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    rows = [("real blurred sigma 1", gaussian_blur(real, 1.0))]
    rows += [(f"real at {low} px and back", down_up(real, low)) for low in (48, 32, 16) if low < real.shape[-1]]
    rows += [("uniform noise", noise)]
    return [floor_row] + [(name, swd(ref, x, seed, norm=norm)) for name, x in rows]


# ---------------------------------------------------------------------------------------------
# KID and FID: torchmetrics' arithmetic on torch-fidelity's InceptionV3 features


class Passthrough(torch.nn.Module):
    """Features computed once, handed to torchmetrics as its 'network': KID and FID share one pass."""

    def __init__(self, num_features):
        super().__init__()
        self.num_features = num_features  # FID sizes its state from this instead of a 299 px dummy image

    def forward(self, x):
        return x


@torch.no_grad()
def features(images, network, batch=50):
    """network(images) in batches, as float64 (N, D) on the CPU; the network's device is used."""
    device = next(network.parameters(), torch.empty(0)).device
    return torch.cat([network(images[i:i + batch].to(device)).double().cpu() for i in range(0, len(images), batch)])


def fid(f_real, f_fake):
    """FID (torchmetrics) between two feature sets (N, D): Gaussians fitted to each, Frechet distance."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    metric = FrechetInceptionDistance(feature=Passthrough(f_real.shape[1]))
    metric.update(f_real, real=True)
    metric.update(f_fake, real=False)
    return metric.compute().item()


def kid(f_real, f_fake, subsets=100, subset_size=1000, seed=0):
    """KID (torchmetrics): unbiased MMD^2, kernel (x.y / D + 1)^3, mean and std over `subsets` random
    subsets of min(subset_size, both counts) images of each set; the same seed draws the same subsets."""
    from torchmetrics.image.kid import KernelInceptionDistance
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "saves all features in a buffer": a few hundred here
        metric = KernelInceptionDistance(feature=Passthrough(f_real.shape[1]), subsets=subsets,
                                         subset_size=min(subset_size, len(f_real), len(f_fake)))
    metric.update(f_real, real=True)
    metric.update(f_fake, real=False)
    with torch.random.fork_rng(devices=[]):  # torchmetrics draws the subsets from the global RNG
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return mean.item(), std.item()


def has_torch_fidelity():
    return importlib.util.find_spec("torch_fidelity") is not None


def load_inception(weights=None):
    """torch-fidelity's InceptionV3 (2048-d pool features, what FID and KID are defined on), or None
    after one sentence saying how to get it. weights: its weights file; None downloads them once."""
    if not has_torch_fidelity():
        print("no KID/FID: they need torch-fidelity's Inception network; pip install -r requirements-eval.txt")
        return None
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    from torchmetrics.image.fid import NoTrainInceptionV3
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # torch.hub's "Downloading: ..." line, even when it fails
            net = NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights)
    except Exception as e:  # offline download, missing, truncated or foreign weights file
        if weights:
            raise DataError(f"could not load the Inception weights '{weights}' ({type(e).__name__}); "
                            f"pass --inception-weights the file at {URL_INCEPTION_V3}")
        print(f"no KID/FID: the Inception weights could not be downloaded ({type(e).__name__}); download "
              f"{URL_INCEPTION_V3} where there is internet and pass it as --inception-weights FILE")
        return None
    return net.to("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------
# the procedural pandas' faces: parts in place, which SWD's texture statistics do not see

def _components(mask):
    """4-connected components of a bool (H, W) tensor, as lists of (row, column)."""
    grid = mask.tolist()  # plain lists: element access on a tensor is ~100x slower
    H, W = len(grid), len(grid[0])
    seen, found = [[not v for v in row] for row in grid], []
    for i0 in range(H):
        for j0 in range(W):
            if seen[i0][j0]:
                continue
            seen[i0][j0] = True
            stack, part = [(i0, j0)], []
            while stack:
                i, j = stack.pop()
                part.append((i, j))
                for a, b in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
                    if 0 <= a < H and 0 <= b < W and not seen[a][b]:
                        seen[a][b] = True
                        stack.append((a, b))
            found.append(part)
    return found


def cartoon_face(image):
    """Does one procedural-panda image (3, H, W, uint8) show a face the way dataset.draw_panda draws one: a white
    head-and-body blob (>= 4% of the image) with two dark eye patches inside it (dark spots of >= 2 pixels
    that white surrounds) and >= 4 dark parts on its outline (ears, arms, legs)? Every drawn panda at 48 px passes."""
    x = image.int()
    low, high = x.min(0).values, x.max(0).values
    white, dark = (low > 190) & (high - low < 30), high < 90  # off-white fur; black parts (no background is this dark)
    blobs = _components(white)
    body = max(blobs, key=len, default=[])
    if len(body) < 0.04 * white.numel():
        return False
    H, W = white.shape
    inside = torch.zeros_like(white)
    inside[tuple(torch.tensor(body).T)] = True
    holes = torch.zeros_like(white)  # what the body surrounds: parts of the rest that do not reach the border
    for part in _components(~inside):
        if not any(i in (0, H - 1) or j in (0, W - 1) for i, j in part):
            holes[tuple(torch.tensor(part).T)] = True
    eyes = sum(1 for part in _components(dark & holes) if len(part) >= 2)  # dark spots white surrounds
    near = (F.max_pool2d(inside[None, None].float(), 3, 1, 1)[0, 0].bool() & ~holes).tolist()  # the body's outline, outside it
    outline = sum(1 for part in _components(dark & ~holes) if any(near[i][j] for i, j in part))
    return eyes >= 2 and outline >= 4


FACE_SIZE = 48  # where cartoon_face's pixel thresholds hold: at 96 px and up a nose and a mouth pass for two eye patches


def cartoon_faces(images):
    """The share of images (N, 3, H, W; uint8, or floats in [-1, 1] as sampled) that pass cartoon_face, checked at
    FACE_SIZE: larger images are first reduced to it, as the data pipeline reduces the drawn pandas."""
    x = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()
    if min(x.shape[-2:]) > FACE_SIZE:
        x = F.interpolate(x, size=(FACE_SIZE, FACE_SIZE), mode="bicubic", antialias=True, align_corners=False)
    images = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return sum(cartoon_face(image) for image in images) / len(images)


@functools.lru_cache(maxsize=4)
def reference_faces(paths, size):
    """cartoon_faces of the reference files at size, once per process (training asks at every evaluation)."""
    return cartoon_faces(reference_images(paths, size))


def faces_against(fake, real):
    """(share of fake with a cartoon face, real: the reference images' share), or None when real is under
    90%: the data are not the procedural pandas, and the check would say nothing."""
    return (cartoon_faces(fake), real) if real >= 0.9 else None


# ---------------------------------------------------------------------------------------------
# memorisation: is a sample closer to a training image than a new image would be?

# A copy of a training image (or its flip) sits at ratio ~0; a new image is about as close to the
# training set as to the held-out one (ratio near 1), so under half that is flagged as a near-copy.
MEMO_THRESHOLD = 0.5


def nearest(x, bank):
    """(L2 distance, index) of each image's nearest image in bank; both (N, C, H, W), any dtype."""
    d = torch.cdist(x.flatten(1).double(), bank.flatten(1).double())  # (N, M)
    return d.min(dim=1)


def memorisation(fake, train, held, threshold=MEMO_THRESHOLD):
    """Per sample: L2 to its nearest training image over L2 to its nearest held-out image, flips of
    both included. Returns {'ratio': (N,), 'nearest': index into train, 'flipped': bool (N,),
    'mean', 'min', 'flagged': fraction with ratio < threshold, 'threshold'}."""
    d_train, i_train = nearest(fake, torch.cat([train, train.flip(-1)]))
    d_held = nearest(fake, torch.cat([held, held.flip(-1)])).values
    ratio = d_train / d_held.clamp(min=1e-12)
    return {"ratio": ratio, "nearest": i_train % len(train), "flipped": i_train >= len(train),
            "mean": ratio.mean().item(), "min": ratio.min().item(),
            "flagged": (ratio < threshold).double().mean().item(), "threshold": threshold}


def native_size(path):
    """The shorter side of an image file: samples are written at the model's resolution."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            return min(img.size)
    except OSError as e:
        raise DataError(f"cannot read '{path}' ({type(e).__name__}); remove it from FAKE_DIR")


# ---------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Quality of FAKE_DIR's images against REAL_DIR's: SWD x1e3 (Karras et al. 2018; lower is better) "
                    "with both image counts, and on request its real-vs-real floor, KID/FID and a memorisation check.")
    p.add_argument("real_dir", metavar="REAL_DIR", help="folder of reference images (flat or one sub-folder per label)")
    p.add_argument("fake_dir", metavar="FAKE_DIR", nargs="?", default="", help="folder of images to score, e.g. sample.py's output")
    p.add_argument("--size", type=int, default=EVAL_SIZE,
                   help=f"images are resized and centre-cropped to this many pixels for SWD, KID and FID "
                        f"(default: {EVAL_SIZE}, as training measures)")
    p.add_argument("--n", type=int, default=256, help="reference images used from REAL_DIR, first in sorted order (default: 256)")
    p.add_argument("--n-fake", type=int, default=0, metavar="N",
                   help="images used from FAKE_DIR, first in sorted order; with --calibrate and no FAKE_DIR, the sample count "
                        "to calibrate for (default: --n)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the neighbourhoods, projections, floor splits and KID subsets; same seed, same value (default: 0)")
    p.add_argument("--norm", choices=["set", "union"], default="set",
                   help="SWD descriptor standardisation: each set by its own statistics (the paper) or by their union (default: set)")
    p.add_argument("--calibrate", action="store_true",
                   help="also the floor: SWD between disjoint random subsets of REAL_DIR at the same counts (mean and spread over "
                        "--splits splits), then blurred, downscaled and noise images at those counts; works without FAKE_DIR")
    p.add_argument("--splits", type=int, default=5, metavar="K", help="with --calibrate: random splits the floor is averaged over (default: 5)")
    p.add_argument("--kid", action="store_true",
                   help="also KID x1e3 (mean and std over 100 subsets), on InceptionV3 features (pip install -r requirements-eval.txt)")
    p.add_argument("--fid", action="store_true",
                   help="also FID, on InceptionV3 features; biased upwards at a few hundred images: read KID there")
    p.add_argument("--inception-weights", metavar="FILE", default=None,
                   help="torch-fidelity's InceptionV3 weights file (weights-inception-2015-12-05-6726825d.pth) for machines "
                        "without internet (default: downloaded on first use)")
    p.add_argument("--memorisation", action="store_true",
                   help=f"also, at the samples' own resolution: each sample's L2 distance to its nearest training image over that "
                        f"to its nearest held-out image (flips included); the mean, min, fraction under {MEMO_THRESHOLD} "
                        f"(near-copies) and the closest pairs")
    p.add_argument("--holdout", type=int, default=100, metavar="N",
                   help="with --memorisation: the last N files of REAL_DIR (sorted) were held out of training, as train.py --holdout N; "
                        "the rest are the training images (default: 100)")
    args = p.parse_args(argv)
    needs_fake = [flag for flag, on in (("--kid", args.kid), ("--fid", args.fid), ("--memorisation", args.memorisation)) if on]
    if not args.fake_dir and (needs_fake or not args.calibrate):
        p.error(f"FAKE_DIR is required{' with ' + ', '.join(needs_fake) if needs_fake else ' (or pass --calibrate)'}")
    if args.size < 16 or args.n < 1 or args.n_fake < 0 or args.splits < 1 or (args.memorisation and args.holdout < 1):
        p.error("--size must be >= 16, --n, --splits (and --holdout with --memorisation) >= 1, --n-fake >= 0")
    if args.inception_weights and not os.path.isfile(args.inception_weights):
        p.error(f"--inception-weights '{args.inception_weights}' is not a file; download it first (see --help)")
    args.n_fake = args.n_fake or args.n
    return args


def counts(result):
    return f"({result['n_fake']} images vs {result['n_real']} reference)"


def format_row(name, result):
    levels = "  ".join(f"{res}px {v:7.2f}" for res, v in zip(result["resolutions"], result["levels"]))
    spread = f" +- {result['std']:5.2f}" if "std" in result else ""
    return f"{name:<24} SWD x1e3 {result['mean']:7.2f}{spread} {counts(result)}   {levels}"


def samples_as_training_scores_them(paths, size):
    """Samples smaller than `size` (a 48 px model's), enlarged the way training's evaluation enlarges its own
    (as_saved_png, not PIL's bicubic), so that sample.py's PNGs score here as they did in training; None otherwise."""
    for path in paths:  # the first readable one: load_images skips the others with a warning
        try:
            native = native_size(path)
            break
        except DataError:
            continue
    else:
        raise DataError(f"none of the {len(paths)} image files could be read")
    if native >= size:
        return None
    return as_saved_png(load_images(paths, native).float() / 127.5 - 1, size)


def report_floor(args, n_real, n_fake):
    rows = calibrate(load_images(folder_files(args.real_dir), args.size), n_real, n_fake, args.splits, args.seed, args.norm)
    for name, result in rows:
        print(format_row(name, result))
    splits = rows[0][1]["splits"]
    print(f"  the floor over {len(splits)} random disjoint splits of REAL_DIR: {min(splits):.2f} to {max(splits):.2f}")


def report_kid_fid(args, real, fake):
    network = load_inception(args.inception_weights)
    if network is None:
        return
    f_real, f_fake = features(real, network), features(fake, network)
    counted = f"({len(fake)} images vs {len(real)} reference)"
    if args.kid:
        mean, std = kid(f_real, f_fake, seed=args.seed)
        print(f"{'KID':<24} x1e3 {1e3 * mean:7.2f} +- {1e3 * std:5.2f} {counted}, 100 subsets of {min(1000, len(real), len(fake))}")
    if args.fid:
        print(f"{'FID':<24} {fid(f_real, f_fake):12.2f} {counted}, biased upwards at these counts")


def report_memorisation(args, fake_paths, closest=5):
    size = native_size(fake_paths[0])
    train_paths, held_paths = holdout_split(folder_files(args.real_dir), args.holdout)
    fake, fake_paths = load_images_and_paths(fake_paths, size)
    train, train_paths = load_images_and_paths(train_paths, size)
    held = load_images(held_paths, size)
    m = memorisation(fake, train, held)
    print(f"memorisation at {size} px ({len(fake)} samples, {len(train)} training and {len(held)} held-out images, flips "
          f"included): nearest-training / nearest-held-out L2 mean {m['mean']:.3f}, min {m['min']:.3f}; "
          f"{m['flagged']:.1%} of samples under {m['threshold']} (near-copies)")
    for i in m["ratio"].argsort()[:closest].tolist():
        flip = " (flipped)" if m["flipped"][i] else ""
        print(f"  {m['ratio'][i].item():.3f}  {fake_paths[i]}  ~  {train_paths[m['nearest'][i]]}{flip}")


def report(args):
    if not args.fake_dir:
        return report_floor(args, args.n, args.n_fake)
    fake_paths = sample_files(args.fake_dir)[:args.n_fake]
    real = load_images(folder_files(args.real_dir)[:args.n], args.size)
    scored = samples_as_training_scores_them(fake_paths, args.size)
    fake = load_images(fake_paths, args.size) if scored is None or args.kid or args.fid else None
    result = swd(real, fake if scored is None else scored, args.seed, norm=args.norm)
    print(format_row("samples", result))
    if args.calibrate:
        report_floor(args, result["n_real"], result["n_fake"])
    if args.kid or args.fid:
        report_kid_fid(args, real, fake)
    if args.memorisation:
        report_memorisation(args, fake_paths)


def main(argv=None):
    args = parse_args(argv)
    try:
        report(args)
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"  # one line, no source line
    main()

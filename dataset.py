"""Panda photos in, uint8 tensors out: find, decode once, cache, shuffle, flip; plus generated pandas.

A folder is either flat (one label, as in the description) or has one sub-folder per label.
Every file is decoded, converted to RGB, resized and centre-cropped once, then kept in a
memory-mapped uint8 cache keyed by the file list, so an epoch costs no JPEG decoding and
the cache survives restarts. Batches are drawn by `EpochBatches`, whose order and flips are
a pure function of (seed, epoch, position): that is what makes resume exact.
"""
import hashlib
import math
import multiprocessing
import os
import random
import warnings

import torch
from PIL import Image, ImageDraw, ImageFilter, ImageOps
from tqdm.auto import tqdm

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_DATA_DIR = os.path.join("data", "pandas")


class DataError(Exception):
    """A problem with the user's images, explained in one sentence."""


def find_images(root):
    """Return ([(path, label_index)], class_names). Sub-folders with images are labels."""
    if not os.path.isdir(root):
        raise DataError(f"data folder '{root}' does not exist; pass --data-dir with a folder of images")
    subdirs = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    classes = [d for d in subdirs if _image_files(os.path.join(root, d))]
    if not classes:
        files = [(p, 0) for p in _image_files(root, recursive=False)]
        return files, [os.path.basename(os.path.normpath(root)) or "images"]
    files = [(p, i) for i, c in enumerate(classes) for p in _image_files(os.path.join(root, c))]
    return files, classes


def _image_files(folder, recursive=True):
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):  # does not follow symlinked folders: no loops
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if f.lower().endswith(EXTENSIONS) and not f.startswith(".")]
        if not recursive:
            break
    return found


def to_rgb(img):
    """Any PIL mode -> RGB; transparency is composited onto white, 16-bit is scaled to 8-bit."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    elif img.mode == "F":
        img = img.convert("L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def load_image(path, size):
    """Decode one file to a size x size RGB PIL image: shorter side resized to `size`, centre crop."""
    with Image.open(path) as img:
        img.draft("RGB", (size, size))  # JPEG: let libjpeg decode at a reduced scale, much faster
        img = to_rgb(ImageOps.exif_transpose(img))
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC, reducing_gap=3.0)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def cache_key(files, size):
    h = hashlib.sha1(f"v1 {size}".encode())
    for path, label in files:
        st = os.stat(path)
        h.update(f"{os.path.abspath(path)}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def build_cache(files, size, path):
    """Decode every file into a flat uint8 file (N, size, size, 3). Returns the kept (file, label) list."""
    kept, bad = [], []
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as out:
        for file, label in tqdm(files, desc=f"decoding {len(files)} images to {size}px (once)", leave=False):
            try:
                out.write(load_image(file, size).tobytes())
                kept.append((file, label))
            except Exception as e:  # corrupt, truncated, not an image, unreadable, too large...
                bad.append(f"{os.path.basename(file)} ({type(e).__name__})")
    if bad:
        warnings.warn(f"skipped {len(bad)} unusable image file(s), e.g. {', '.join(bad[:3])}", stacklevel=2)
    if not kept:
        os.remove(tmp)
        raise DataError(f"none of the {len(files)} image files could be read; check the folder's contents")
    with open(path + ".files", "w") as f:
        f.writelines(f"{label}\t{file}\n" for file, label in kept)
    os.replace(tmp, path)  # the cache appears only when complete
    return kept


class ImageCache(torch.utils.data.Dataset):
    """Decoded images of a folder as one memory-mapped uint8 tensor; items are (CHW uint8, label)."""

    def __init__(self, root, size, cache_dir, exclude=()):
        files, self.classes = find_images(root)
        exclude = set(exclude)  # paths held out, e.g. as the SWD reference (metrics.holdout_split)
        files = [(f, label) for f, label in files if f not in exclude]
        if not files:
            raise DataError(f"no images ({', '.join(EXTENSIONS)}) found in '{root}'; add some or point --data-dir elsewhere")
        os.makedirs(cache_dir, exist_ok=True)
        path = os.path.join(cache_dir, f"{cache_key(files, size)}.u8")
        if os.path.exists(path) and os.path.exists(path + ".files"):
            with open(path + ".files") as f:
                kept = [(file, int(label)) for label, file in (line.rstrip("\n").split("\t", 1) for line in f)]
        else:
            kept = build_cache(files, size, path)
        self.files = [f for f, _ in kept]
        self.labels = torch.tensor([label for _, label in kept], dtype=torch.long)
        n = len(kept)
        self.images = torch.from_file(path, shared=False, size=n * size * size * 3, dtype=torch.uint8).view(n, size, size, 3)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, item):
        index, flip = item  # drawn by EpochBatches
        x = self.images[index].permute(2, 0, 1)  # (3, H, W) uint8
        return (x.flip(-1) if flip else x.clone()), self.labels[index]


class EpochBatches:
    """Batches of (index, flip) for one process. Order and flips depend only on (seed, epoch).

    Every step consumes `batch_size * world_size` positions of the epoch's permutation; rank r
    takes its own contiguous block of them. Resuming at any position, with any world size,
    continues the same sequence.
    """

    def __init__(self, n, batch_size, seed, hflip=True, rank=0, world_size=1):
        self.n, self.batch_size, self.seed, self.hflip = n, batch_size, seed, hflip
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    @property
    def global_batch(self):
        return self.batch_size * self.world_size

    def epoch_length(self):
        """Positions in an epoch: whole permutations, repeated if the data is smaller than a batch."""
        return math.ceil(self.global_batch / self.n) * self.n

    def steps_per_epoch(self):
        return self.epoch_length() // self.global_batch

    def order(self, epoch):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        reps = self.epoch_length() // self.n
        perm = torch.cat([torch.randperm(self.n, generator=g) for _ in range(reps)])
        flips = torch.rand(len(perm), generator=g) < 0.5 if self.hflip else torch.zeros(len(perm), dtype=torch.bool)
        return perm.tolist(), flips.tolist()

    def set_position(self, epoch, start):
        self.epoch, self.start = epoch, start

    def __iter__(self):
        perm, flips = self.order(self.epoch)
        for pos in range(self.start, len(perm) - self.global_batch + 1, self.global_batch):
            lo = pos + self.rank * self.batch_size
            yield list(zip(perm[lo:lo + self.batch_size], flips[lo:lo + self.batch_size]))

    def __len__(self):
        return (self.epoch_length() - self.start) // self.global_batch


def make_loader(dataset, batches, num_workers, pin_memory=False):
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                       persistent_workers=num_workers > 0, pin_memory=pin_memory)


# ---------------------------------------------------------------------------------------------
# Procedural pandas: a fresh clone trains with no download.


def _rand_color(rng, lo, hi):
    return tuple(rng.randint(lo[i], hi[i]) for i in range(3))


def _ellipse(draw, cx, cy, rx, ry, fill):
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)


def _background(rng, size):
    """Grass, sky, bamboo-green or plain pastel, with a horizon and a few stalks."""
    top = _rand_color(rng, (90, 140, 60), (200, 230, 255))
    bottom = _rand_color(rng, (40, 90, 20), (140, 200, 120))
    img = Image.new("RGB", (size, size), top)
    draw = ImageDraw.Draw(img)
    horizon = rng.uniform(0.45, 0.8) * size
    draw.rectangle([0, horizon, size, size], fill=bottom)
    for _ in range(rng.randint(0, 5)):  # bamboo stalks
        x, w = rng.uniform(0, size), rng.uniform(0.02, 0.05) * size
        green = _rand_color(rng, (40, 110, 30), (110, 190, 90))
        draw.rectangle([x, 0, x + w, horizon + rng.uniform(0, 0.2) * size], fill=green)
    return img


def draw_panda(rng, size=256):
    """One cartoon panda: white head and body, black ears, eye patches, nose and limbs."""
    s = 2 * size  # draw at 2x and downsample for smooth edges
    img = _background(rng, s)
    draw = ImageDraw.Draw(img)
    grey = rng.randint(225, 252)
    white = (grey, grey, grey - rng.randint(0, 12))  # off-white fur, never tinted green or pink
    black = _rand_color(rng, (10, 10, 10), (45, 45, 50))
    r = rng.uniform(0.13, 0.24) * s  # head radius sets the panda's size
    cx, cy = rng.uniform(0.3, 0.7) * s, rng.uniform(0.3, 0.55) * s
    lean = rng.uniform(-0.35, 0.35) * r  # pose: body offset under the head
    sitting = rng.random() < 0.5
    bx, by = cx + lean, cy + r * (1.5 if sitting else 1.3)
    brx, bry = r * rng.uniform(1.0, 1.3), r * (1.25 if sitting else 0.95)
    for side in (-1, 1):  # legs, then arms, behind/over the body
        _ellipse(draw, bx + side * brx * 0.6, by + bry * 0.75, r * 0.38, r * 0.45, black)
    _ellipse(draw, bx, by, brx, bry, white)
    for side in (-1, 1):
        ax = bx + side * brx * rng.uniform(0.7, 0.95)
        _ellipse(draw, ax, by - bry * rng.uniform(0.1, 0.5), r * 0.3, r * 0.55, black)
    for side in (-1, 1):  # ears
        _ellipse(draw, cx + side * r * 0.72, cy - r * 0.72, r * 0.32, r * 0.32, black)
    _ellipse(draw, cx, cy, r, r * rng.uniform(0.85, 0.95), white)
    gaze = rng.uniform(-0.06, 0.06) * r
    for side in (-1, 1):  # tilted eye patches, eyes with pupils
        patch = Image.new("L", (s, s), 0)
        ex, ey = cx + side * r * 0.38, cy - r * 0.05
        _ellipse(ImageDraw.Draw(patch), ex, ey, r * 0.22, r * 0.32, 255)
        patch = patch.rotate(side * rng.uniform(20, 40), center=(ex, ey))
        img.paste(black, mask=patch)
        _ellipse(draw, ex + side * r * 0.03, ey - r * 0.04, r * 0.09, r * 0.09, white)
        _ellipse(draw, ex + side * r * 0.03 + gaze, ey - r * 0.04, r * 0.045, r * 0.045, black)
    _ellipse(draw, cx, cy + r * 0.32, r * 0.13, r * 0.09, black)  # nose
    draw.arc([cx - r * 0.15, cy + r * 0.3, cx + r * 0.15, cy + r * 0.55], 20, 160, fill=black, width=max(1, int(r * 0.04)))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img.filter(ImageFilter.GaussianBlur(0.6)).resize((size, size), Image.LANCZOS)


def generate_pandas(folder, n, size=256, seed=0):
    """Write n procedural pandas as PNGs into `folder`."""
    os.makedirs(folder, exist_ok=True)
    jobs = [(os.path.join(folder, f"panda_{i:05d}.png"), size, seed * 1_000_003 + i) for i in range(n)]
    with multiprocessing.get_context("spawn").Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
        for _ in tqdm(pool.imap_unordered(_write_panda, jobs, chunksize=8), total=n, desc=f"drawing {n} pandas into {folder}", leave=False):
            pass


def _write_panda(job):
    path, size, seed = job
    draw_panda(random.Random(seed), size).save(path)

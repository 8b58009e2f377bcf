"""Panda photos in, uint8 tensors out: find, decode once, cache, shuffle, flip; plus generated pandas.

A folder is either flat (one label, as in the description) or has one sub-folder per label.
Every file is decoded, converted to RGB, resized and centre-cropped once, then kept in a
memory-mapped uint8 cache keyed by the file list, so an epoch costs no JPEG decoding and
the cache survives restarts. Batches are drawn by `EpochBatches`, whose order and flips are
a pure function of (seed, epoch, position): that is what makes resume exact.
"""
import errno
import hashlib
import math
import multiprocessing
import os
import random
import shutil
import stat
import warnings

import torch
from PIL import Image, ImageDraw, ImageFilter, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from checkpoint import pid_alive

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_DATA_DIR = os.path.join("data", "pandas")


class DataError(Exception):
    """A problem with the user's images, explained in one sentence."""


class Unusable(ValueError):
    """One file that cannot be used; the message is the reason, in a few words."""


def find_images(root):
    """Return ([(path, label_index)], class_names). Sub-folders with images are labels."""
    if not os.path.isdir(root):
        what = "is not a folder" if os.path.lexists(root) else "does not exist"
        raise DataError(f"data folder '{root}' {what}; pass --data-dir with a folder of images")
    try:
        subdirs = sorted(d.name for d in os.scandir(root) if _is_label_dir(d, root))
    except OSError as e:
        raise DataError(f"cannot read data folder '{root}' ({e.strerror}); fix its permissions or pass another --data-dir") from None
    classes = [d for d in subdirs if _image_files(os.path.join(root, d))]
    loose = _image_files(root, recursive=False)
    if not classes:
        return [(p, 0) for p in loose], [os.path.basename(os.path.normpath(root)) or "images"]
    if loose:  # training on the sub-folders alone would drop these without a word
        raise DataError(f"data folder '{root}' holds both {len(loose)} images and label sub-folders ({', '.join(classes)}); "
                        "move the loose images into a sub-folder of their own, or pass --data-dir with one of the sub-folders")
    files = [(p, i) for i, c in enumerate(classes) for p in _image_files(os.path.join(root, c))]
    return files, classes


def _is_label_dir(entry, root):
    """A visible sub-folder, but not a symlink back to `root` or above it (a loop)."""
    try:
        if entry.name.startswith(".") or not entry.is_dir():
            return False
    except OSError:  # a symlink loop or a dangling link: a file, skipped later with the others
        return False
    real, inside = os.path.realpath(entry.path), os.path.realpath(root)
    return not (inside == real or inside.startswith(real.rstrip(os.sep) + os.sep))


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


def open_image(path, size):
    """Image.open with checks: a regular, non-empty file, and at most Image.MAX_IMAGE_PIXELS pixels
    as decoded. A huge JPEG is fine (libjpeg decodes it at 1/2..1/8 scale); a huge PNG is a bomb."""
    st = os.stat(path)  # follows links: loops and dangling links fail here
    if not stat.S_ISREG(st.st_mode):
        raise Unusable("not a regular file")
    if st.st_size == 0:
        raise Unusable("empty file")
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # PIL's own check would refuse before draft(); checked below instead
    try:
        img = Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    img.draft("RGB", (size, size))  # JPEG: let libjpeg decode at a reduced scale, much faster
    if limit and img.width * img.height > limit:
        img.close()
        raise Unusable(f"{img.width}x{img.height} is over PIL's decompression-bomb limit of {limit} pixels")
    return img


def load_image(path, size):
    """Decode one file to a size x size RGB PIL image: shorter side resized to `size`, centre crop."""
    with open_image(path, size) as img:
        img = to_rgb(ImageOps.exif_transpose(img))
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC, reducing_gap=3.0)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def folder_files(folder):
    """Sorted image paths of a folder (flat or one sub-folder per label)."""
    if not os.path.isdir(folder):
        raise DataError(f"image folder '{folder}' does not exist; pass a folder of images")
    files = sorted(path for path, _ in find_images(folder)[0])
    if not files:
        raise DataError(f"no images found in '{folder}'; pass a folder with .jpg/.png files")
    return files


def holdout_split(files, n_holdout):
    """(train, held_out): the last `n_holdout` files in sorted path order are held out.

    `files` are paths or (path, label) pairs, as find_images returns; the order of
    the training files is kept. Deterministic: the same folder always holds out the same files.
    """
    if n_holdout <= 0:
        return list(files), []
    key = (lambda f: f[0]) if files and isinstance(files[0], (tuple, list)) else (lambda f: f)
    if n_holdout >= len(files):
        raise DataError(f"cannot hold out {n_holdout} of {len(files)} images and still train; lower --holdout")
    held = set(key(f) for f in sorted(files, key=key)[-n_holdout:])
    return [f for f in files if key(f) not in held], [f for f in sorted(files, key=key) if key(f) in held]


def held_out_files(data_dir, n_holdout):
    """A run's SWD reference: the last n_holdout files of data_dir (sorted), never trained on; [] for none."""
    return holdout_split(folder_files(data_dir), n_holdout)[1] if n_holdout else []


# A 16-48 px image is a smudge in an image viewer or TensorBoard: grids show each one at least this big.
GRID_MIN_PIXELS = 128


def enlarge(images, min_pixels=GRID_MIN_PIXELS):
    """Images (N, C, h, w) repeated nearest-neighbour by a whole factor until each side is >= min_pixels."""
    k = math.ceil(min_pixels / min(images.shape[-2:]))
    return images.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1) if k > 1 else images


def cache_key(files, size):
    h = hashlib.sha1(f"v2 {size}".encode())  # v2: file lists in UTF-8 (v1 wrote the locale's encoding)
    for path, label in files:
        try:
            st = os.stat(path)
            stamp = f"{st.st_size}|{st.st_mtime_ns}"
        except OSError:  # a symlink loop or dangling link: build_cache reports it
            stamp = "unreadable"
        h.update(f"{os.path.abspath(path)}|{label}|{stamp}\n".encode("utf-8", "surrogateescape"))  # any file name
    return h.hexdigest()[:16]


def why_unusable(error):
    """A few words on why a file could not be decoded."""
    if isinstance(error, Unusable):
        return str(error)
    if isinstance(error, UnidentifiedImageError):
        return "not an image"
    if isinstance(error, OSError) and error.errno is not None:
        return {errno.EACCES: "permission denied", errno.ELOOP: "symlink loop",
                errno.ENOENT: "dangling link"}.get(error.errno, error.strerror)
    if "truncated" in str(error).lower():
        return "truncated"
    return f"{type(error).__name__}: {str(error)[:60]}"


def decode_all(files, size, out):
    """Write each decodable file to `out`; returns (kept, ['name (reason)' for each skipped file])."""
    kept, bad = [], []
    for file, label in tqdm(files, desc=f"decoding {len(files)} images to {size}px (once)", leave=False):
        try:
            pixels = load_image(file, size).tobytes()
        except Exception as e:  # corrupt, truncated, not an image, unreadable, too large...
            bad.append(f"{os.path.basename(file)} ({why_unusable(e)})")
            continue
        out.write(pixels)  # a full disk here is the cache's problem, not the image's
        kept.append((file, label))
    return kept, bad


def _left_by_dead_process(name, prefix):
    """Whether `name` is `prefix` + the pid of a process that no longer runs (what a killed writer leaves)."""
    pid = name[len(prefix):]
    return name.startswith(prefix) and pid.isdigit() and not pid_alive(int(pid))


def _remove_dead_temps(path):
    """Partial cache files of this key left by a process that was killed while writing them."""
    folder, base = os.path.dirname(path) or ".", os.path.basename(path)
    for name in os.listdir(folder):
        if any(_left_by_dead_process(name, base + suffix) for suffix in (".tmp", ".files.tmp")):
            os.remove(os.path.join(folder, name))


def build_cache(files, size, path, root="the data folder"):
    """Decode every file into a flat uint8 file (N, size, size, 3). Returns the kept (file, label) list."""
    tmp, tmp_list = f"{path}.tmp{os.getpid()}", f"{path}.files.tmp{os.getpid()}"
    _remove_dead_temps(path)
    try:
        with open(tmp, "wb") as out:
            kept, bad = decode_all(files, size, out)
        if kept:
            # Both files appear only when complete: two runs that build one cache at once (or one killed while
            # rewriting the list) must never leave a reader a truncated list beside a whole cache.
            with open(tmp_list, "w", encoding="utf-8", errors="surrogateescape") as f:  # names need not be UTF-8
                f.writelines(f"{label}\t{file}\n" for file, label in kept)
            os.replace(tmp_list, path + ".files")
            os.replace(tmp, path)
    except OSError as e:
        raise DataError(f"cannot write the image cache '{tmp}' ({e.strerror}); free space or pass another --cache-dir") from None
    finally:
        for name in (tmp, tmp_list):
            if os.path.exists(name):
                os.remove(name)
    if bad and kept:  # with none kept, the error below says it all
        warnings.warn(f"skipped {len(bad)} of {len(files)} image files in '{root}' that cannot be used: "
                      f"{', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}", stacklevel=2)
    if not kept:
        raise DataError(f"none of the {len(files)} image files in '{root}' can be used ({', '.join(bad[:3])}"
                        f"{', ...' if len(bad) > 3 else ''}); add JPEG/PNG photos or pass another --data-dir")
    return kept


class ImageCache(torch.utils.data.Dataset):
    """Decoded images of a folder as one memory-mapped uint8 tensor; items are (CHW uint8, label)."""

    def __init__(self, root, size, cache_dir, exclude=()):
        listed, self.classes = find_images(root)
        exclude = set(exclude)  # paths held out, e.g. as the SWD reference (holdout_split)
        files = [(f, label) for f, label in listed if f not in exclude]
        if not files:
            raise DataError(f"no images ({', '.join(EXTENSIONS)}) found in '{root}'; add some or point --data-dir elsewhere")
        try:
            os.makedirs(cache_dir, exist_ok=True)
        except OSError as e:
            raise DataError(f"cannot create the image cache folder '{cache_dir}' ({e.strerror}); pass another --cache-dir") from None
        path = os.path.join(cache_dir, f"{cache_key(files, size)}.u8")
        if os.path.exists(path) and os.path.exists(path + ".files"):
            with open(path + ".files", encoding="utf-8", errors="surrogateescape") as f:
                kept = [(file, int(label)) for label, file in (line.rstrip("\n").split("\t", 1) for line in f)]
        else:
            kept = build_cache(files, size, path, root)
        self.files = [f for f, _ in kept]
        self.labels = torch.tensor([label for _, label in kept], dtype=torch.long)
        bare = [i for i in range(len(self.classes)) if not (self.labels == i).any()]
        if bare:  # its label would be sampled (grids, --label) from an embedding that never trained
            held = any(label == bare[0] and f in exclude for f, label in listed)
            why, fix = (("the hold-out takes the last files in sorted order", "lower --holdout") if held else
                        ("none of its images can be used", "add images it can read"))
            raise DataError(f"label folder(s) {', '.join(repr(self.classes[i]) for i in bare)} of '{root}' keep no "
                            f"training image ({why}); {fix}")
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
    takes its own contiguous block of them, so the ranks' shards are disjoint. The position
    (saved as `epoch_pos`) counts images, not steps: resuming at any position, with any world
    size or batch size, continues the same sequence. Each epoch drops its last partial global
    batch (a different remainder every epoch). A data set smaller than one global batch is
    repeated within the epoch; only there does the order depend on the global batch.
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
    # Its own generator: otherwise every iter(loader) draws a worker seed from the global torch RNG,
    # so a run resumed mid-epoch (one extra iter) would draw different noise from then on.
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                       persistent_workers=num_workers > 0, pin_memory=pin_memory,
                                       generator=torch.Generator())


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
    """Write n procedural pandas as PNGs into `folder` (an empty or missing one).

    They are drawn into `<folder>.part<pid>` and renamed at the end, so an interrupted run leaves no
    half-filled folder that the next run would take for the whole dataset, and two runs drawing at once
    (two trainings started together on a fresh clone) each draw into their own.
    """
    base = folder.rstrip(os.sep)
    parent, stem = os.path.dirname(base) or ".", os.path.basename(base)
    for name in os.listdir(parent) if os.path.isdir(parent) else []:
        if _left_by_dead_process(name, stem + ".part"):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    part = f"{base}.part{os.getpid()}"
    os.makedirs(part)
    jobs = [(os.path.join(part, f"panda_{i:05d}.png"), size, seed * 1_000_003 + i) for i in range(n)]
    try:
        with multiprocessing.get_context("spawn").Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
            for _ in tqdm(pool.imap_unordered(_write_panda, jobs, chunksize=8), total=n, desc=f"drawing {n} pandas into {folder}", leave=False):
                pass
    except BaseException:  # Ctrl-C or a full disk: nothing half-drawn stays behind
        shutil.rmtree(part, ignore_errors=True)
        raise
    try:
        if os.path.isdir(folder) and not os.path.islink(folder):
            os.rmdir(folder)  # empty, or the caller would not draw into it
        os.replace(part, folder)
    except OSError:
        if not (os.path.isdir(folder) and os.listdir(folder)):
            raise
        shutil.rmtree(part)  # another run filled the folder first: its pandas serve this run too


def _write_panda(job):
    path, size, seed = job
    draw_panda(random.Random(seed), size).save(path)

"""Labels for an unlabelled photo folder from the photos' own layout: k-means of their coarse colour layout.

    python scripts/layout_groups.py PHOTOS groups --groups 16 --holdout 100
    python train.py --preset panda48 --data-dir groups

Each photo is reduced to its 8 x 8 mean colours at --size px (centre crop, as training sees it), averaged with its
mirror image (training flips photos), and the photos are split into --groups groups by k-means (10 restarts,
the lowest within-group sum of squares). OUT gets one sub-folder per group (g00, g01, ...) of links to the
photos (copies with --copy), so train.py reads the groups as labels and sample.py draws every group in turn.
With --holdout N the last N photos in sorted order (train.py's held-out photos of PHOTOS) are left out of OUT:
train on OUT with --holdout 0 and score against PHOTOS' held-out photos, e.g. with quality_curve.py --reference.
Files that cannot be decoded are skipped with a warning, as train.py skips them.
"""
import argparse
import os
import shutil
import sys

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataset import DataError, find_images, holdout_split, load_image, why_unusable  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="folder of photos (sub-folders are searched too; their names are ignored)")
    p.add_argument("out", help="new folder to write the groups to (must not exist or be empty)")
    p.add_argument("--groups", type=int, default=16, help="number of groups, i.e. labels (default: 16)")
    p.add_argument("--holdout", type=int, default=0, help="leave out the last N photos in sorted order, train.py's held-out "
                                                          "photos of SRC (default: 0)")
    p.add_argument("--size", type=int, default=48, help="image size the layout is measured at (default: 48)")
    p.add_argument("--seed", type=int, default=0, help="seed of the k-means restarts (default: 0)")
    p.add_argument("--copy", action="store_true", help="copy the photos instead of linking to them")
    args = p.parse_args(argv)
    if args.groups < 2:
        p.error("--groups must be at least 2")
    if args.size < 8 or args.holdout < 0:
        p.error("--size must be at least 8 and --holdout at least 0")
    return args


def layout_features(images):
    """(N, H, W, 3) uint8 -> (N, 192): 8 x 8 mean colours in [0, 1], averaged with the mirror image, centred."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    small = torch.nn.functional.adaptive_avg_pool2d(x, 8)
    feat = ((small + small.flip(-1)) / 2).flatten(1)
    return feat - feat.mean(0)


def kmeans(feat, k, seed=0, restarts=10, iters=100):
    """Group index of each row: the best of `restarts` Lloyd runs, each from k distinct random rows."""
    best_inertia, best = float("inf"), None
    for r in range(restarts):
        g = torch.Generator().manual_seed(seed * 1000 + r)
        centres = feat[torch.randperm(len(feat), generator=g)[:k]].clone()
        for _ in range(iters):
            dist = torch.cdist(feat, centres)
            assign = dist.argmin(1)
            # an empty group takes the photo farthest from its centre, so k groups come back wherever k layouts differ
            far = dist.gather(1, assign[:, None])[:, 0].argsort(descending=True).tolist()
            moved = torch.stack([feat[assign == j].mean(0) if (assign == j).any() else feat[far.pop(0)] for j in range(k)])
            if torch.equal(moved, centres):
                break
            centres = moved
        inertia = float(((feat - centres[assign]) ** 2).sum())
        if inertia < best_inertia:
            best_inertia, best = inertia, assign
    return torch.unique(best, return_inverse=True)[1]  # numbered 0.. without gaps, even if identical photos left one empty


def write_groups(photos, assign, out, copy=False):
    """out/gNN/<name> for each (path, name) photo; names are unique, made from the path below the source folder."""
    width = len(str(int(assign.max())))
    for (path, name), group in zip(photos, assign.tolist()):
        folder = os.path.join(out, f"g{group:0{max(2, width)}d}")
        os.makedirs(folder, exist_ok=True)
        dst = os.path.join(folder, name)
        if copy:
            shutil.copyfile(path, dst)
        else:
            os.symlink(os.path.abspath(path), dst)


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isdir(args.src):
        raise SystemExit(f"error: photo folder '{args.src}' not found; pass a folder of images")
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        raise SystemExit(f"error: '{args.out}' already exists and is not an empty folder; pass a new folder to write the groups to")
    out = os.path.realpath(args.out)  # an empty OUT may be a link to a folder: the groups go where it points
    part = out + ".part"  # filled, then renamed to OUT: a failed run leaves no half-filled OUT for train.py to train on
    if os.path.lexists(part):
        raise SystemExit(f"error: '{part}' exists (what a killed run of this script leaves); delete it and run again")
    try:
        files = [f for f, _ in find_images(args.src)[0]]
        files = holdout_split(files, args.holdout)[0] if args.holdout else files  # --holdout >= the photos: one line too
    except DataError as e:
        raise SystemExit(f"error: {e}")
    kept, images = [], []
    for f in tqdm(files, desc=f"reading {len(files)} photos at {args.size}px", leave=False):
        try:
            images.append(np.asarray(load_image(f, args.size)))
        except Exception as e:  # corrupt, truncated, not an image: train.py skips it too
            print(f"warning: skipping {f} ({why_unusable(e)})", file=sys.stderr)
            continue
        kept.append((f, os.path.relpath(f, args.src).replace(os.sep, "_")))
    if len(kept) < args.groups:
        raise SystemExit(f"error: {len(kept)} usable photo(s) in '{args.src}' for {args.groups} groups; pass fewer --groups")
    assign = kmeans(layout_features(np.stack(images)), args.groups, args.seed)
    try:
        write_groups(kept, assign, part, args.copy)
        if os.path.isdir(out):
            os.rmdir(out)  # the empty OUT allowed above: renaming onto a folder is not portable
        os.rename(part, out)
    except BaseException as e:  # Ctrl-C or a full disk: remove the partial groups (rmtree unlinks links, never their photos)
        shutil.rmtree(part, ignore_errors=True)
        if isinstance(e, OSError):
            raise SystemExit(f"error: cannot write the groups to '{args.out}' ({e.strerror or e}); free space or pass "
                             "a writable folder") from None
        raise
    sizes = torch.bincount(assign).tolist()
    fewer = f" (only {len(sizes)} different layouts among them)" if len(sizes) < args.groups else ""
    print(f"{len(kept)} photos in {len(sizes)} groups of {min(sizes)}-{max(sizes)} in {args.out}{fewer}; train with "
          f"python train.py --data-dir {args.out}")


if __name__ == "__main__":
    main()

"""dataset.py: the hold-out split, flips (the cache and loader are exercised in test_robustness.py and test_train.py)."""
import numpy as np
import pytest
import torch
from PIL import Image

import dataset


def test_holdout_split_is_the_last_sorted_files():
    files = [("d/b.png", 0), ("d/c.png", 1), ("d/a.png", 0), ("d/e.png", 1), ("d/d.png", 0)]
    train, held = dataset.holdout_split(files, 2)
    assert held == [("d/d.png", 0), ("d/e.png", 1)]
    assert train == [("d/b.png", 0), ("d/c.png", 1), ("d/a.png", 0)]  # order kept
    assert dataset.holdout_split([f for f, _ in files], 0) == ([f for f, _ in files], [])
    with pytest.raises(dataset.DataError, match="holdout"):
        dataset.holdout_split(files, 5)


def test_flips_mirror_left_to_right_and_only_with_hflip():
    """An item drawn with flip=True is its image mirrored left-right; EpochBatches draws flips for about half
    the items with hflip, none without."""
    cache = dataset.ImageCache.__new__(dataset.ImageCache)  # the item access alone, without a folder to decode
    cache.images = torch.randint(0, 256, (1, 6, 5, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    cache.labels = torch.zeros(1, dtype=torch.long)
    plain, mirrored = cache[(0, False)][0], cache[(0, True)][0]
    assert torch.equal(plain, cache.images[0].permute(2, 0, 1)) and torch.equal(mirrored, plain.flip(-1))
    assert not any(dataset.EpochBatches(200, 5, 0, hflip=False).order(0)[1])
    assert 0.35 < sum(dataset.EpochBatches(200, 5, 0, hflip=True).order(0)[1]) / 200 < 0.65


def test_an_empty_label_folder_is_not_a_label(tmp_path):
    """Only sub-folders that hold images are labels: an empty one would add a class no image trains."""
    (tmp_path / "d" / "a").mkdir(parents=True)
    (tmp_path / "d" / "b").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "a" / "x.png")
    assert dataset.find_images(str(tmp_path / "d")) == ([(str(tmp_path / "d" / "a" / "x.png"), 0)], ["a"])


def test_a_wide_image_is_scaled_by_its_short_side_and_centre_cropped(tmp_path):
    """64 x 32 to 32 px: the short side fits, and the middle 32 columns are kept, not squashed or shifted."""
    cols, rows = np.meshgrid(np.arange(64) * 4, np.arange(32) * 8)  # red counts columns, green rows
    img = Image.fromarray(np.stack([cols, rows, np.zeros_like(cols)], -1).astype(np.uint8))
    img.save(tmp_path / "w.png")
    assert np.array_equal(np.asarray(dataset.load_image(str(tmp_path / "w.png"), 32)), np.asarray(img)[:, 16:48])


def test_transparent_palette_pixels_become_white(tmp_path):
    """A palette image's transparent colour is composited on white, as for RGBA."""
    img = Image.new("P", (32, 32), 0)
    img.putpalette([0, 0, 0] * 256)
    img.save(tmp_path / "t.png", transparency=0)
    assert dataset.load_image(str(tmp_path / "t.png"), 32).getpixel((5, 5)) == (255, 255, 255)

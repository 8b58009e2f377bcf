"""scripts/layout_groups.py: photos split by their colour layout into label folders train.py reads; clear refusals."""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import layout_groups  # noqa: E402
from dataset import find_images  # noqa: E402


def photos(folder):
    """Three dark-top and three dark-bottom photos (with some noise, mixed sizes), a corrupt file and a held-out one."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        h = 40 + 8 * i
        a = rng.integers(150, 200, (h, 48, 3), dtype=np.uint8)
        dark = slice(0, h // 2) if i % 2 == 0 else slice(h // 2, h)
        a[dark] //= 6
        Image.fromarray(a).save(folder / f"p{i}.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    Image.new("RGB", (48, 48), "white").save(folder / "zz_held.png")  # last in sorted order
    return folder


def test_groups_follow_the_layout_and_train_py_reads_them(tmp_path, capsys):
    src, out = photos(tmp_path / "src"), tmp_path / "groups"
    layout_groups.main([str(src), str(out), "--groups", "2", "--holdout", "1", "--size", "16"])
    files, classes = find_images(str(out))
    assert classes == ["g00", "g01"]
    names = {label: sorted(os.path.basename(f) for f, lab in files if lab == label) for label in (0, 1)}
    assert sorted(names.values()) == [["p0.png", "p2.png", "p4.png"], ["p1.png", "p3.png", "p5.png"]]
    assert all(os.path.islink(f) for f, _ in files)  # links by default: nothing copied
    assert "broken.jpg" in capsys.readouterr().err  # skipped with a warning, as train.py does


def test_copy_and_refusals(tmp_path):
    src = photos(tmp_path / "src")
    layout_groups.main([str(src), str(tmp_path / "copied"), "--groups", "3", "--copy", "--size", "16"])
    copied = [f for f, _ in find_images(str(tmp_path / "copied"))[0]]
    assert len(copied) == 7 and not any(os.path.islink(f) for f in copied)
    with pytest.raises(SystemExit, match="not an empty folder"):  # never writes into an existing run of groups
        layout_groups.main([str(src), str(tmp_path / "copied"), "--groups", "2"])
    with pytest.raises(SystemExit, match="not found"):
        layout_groups.main([str(tmp_path / "missing"), str(tmp_path / "o1")])
    with pytest.raises(SystemExit, match="pass fewer --groups"):
        layout_groups.main([str(src), str(tmp_path / "o2"), "--groups", "9"])


def test_identical_photos_give_fewer_groups_numbered_without_gaps(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):  # only two different pictures, so three groups cannot all be filled
        Image.new("RGB", (32, 32), "black" if i % 2 else "white").save(src / f"p{i}.png")
    layout_groups.main([str(src), str(tmp_path / "out"), "--groups", "3", "--size", "16"])
    files, classes = find_images(str(tmp_path / "out"))
    assert classes == ["g00", "g01"]  # train.py's labels are the folders: no empty label between them
    assert sorted(lab for _, lab in files) == [0, 0, 0, 1, 1, 1]
    assert "in 2 groups of 3-3" in capsys.readouterr().out


def test_kmeans_keeps_the_best_restart():
    """Of its restarts k-means keeps the lowest inertia: the left/right split, not the worse top/bottom one."""
    feat = torch.tensor([[0.0, 0], [0, 1], [10, 0], [10, 1]])
    assert layout_groups.kmeans(feat, 2).tolist() in ([0, 0, 1, 1], [1, 1, 0, 0])


def test_too_large_holdout_is_one_error_line(tmp_path):
    """--holdout 1000 on 8 photos: one 'error:' line naming the flag, not a DataError traceback."""
    with pytest.raises(SystemExit, match="^error: cannot hold out 1000 of 8 .*lower --holdout"):
        layout_groups.main([str(photos(tmp_path / "src")), str(tmp_path / "out"), "--holdout", "1000"])
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("copy", [[], ["--copy"]])
def test_a_failed_write_leaves_no_half_filled_folder(tmp_path, monkeypatch, copy):
    """The groups are written to OUT.part and renamed at the end: a write that fails half-way (a full disk) is one
    'error:' line and leaves neither OUT, which train.py would train on, nor OUT.part; into an empty OUT works."""
    src, out, calls = photos(tmp_path / "src"), tmp_path / "out", []

    def second_fails(real):
        def write(a, b):
            calls.append(b)
            if len(calls) == 2:
                raise OSError(28, "No space left on device")
            return real(a, b)
        return write
    module, name = (layout_groups.shutil, "copyfile") if copy else (layout_groups.os, "symlink")
    monkeypatch.setattr(module, name, second_fails(getattr(module, name)))
    with pytest.raises(SystemExit, match="^error: cannot write the groups .*No space left"):
        layout_groups.main([str(src), str(out), "--groups", "2", "--size", "16", *copy])
    assert not out.exists() and not (tmp_path / "out.part").exists() and len(os.listdir(src)) == 8  # photos untouched
    monkeypatch.undo()
    out.mkdir()
    layout_groups.main([str(src), str(out), "--groups", "2", "--size", "16", *copy])
    assert len(find_images(str(out))[0]) == 7 and not (tmp_path / "out.part").exists()
    (tmp_path / "o2.part").mkdir()
    with pytest.raises(SystemExit, match="o2.part' exists .* delete it"):
        layout_groups.main([str(src), str(tmp_path / "o2"), "--groups", "2", "--size", "16"])

"""scripts/quality_curve.py: increments of one run, an SWD per point, and its refusals."""
import json
import os
import sys

import pytest
import torch
from PIL import Image

from conftest import ROOT, make_pandas

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import quality_curve  # noqa: E402


def curve(tmp_path, *flags):
    """Run quality_curve on 6 tiny pandas (4 samples of 2 DDIM steps per point); its JSON lines."""
    data = make_pandas(tmp_path / "pandas", 6)
    out = tmp_path / "curve.jsonl"
    quality_curve.main([*flags, "--n", "4", "--steps", "2", "--json", str(out), "--",
                        "--preset", "tiny", "--device", "cpu", "--data-dir", data, "--run", "c",
                        "--ckpt-dir", str(tmp_path / "ck"), "--log-dir", str(tmp_path / "tb"),
                        "--cache-dir", str(tmp_path / "cache"), "--sample-every", "0", "--no-log-graph"])
    return [json.loads(line) for line in open(out)]


def test_trains_in_increments_of_one_run_and_measures_each(tmp_path, capsys):
    """--at-steps 2 4: the second point resumes the first run; each writes a JSON line with its SWD."""
    points = curve(tmp_path, "--at-steps", "2", "4")
    assert [(p["run"], p["step"]) for p in points] == [("c", 2), ("c", 4)]
    assert all(p["mean"] > 0 and len(p["levels"]) == 3 for p in points)
    assert os.listdir(tmp_path / "ck") == ["c"]  # one run, resumed, not two
    assert {"swd_step_0000002.png", "swd_step_0000004.png"} <= set(os.listdir(tmp_path / "ck" / "c"))  # the samples scored
    assert "| 4 | 4 |" in capsys.readouterr().out
    assert Image.open(tmp_path / "ck" / "c" / "swd_step_0000004.png").width == 4 * 130 + 2  # 4 samples of 16 px in a row, enlarged to 128 px


def test_noise_sets_average_sets_of_other_noise_and_keep_the_single_measurement_first(tmp_path, capsys):
    """--noise-sets 2 scores two sets of samples from different noise and reports their mean; the first set
    is what a plain measurement of the same checkpoint gives, so old single-set figures stay comparable."""
    point, = curve(tmp_path, "--at-steps", "2", "--noise-sets", "2")
    first, second = point["sets"]
    assert first != second and point["mean"] == pytest.approx((first + second) / 2)
    state = quality_curve.load_checkpoint(str(tmp_path / "ck" / "c" / "latest.pt"))
    assert quality_curve.measure(state, 4, 2)[0]["mean"] == pytest.approx(first)
    assert f"sets {first:.1f} / {second:.1f}" in capsys.readouterr().out


def test_reference_scores_against_another_folders_held_out_photos(tmp_path):
    """--reference: a run trained on a layout_groups.py folder is scored against the photos that folder left out."""
    photos = make_pandas(tmp_path / "photos", 5)
    point, = curve(tmp_path, "--at-steps", "2", "--reference", photos, "--reference-holdout", "3")
    assert point["n_real"] == 3  # the run's own: 4 (--n) of its 6 training pandas
    state = quality_curve.load_checkpoint(str(tmp_path / "ck" / "c" / "latest.pt"))
    assert quality_curve.measure(state, 4, 2)[0]["n_real"] == 4


@pytest.mark.parametrize("points, flags, message", [
    (["2"], ["--preset", "tiny"], "pass --run NAME"),
    (["2", "4"], ["--preset", "tiny", "--run", "c", "--lr-schedule=cosine"], "--lr-schedule cosine decays over each increment"),
    (["2", "--noise-sets", "0"], ["--preset", "tiny", "--run", "c"], "--noise-sets must be at least 1"),
    (["2", "--reference", "no/such/folder"], ["--preset", "tiny", "--run", "c"], "--reference folder 'no/such/folder' not found"),
])
def test_refuses_flags_that_would_not_make_one_curve(points, flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        quality_curve.parse_args(["--at-steps", *points, "--", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_one_point_of_a_cosine_run_is_allowed():
    # one point is one run whose schedule ends where it is measured
    args = quality_curve.parse_args(["--at-steps", "1400", "--", "--preset", "tiny", "--run", "c", "--lr-schedule", "cosine"])
    assert args.at_steps == [1400] and args.run == "c"


def test_minutes_are_cumulative(tmp_path, monkeypatch):
    """--minutes 5 10 20 trains 5, then 5 more, then 10 more: each increment runs what the last one left."""
    cmds = []
    monkeypatch.setattr(quality_curve.subprocess, "run", lambda cmd, **k: cmds.append(cmd))
    monkeypatch.setattr(quality_curve, "load_checkpoint", lambda p: {"step": 1})
    monkeypatch.setattr(quality_curve, "save_image", lambda *a, **k: None)
    monkeypatch.setattr(quality_curve, "measure", lambda *a: (dict(levels=[1.0], mean=1.0, n_fake=1, n_real=1, seams=1.0,
                                                                   seams_reference=1.0), torch.zeros(1, 3, 8, 8)))
    quality_curve.main(["--minutes", "5", "10", "20", "--", "--preset", "tiny", "--run", "c", "--ckpt-dir", str(tmp_path)])
    assert [c[c.index("--max-minutes") + 1] for c in cmds] == ["5.0", "5.0", "10.0"]

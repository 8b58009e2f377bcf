"""scripts/quality_curve.py: increments of one run, an SWD per point, and its refusals."""
import json
import os
import subprocess
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
    monkeypatch.setattr(quality_curve.subprocess, "run", lambda cmd, **k: cmds.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    monkeypatch.setattr(quality_curve, "load_checkpoint", lambda p: {"step": 1})
    monkeypatch.setattr(quality_curve, "save_image", lambda *a, **k: None)
    monkeypatch.setattr(quality_curve, "measure", lambda *a: (dict(levels=[1.0], mean=1.0, n_fake=1, n_real=1, seams=1.0,
                                                                   seams_reference=1.0), torch.zeros(1, 3, 8, 8)))
    quality_curve.main(["--minutes", "5", "10", "20", "--", "--preset", "tiny", "--run", "c", "--ckpt-dir", str(tmp_path)])
    assert [c[c.index("--max-minutes") + 1] for c in cmds] == ["5.0", "5.0", "10.0"]


@pytest.mark.parametrize("child, code", [("print('error: a one-line refusal', file=sys.stderr); sys.exit(3)", 3),
                                         ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", 128 + 9)])
def test_a_failed_train_run_stops_the_curve_with_its_exit_code(child, code, monkeypatch, capsys):
    """train.py refusing (its own error line, exit 3) or killed (SIGKILL) stops the curve with that exit code (128 + N for
    signal N) and no CalledProcessError traceback; a kill, which says nothing itself, gets one 'error:' line."""
    real_run = subprocess.run
    monkeypatch.setattr(quality_curve.subprocess, "run", lambda cmd, **k: real_run([sys.executable, "-c", "import sys; " + child], **k))
    monkeypatch.setattr(quality_curve, "load_checkpoint", lambda p: pytest.fail("measured after a failed training run"))
    with pytest.raises(SystemExit) as e:
        quality_curve.main(["--at-steps", "2", "--", "--preset", "tiny", "--run", "c"])
    assert e.value.code == code
    err = capsys.readouterr().err.splitlines()
    assert err == [] if code == 3 else len(err) == 1 and err[0].startswith("error: train.py was killed by signal 9")


def test_reference_holdout_beyond_the_folder_is_refused_before_training(tmp_path, capsys):
    photos = make_pandas(tmp_path / "photos", 3)
    with pytest.raises(SystemExit) as e:
        quality_curve.parse_args(["--at-steps", "2", "--reference", photos, "--reference-holdout", "3", "--", "--preset", "tiny", "--run", "c"])
    assert e.value.code == 2 and "which has 3; lower --reference-holdout" in capsys.readouterr().err


def test_data_and_checkpoint_problems_are_one_error_line(tmp_path, monkeypatch):
    """An empty --reference folder (DataError) or a run without latest.pt (CheckpointError) ends in one 'error:' line
    naming the folder or file, not a traceback."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        quality_curve.main(["--at-steps", "2", "--reference", str(tmp_path / "empty"), "--", "--preset", "tiny", "--run", "c"])
    assert str(e.value.code).startswith("error: no images found in") and str(tmp_path / "empty") in e.value.code
    monkeypatch.setattr(quality_curve.subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(cmd, 0))  # trained nothing
    with pytest.raises(SystemExit) as e:
        quality_curve.main(["--at-steps", "2", "--", "--preset", "tiny", "--run", "c", "--ckpt-dir", str(tmp_path / "ck")])
    assert str(e.value.code).startswith("error: checkpoint") and os.path.join(str(tmp_path / "ck"), "c", "latest.pt") in e.value.code

"""scripts/plot_loss.py: a PNG of the requested size with the blue batch line and orange epoch line; clear errors."""
import os
import sys

import pytest
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import plot_loss  # noqa: E402


def has_colour(img, rgb, tol=12):
    """True if some pixel is within tol of rgb on every channel (lines are anti-aliased at the edges)."""
    return any(all(abs(a - b) <= tol for a, b in zip(px, rgb)) for _, px in img.getcolors(img.width * img.height))


def test_plot_loss_draws_batch_and_epoch_lines(tmp_path):
    run = tmp_path / "run"
    with SummaryWriter(str(run)) as w:
        for step in range(2, 41, 2):
            w.add_scalar("Loss/batch", 1.0 / step, step)
        for step in (10, 20, 30, 40):
            w.add_scalar("Loss/epoch", 1.2 / step, step)
        w.add_scalar("Quality/swd", 3.0, 40)
    out = tmp_path / "plots" / "loss.png"
    plot_loss.main([str(run), "--out", str(out), "--width", "480", "--height", "300", "--log-y", "--swd"])
    img = Image.open(out).convert("RGB")
    assert img.size == (480, 300)
    assert has_colour(img, plot_loss.BLUE) and has_colour(img, plot_loss.ORANGE)
    assert Image.open(tmp_path / "plots" / "loss_swd.png").size == (480, 300)


def test_plot_loss_ticks_are_round_numbers():
    assert plot_loss.linear_ticks(0.493, 0.811) == [0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert plot_loss.linear_ticks(0, 6000) == [0, 1000, 2000, 3000, 4000, 5000, 6000]
    assert plot_loss.linear_ticks(0, 0) == [0, 0.2, 0.4, 0.6, 0.8, 1]  # one step at 0 still gets an axis
    assert plot_loss.log_ticks(0.04, 1.1) == [0.05, 0.1, 0.2, 0.5, 1.0]


def test_plot_loss_names_a_folder_without_events(tmp_path):
    with pytest.raises(SystemExit) as e:
        plot_loss.main([str(tmp_path), "--out", str(tmp_path / "x.png")])
    assert e.value.code != 0 and str(tmp_path) in str(e.value.code)
    assert not (tmp_path / "x.png").exists()


def test_plot_goes_beside_the_run_by_default():
    """Without --out the plot is written into the run's log folder, not the working folder."""
    assert plot_loss.parse_args(["runs/r"]).out == os.path.join("runs/r", "loss.png")


def test_non_finite_losses_are_left_out_and_the_rest_is_drawn(tmp_path, capsys):
    """A diverged step logged Loss/batch = inf (and one nan): the plot is drawn from the finite points, with a warning."""
    run = tmp_path / "run"
    with SummaryWriter(str(run)) as w:
        for step, loss in ((1, 0.9), (2, float("inf")), (3, 0.5), (4, float("nan")), (5, 0.4)):
            w.add_scalar("Loss/batch", loss, step)
    plot_loss.main([str(run), "--out", str(tmp_path / "loss.png"), "--width", "320", "--height", "200"])
    assert has_colour(Image.open(tmp_path / "loss.png").convert("RGB"), plot_loss.BLUE)
    assert "2 non-finite Loss/batch value(s) left out" in capsys.readouterr().err

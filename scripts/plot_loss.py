"""Draw a run's training-loss curve as a PNG, from its TensorBoard events, with PIL only.

    python scripts/plot_loss.py dit_training/<run> [--out loss.png] [--log-y] [--swd]

Blue: `Loss/batch` (every --log-every steps); orange with dots: `Loss/epoch` (mean per epoch). Every
event file in the folder is read (a resumed run writes one per start), nothing is subsampled.
"""
import argparse
import math
import os
import sys

from PIL import Image, ImageDraw, ImageFont

BLUE, ORANGE, GREY, INK = (31, 119, 180), (255, 127, 14), (225, 225, 225), (40, 40, 40)
SCALE = 2  # draw at 2x and shrink: anti-aliased lines without extra dependencies
LOSSES = (("Loss/batch", "loss per batch", BLUE, False), ("Loss/epoch", "average loss per epoch", ORANGE, True))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run folder holding event files, e.g. dit_training/<run>")
    p.add_argument("--out", default=None, help="PNG to write (default: loss.png in the run folder)")
    p.add_argument("--width", type=int, default=900, help="image width in pixels (default: %(default)s)")
    p.add_argument("--height", type=int, default=500, help="image height in pixels (default: %(default)s)")
    p.add_argument("--title", default=None, help="chart title (default: 'Training loss: <run>')")
    p.add_argument("--log-y", action="store_true", help="logarithmic loss axis")
    p.add_argument("--swd", action="store_true", help="also plot Quality/swd vs step to <out stem>_swd.png")
    args = p.parse_args(argv)
    args.out = args.out or os.path.join(args.run_dir, "loss.png")  # beside the run's events, never over a tracked file
    return args


def load_scalars(run_dir):
    """{tag: (steps, values)} for every scalar tag, merged over all event files in run_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    if not os.path.isdir(run_dir):
        raise SystemExit(f"error: {run_dir} is not a folder; pass a run folder such as dit_training/<run>.")
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0}).Reload()  # 0 = keep every point
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = sorted(acc.Scalars(tag), key=lambda e: e.step)
        finite = [e for e in events if math.isfinite(e.value)]  # an inf/nan loss would stretch the axis to infinity
        if len(finite) < len(events):
            print(f"warning: {len(events) - len(finite)} non-finite {tag} value(s) left out of the plot", file=sys.stderr)
        if finite:
            out[tag] = ([e.step for e in finite], [e.value for e in finite])
    if not any(tag in out for tag, *_ in LOSSES):
        raise SystemExit(f"error: no Loss/batch or Loss/epoch scalars in {run_dir}; pass a run folder "
                         "written by train.py, such as dit_training/<run>.")
    return out


def linear_ticks(lo, hi, n=7):
    """Round tick values (1, 2, 2.5 or 5 x 10^k apart) covering [lo, hi]."""
    hi = hi if hi > lo else lo + 1  # a single logged step still gets an axis
    raw = (hi - lo) / (n - 1)
    base = 10 ** math.floor(math.log10(raw))
    step = next(m * base for m in (1, 2, 2.5, 5, 10) if m * base >= raw)
    return [round(k * step, 12) for k in range(math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9) + 1)]


def log_ticks(lo, hi):
    """1-2-5 x 10^k ticks inside [lo, hi] (decades only if that is too many; linear ones if too few)."""
    ks = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    inside = [m * 10.0 ** k for k in ks for m in (1, 2, 5) if lo <= m * 10.0 ** k <= hi]
    if len(inside) > 8:
        inside = [v for v in inside if f"{v:e}".startswith("1")]
    return inside if len(inside) >= 3 or linear_ticks(lo, hi)[0] <= 0 else linear_ticks(lo, hi)


def fmt(v):
    """Tick label: thousands separators for whole numbers, else up to 4 significant digits."""
    return f"{int(round(v)):,}" if abs(v) >= 1 and abs(v - round(v)) < 1e-9 else f"{v:.4g}"


def font(size):
    """PIL's bundled font at `size` px; older Pillows only have a tiny fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        raise SystemExit("error: needs Pillow >= 10.1 for sized text; run `pip install -U pillow`.") from None


def y_axis(ys, log_y, ylabel):
    """(limits, ticks) for the value axis: the data range plus 4% each side, round ticks inside it."""
    if log_y and min(ys) <= 0:
        raise SystemExit(f"error: --log-y needs positive values, but {ylabel} reaches {min(ys):g}; drop --log-y.")
    f, inv = (math.log10, lambda v: 10 ** v) if log_y else (float, float)
    lo, hi = f(min(ys)), f(max(ys))
    pad = (hi - lo) * 0.04 or (0.05 if log_y else abs(hi) * 0.1 or 1)  # a flat line still gets a range
    lim = (inv(lo - pad), inv(hi + pad))
    return lim, [v for v in (log_ticks if log_y else linear_ticks)(*lim) if lim[0] <= v <= lim[1]]


def draw_axes(d, box, xticks, y, log_y, fnt):
    """Frame, grid and tick labels for x in [0, last xtick] and y = (limits, ticks); returns px(step, value)."""
    (x0, y0, x1, y1), (ylim, yticks), f = box, y, (math.log10 if log_y else float)

    def px(s, v):
        return (x0 + (s - xticks[0]) / (xticks[-1] - xticks[0]) * (x1 - x0),
                y1 - (f(v) - f(ylim[0])) / (f(ylim[1]) - f(ylim[0])) * (y1 - y0))
    for x, v in ((px(v, ylim[0])[0], v) for v in xticks):
        d.line([(x, y0), (x, y1)], fill=GREY, width=SCALE)
        d.text((x, y1 + 6 * SCALE), fmt(v), font=fnt, fill=INK, anchor="ma")
    for y, v in ((px(0, v)[1], v) for v in yticks):
        d.line([(x0, y), (x1, y)], fill=GREY, width=SCALE)
        d.text((x0 - 6 * SCALE, y), fmt(v), font=fnt, fill=INK, anchor="rm")
    d.rectangle(box, outline=INK, width=SCALE)
    return px


def draw_chart(series, out, size, title, ylabel, log_y=False):
    """series: [(label, colour, steps, values, dots)]; writes one PNG of `size` (w, h) to out."""
    w, h = size[0] * SCALE, size[1] * SCALE
    img, fnt, big = Image.new("RGB", (w, h), "white"), font(13 * SCALE), font(17 * SCALE)
    d = ImageDraw.Draw(img)
    y = y_axis([v for *_, vals, _ in series for v in vals], log_y, ylabel)
    xticks = linear_ticks(0, max(s for *_, steps, _, _ in series for s in steps))
    box = (max(d.textlength(fmt(v), font=fnt) for v in y[1]) + 46 * SCALE, 44 * SCALE, w - 24 * SCALE, h - 52 * SCALE)
    px = draw_axes(d, box, xticks, y, log_y, fnt)
    for label, colour, steps, vals, dots in series:
        pts = [px(s, v) for s, v in zip(steps, vals)]
        d.line(pts, fill=colour, width=int(1.5 * SCALE) + (SCALE if dots else 0), joint="curve")
        for x, yy in pts if dots and len(pts) <= 100 else []:  # past 100 dots only hide the line
            dot(d, x, yy, colour)
    draw_labels(img, d, box, title, ylabel, fnt, big)
    draw_legend(d, box, series, fnt)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    img.resize(size, Image.LANCZOS).save(out)


def draw_labels(img, d, box, title, ylabel, fnt, big):
    """Title above the box, 'training step' below it, ylabel rotated along its left side."""
    x0, y0, x1, y1 = box
    d.text(((x0 + x1) / 2, y0 - 14 * SCALE), title, font=big, fill=INK, anchor="md")
    d.text(((x0 + x1) / 2, img.height - 10 * SCALE), "training step", font=fnt, fill=INK, anchor="md")
    side = Image.new("RGB", (int(d.textlength(ylabel, font=fnt)) + 4, 20 * SCALE), "white")
    ImageDraw.Draw(side).text((2, 10 * SCALE), ylabel, font=fnt, fill=INK, anchor="lm")
    side = side.rotate(90, expand=True)  # PIL draws no vertical text: draw it flat and turn it
    img.paste(side, (8 * SCALE, int((y0 + y1 - side.height) / 2)))


def dot(d, x, y, colour, r=3.5 * SCALE):
    d.ellipse((x - r, y - r, x + r, y + r), fill=colour)


def draw_legend(d, box, series, fnt):
    """A framed key in the top-right corner: a line sample (and dot) per series."""
    row, x1, y0 = 20 * SCALE, box[2] - 10 * SCALE, box[1] + 10 * SCALE
    x0 = x1 - max(d.textlength(s[0], font=fnt) for s in series) - 44 * SCALE
    d.rectangle((x0, y0, x1, y0 + row * (len(series) + 0.8)), fill="white", outline=(190, 190, 190), width=SCALE)
    for i, (label, colour, _, _, dots) in enumerate(series):
        x, y = x0 + 8 * SCALE, y0 + row * (i + 0.9)
        d.line([(x, y), (x + 24 * SCALE, y)], fill=colour, width=2 * SCALE)
        if dots:
            dot(d, x + 12 * SCALE, y, colour)
        d.text((x + 32 * SCALE, y), label, font=fnt, fill=INK, anchor="lm")


def main(argv=None):
    args = parse_args(argv)
    if args.width < 300 or args.height < 200:
        raise SystemExit(f"error: {args.width}x{args.height} px leaves no room for labels; "
                         "use at least --width 300 --height 200.")
    scalars = load_scalars(args.run_dir)
    run = os.path.basename(os.path.normpath(args.run_dir))
    series = [(label, colour, *scalars[tag], dots) for tag, label, colour, dots in LOSSES if tag in scalars]
    draw_chart(series, args.out, (args.width, args.height), args.title or f"Training loss: {run}", "loss", args.log_y)
    print(f"wrote {args.out}")
    if args.swd and "Quality/swd" not in scalars:
        print(f"no Quality/swd scalars in {args.run_dir}; no SWD plot written")
    elif args.swd:
        out = os.path.splitext(args.out)[0] + "_swd.png"
        swd = [("SWD of samples", BLUE, *scalars["Quality/swd"], True)]
        draw_chart(swd, out, (args.width, args.height), f"Sample quality: {run}", "SWD (lower is better)")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()

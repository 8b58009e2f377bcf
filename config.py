"""Every knob in one place: a dataclass, named presets, and CLI flags generated from it.

    python train.py --preset panda64 --lr 3e-4 --run my_run

Each field becomes a flag (`image_size` -> `--image-size`); `--help` prints the comments
below. A preset fills the fields first, explicit flags win. No torch import here.
"""
import argparse
import dataclasses
import os
from dataclasses import dataclass, field

# The values each string knob accepts; diffusion.Diffusion checks its arguments against the same lists.
CHOICES = {"noise_schedule": ("linear", "cosine"), "prediction": ("eps", "v", "x0"), "loss": ("l1", "mse", "hybrid"),
           "optimizer": ("adam", "adamw"), "lr_schedule": ("constant", "cosine"), "mlp_act": ("gelu", "relu"),
           "objective": ("diffusion", "flow"), "sampler": ("auto", "ddim", "ddpm", "dpm2m", "euler", "heun")}
# The samplers of each objective; "auto" is the first (diffusion.Flow's docstring says why heun for flow).
SAMPLERS = {"diffusion": ("ddim", "ddpm", "dpm2m"), "flow": ("heun", "euler")}


def knob(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # --- run and files ---
    preset: str = knob("auto", "named preset: auto (panda256 on CUDA; on a CPU panda48, or cartoon48 without --data-dir), seed, panda256, panda64, panda48, cartoon48, panda32, tiny")
    run: str = knob("", "run name: checkpoints/<run>/ and dit_training/<run>/ (default: the preset name)")
    data_dir: str = knob("", "image folder, flat or one sub-folder per label (default: data/pandas, generated if missing)")
    ckpt_dir: str = knob("checkpoints", "checkpoints go to <ckpt_dir>/<run>/")
    log_dir: str = knob("dit_training", "TensorBoard events go to <log_dir>/<run>/")
    cache_dir: str = knob("cache", "decoded-image cache (uint8, memory-mapped), rebuilt when the files change")
    # --- model (DiT) ---
    image_size: int = knob(64, "training/sampling resolution in pixels (square)")
    patch_size: int = knob(4, "patch side in pixels; tokens = (image_size / patch_size)^2")
    in_channels: int = knob(3, "image channels: 3, the images are read as RGB")
    emb_dim: int = knob(64, "width of the token stream")
    depth: int = knob(3, "number of DiT blocks")
    num_heads: int = knob(6, "attention heads per block")
    head_dim: int = knob(64, "width of each head (may exceed emb_dim / num_heads)")
    mlp_ratio: float = knob(4.0, "MLP hidden width = mlp_ratio * emb_dim")
    mlp_act: str = knob("gelu", "MLP activation: gelu (as in DiT, in its exact form) or relu (cheaper on a CPU)")
    freq_dim: int = knob(256, "sinusoidal timestep-embedding frequencies")
    num_labels: int = knob(1, "number of labels: one per sub-folder of the data (a different value is refused)")
    label_dropout: float = knob(0.0, "probability of training with the null label; > 0 enables classifier-free guidance")
    adaln_zero: bool = knob(True, "zero-init the adaLN gates and the output layer so each block starts as identity")
    # --- token routing (TREAD, Krause et al. 2025): training only, no weights of its own ---
    route_ratio: float = knob(0.0, "share of each image's tokens, drawn at random every step, that skip blocks route_start.."
                                   "route_end-1 in training and rejoin unchanged; sampling always uses every token (0 = off)")
    route_start: int = knob(1, "with --route-ratio: the first block the routed tokens skip")
    route_end: int = knob(-1, "with --route-ratio: the block before which the routed tokens rejoin; negative counts "
                              "from the end (-1 = the last block, depth = after it)")
    # --- diffusion ---
    objective: str = knob("diffusion", "diffusion (DDPM, as described: noise at integer t, the schedule below) or flow (rectified flow, "
                                       "Esser et al. 2024: x_t = (1 - t) x_0 + t eps, t = sigmoid(N(0, 1)) in [0, 1], fed to the model as t * max_t, "
                                       "and the model predicts the velocity eps - x_0; the beta knobs do not apply)")
    max_t: int = knob(1000, "diffusion steps T (with --objective flow: the model's timestep input is t * max_t)")
    noise_schedule: str = knob("linear", "beta schedule: linear (as described) or cosine (Nichol & Dhariwal 2021; ignores beta_start/end)")
    beta_start: float = knob(1e-4, "first beta of the linear schedule")
    beta_end: float = knob(0.02, "last beta of the linear schedule")
    prediction: str = knob("eps", "what the model predicts: eps (the noise, as described), v (Salimans & Ho 2022) or x0 (the clean image, trained on the v it implies); "
                                  "with --objective flow: v (the velocity eps - x_0, its default) or x0 (trained and sampled through the velocity "
                                  "(x_t - x_0) / t, t capped below at 0.05), not eps (default: eps; v with --objective flow)")
    loss: str = knob("l1", "loss on the prediction: l1, mse, or hybrid (MSE at t >= --hybrid-t, L1 below; with --objective flow at t >= hybrid_t / max_t)")
    hybrid_t: int = knob(850, "with --loss hybrid: the first timestep trained with MSE instead of L1")
    min_snr_gamma: float = knob(0.0, "Min-SNR-gamma loss weighting (Hang et al. 2023): min(SNR, gamma) on the x0 scale for MSE; L1 gets the same per-step weights (0 = off, as described; diffusion only)")
    # --- optimisation ---
    optimizer: str = knob("adam", "adam or adamw")
    lr: float = knob(3e-4, "peak learning rate")
    weight_decay: float = knob(0.0, "weight decay (decoupled when optimizer=adamw)")
    warmup_steps: int = knob(200, "linear learning-rate warm-up steps")
    lr_schedule: str = knob("constant", "after warm-up: constant or cosine (down to 10%% at --max-steps or at the end of --max-minutes, whichever is first)")
    grad_clip: float = knob(1.0, "clip the global gradient norm to this (0 = off)")
    batch_size: int = knob(32, "images per step per process")
    max_steps: int = knob(20000, "total optimisation steps, counted across resumes")
    max_minutes: float = knob(0.0, "wall-clock budget of this invocation; then save and exit (0 = none)")
    ema_decay: float = knob(0.999, "EMA decay of the sampling weights (0 = EMA off, unless --ema-gamma)")
    ema_warmup: bool = knob(True, "ramp the EMA decay as min(decay, (1+step)/(10+step))")
    ema_gamma: float = knob(0.0, "power-function EMA (Karras et al. 2024): decay (1 - 1/step)^(gamma+1), an average of the "
                                 "whole run weighted by step^gamma, replacing --ema-decay/--ema-warmup (0 = off)")
    max_bad_steps: int = knob(20, "consecutive non-finite losses/gradients before training stops")
    # --- data ---
    hflip: bool = knob(True, "random horizontal flips")
    num_workers: int = knob(-1, "DataLoader workers (-1 = min(10, CPU count))")
    num_generated: int = knob(600, "procedural pandas written when the default data folder is empty")
    # --- logging, sampling, checkpoints ---
    log_every: int = knob(10, "steps between scalar logs")
    hist_every: int = knob(200, "steps between histograms of the model's output and its training target")
    sample_every: int = knob(500, "steps between sample grids in TensorBoard (0 = off)")
    sample_n: int = knob(16, "images in the TensorBoard sample grid")
    sampler: str = knob("auto", "sampler of the TensorBoard samples, the SWD evaluation and sample.py's default: ddim, ddpm or dpm2m "
                                "(DPM-Solver++ 2M: DDIM's cost, second order) for diffusion, euler or heun for flow "
                                "(Heun: 2 * steps - 1 model calls); auto = ddim for diffusion, heun for flow")
    sample_spacing: float = knob(1.0, "how the sampler's steps are spread from pure noise to the image: at (1 - i / steps) ** spacing of the way; "
                                      "1 = evenly, 2 = denser near the clean image, where the finest detail is drawn (for the TensorBoard samples, "
                                      "the SWD evaluation and sample.py's default)")
    sample_steps: int = knob(50, "sampler steps for the TensorBoard samples")
    eval_every: int = knob(0, "steps between SWD evaluations (Quality/swd, best.pt; 0 = off)")
    eval_n: int = knob(256, "images generated for each SWD evaluation")
    eval_steps: int = knob(50, "sampler steps for the SWD evaluation samples")
    holdout: int = knob(0, "last N images (sorted) not trained on, the SWD reference (0 = eval_n training images)")
    ckpt_every: int = knob(500, "steps between checkpoints (step_XXXXXXX.pt, copied to latest.pt)")
    keep_last: int = knob(3, "periodic checkpoints to keep besides milestones")
    milestone_every: int = knob(5000, "steps between checkpoints that are never deleted (0 = none); written whatever --ckpt-every is, and "
                                     "kept by their step number, so a resume with another value keeps that value's multiples only")
    log_graph: bool = knob(True, "write the model graph to TensorBoard once")
    # --- system ---
    device: str = knob("auto", "auto, cpu, cuda, cuda:1, ...")
    seed: int = knob(0, "seed for weights, data order, noise")
    compile: bool = knob(False, "torch.compile the model (slow first step)")
    dist_timeout: float = knob(10.0, "with torchrun: minutes a process waits for the others at a collective before the job fails")
    amp: bool = knob(True, "bf16 autocast where it is faster: on CUDA (with TF32 matmuls) and on CPUs whose bf16 matmuls beat fp32 "
                             "(x86: AVX512-BF16/AMX; other CPUs: timed at start); weights, optimizer and checkpoints stay fp32; --no-amp = fp32")


# Presets: overrides of the defaults above. Explained in README.md; the measurements behind them are in docs/experiments.md.
_CPU = dict(emb_dim=128, depth=4, num_heads=4, head_dim=32, lr=1e-3, warmup_steps=200, batch_size=32,
            max_steps=20000, loss="l1", prediction="v", sample_every=250, ckpt_every=250)
PRESETS = {
    # Exactly the original description: 256 px, patch 4, 3 blocks, 6 heads x 64 on a 64-wide
    # stream, Adam at lr 1e-6, L1 loss, batch 6, gradient clipping; plain init, no EMA.
    "seed": dict(image_size=256, patch_size=4, emb_dim=64, depth=3, num_heads=6, head_dim=64,
                 lr=1e-6, warmup_steps=0, batch_size=6, adaln_zero=False, ema_decay=0.0,
                 max_steps=477000, sample_n=8, milestone_every=50000),
    # Same architecture, made to learn in hours: adaLN-Zero, lr 3e-4 with warm-up, EMA.
    "panda256": dict(image_size=256, patch_size=4, emb_dim=64, depth=3, num_heads=6, head_dim=64,
                     lr=3e-4, warmup_steps=500, batch_size=32, max_steps=100000, sample_n=8,
                     sample_every=2000, ckpt_every=1000, milestone_every=10000),
    # The CPU presets share one model (4 blocks, 4 heads x 32 on a 128-wide stream; cartoon48 wider) and
    # recipe (v-prediction, L1, batch 32, lr 1e-3); they differ in pixels per token.
    # 64 px, patch 4: 256 tokens.
    "panda64": dict(_CPU, image_size=64, patch_size=4),
    # 32 px, patch 2: the same 256 tokens learn faster per CPU-minute, but 32 px caps the SWD at 64 px.
    "panda32": dict(_CPU, image_size=32, patch_size=2),
    # 48 px, patch 3: panda32's cost with 1.5x the pixels, so it keeps learning past panda32's floor (the CPU default).
    # MSE on the noisiest 30% of the timesteps, where the layout is decided (L1 there draws the median, leaving out
    # the minority white and dark parts), L1 below for the texture (docs/experiments.md).
    # Its sampler's steps crowd near the image (spacing 3), where a photo's fine texture is drawn: evenly spaced steps
    # smooth it away more the longer the model trains (docs/experiments.md, "Where the sampler spends its steps").
    # Sampled with DPM-Solver++(2M), DDIM's cost at second order: sharper fine texture (docs/experiments.md).
    "panda48": dict(_CPU, image_size=48, patch_size=3, loss="hybrid", hybrid_t=700, sample_spacing=3.0, sampler="dpm2m"),
    # The procedural cartoons (their CPU default): 64 tokens of 6x6 flat pixels, an easy x_0 to draw but not an
    # easy noise to predict, so the model draws x_0; MSE down to t = 400 places their dark parts. Worse on photos.
    # Width 192 (6 heads): at 64 tokens a step costs 1.5x (bf16) to 1.8x (fp32), and per minute it draws cleaner pandas.
    # DPM-Solver++(2M) scores ~2.4 lower than DDIM on the same checkpoints (docs/experiments.md).
    "cartoon48": dict(_CPU, image_size=48, patch_size=6, emb_dim=192, num_heads=6, prediction="x0", loss="hybrid", hybrid_t=400,
                      sampler="dpm2m"),
    # For tests: a few seconds on a CPU.
    "tiny": dict(image_size=16, patch_size=4, emb_dim=32, depth=2, num_heads=2, head_dim=16,
                 lr=1e-3, warmup_steps=0, batch_size=8, max_steps=50, sample_n=4,
                 sample_steps=10, log_every=5, hist_every=10, sample_every=25, ckpt_every=25,
                 milestone_every=0, num_workers=0, ema_decay=0.99),
}


def resolve_preset(name, cuda_available, own_data=True):
    """'auto' -> panda256 on CUDA; on a CPU panda48 for a --data-dir, cartoon48 for the procedural pandas."""
    if name == "auto":
        return "panda256" if cuda_available else "panda48" if own_data else "cartoon48"
    if name not in PRESETS:
        raise SystemExit(f"error: unknown preset '{name}'; choose one of: auto, {', '.join(PRESETS)}")
    return name


def add_config_flags(parser):
    """One flag per Config field; unset flags stay absent so presets can fill them."""
    for f in dataclasses.fields(Config):
        flags = ["--" + f.name.replace("_", "-"), *ALIASES.get(f.name, ())]
        help_text = f.metadata["help"] + ("" if "(default:" in f.metadata["help"] else f" (default: {f.default})")
        if f.type in (bool, "bool"):
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            parser.add_argument(*flags, dest=f.name, type=kind, default=argparse.SUPPRESS, help=help_text,
                                choices=CHOICES.get(f.name), metavar=None if f.name in CHOICES else f.name.upper())


# torchrun takes `--run` for an abbreviation of its own --run-path: `--run-name` gets past it.
ALIASES = {"run": ("--run-name",)}


def parse_train_args(argv=None):
    """train.py's command line -> (explicit overrides as a dict, the actions: .fresh, .print_config)."""
    parser = argparse.ArgumentParser(description="Train a Diffusion Transformer on a folder of panda pictures.",
                                     epilog=f"Defaults shown are Config's; the preset ({', '.join(PRESETS)}) overrides many of "
                                            "them (see README.md); --print-config shows the values a command would use.")
    add_config_flags(parser)
    parser.add_argument("--fresh", action="store_true",
                        help="start over: existing checkpoints and logs of this run are moved aside, not deleted")
    parser.add_argument("--print-config", action="store_true",
                        help="print the settings this command would train with (defaults <- preset <- the run's checkpoint "
                             "when resuming <- flags) as JSON and exit, writing nothing; num_labels is set from the data at start")
    args = vars(parser.parse_args(argv))
    actions = argparse.Namespace(fresh=args.pop("fresh"), print_config=args.pop("print_config"))
    return args, actions


def build_config(overrides, cuda_available=False):
    """Defaults <- preset <- explicit overrides (a dict of flag values)."""
    preset = resolve_preset(overrides.get("preset", "auto"), cuda_available, bool(overrides.get("data_dir")))
    values = {**PRESETS[preset], **overrides, "preset": preset}
    if values.get("objective") == "flow":  # eps does not apply to flow: the model predicts the velocity unless told x0
        values.setdefault("prediction", "v")
        if "sampler" not in overrides:  # a preset's diffusion sampler (panda48's dpm2m) gives way to flow's own
            values["sampler"] = "auto"
    cfg = Config(**values)
    if not cfg.run:
        cfg.run = preset
    if cfg.num_workers < 0:
        cfg.num_workers = min(10, os.cpu_count() or 1)
    check_config(cfg)
    return cfg


def check_config(cfg):
    problems = []
    if min(cfg.patch_size, cfg.log_every, cfg.ckpt_every, cfg.sample_n, cfg.num_generated, cfg.max_bad_steps) < 1:
        problems.append("patch_size, log_every, ckpt_every, sample_n, num_generated and max_bad_steps must be >= 1")
    elif cfg.image_size % cfg.patch_size:
        problems.append(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
    if min(cfg.warmup_steps, cfg.hist_every, cfg.sample_every, cfg.max_minutes, cfg.milestone_every, cfg.keep_last, cfg.ema_gamma) < 0:
        problems.append("warmup_steps, hist_every, sample_every, max_minutes, milestone_every, keep_last and ema_gamma must be >= 0")
    if cfg.min_snr_gamma < 0:
        problems.append(f"min_snr_gamma must be >= 0 (0 = off), not {cfg.min_snr_gamma:g}: a negative gamma makes the loss weights negative")
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            problems.append(f"{name} must be one of {', '.join(allowed)}, not '{getattr(cfg, name)}'")
    if not 0 <= cfg.hybrid_t <= cfg.max_t:
        problems.append(f"hybrid_t must be in [0, max_t={cfg.max_t}], not {cfg.hybrid_t}")
    if min(cfg.batch_size, cfg.max_t, cfg.depth, cfg.num_heads, cfg.head_dim, cfg.emb_dim) < 1:
        problems.append("batch_size, max_t, depth, num_heads, head_dim and emb_dim must be >= 1")
    if cfg.eval_every < 0 or cfg.holdout < 0 or min(cfg.eval_n, cfg.eval_steps, cfg.sample_steps) < 1:
        problems.append("eval_every and holdout must be >= 0, eval_n, eval_steps and sample_steps >= 1")
    if not cfg.sample_spacing >= 1:
        problems.append(f"sample_spacing must be >= 1 (1 = evenly spaced steps), not {cfg.sample_spacing:g}")
    if not (cfg.lr > 0 and cfg.mlp_ratio > 0):
        problems.append("lr and mlp_ratio must be > 0")
    if not 0.0 <= cfg.ema_decay < 1.0:
        problems.append("ema_decay must be in [0, 1) (0 = EMA off)")
    if cfg.objective == "diffusion" and cfg.max_t >= 1 and cfg.noise_schedule == "linear" and terminal_alpha_bar(cfg) > 0.05:
        problems.append(f"max_t={cfg.max_t} with betas {cfg.beta_start}..{cfg.beta_end} leaves {terminal_alpha_bar(cfg):.2f} "
                        "of the image at the last step, so sampling from pure noise is wrong; raise max_t or beta_end")
    if not cfg.dist_timeout > 0:
        problems.append("dist_timeout must be > 0 minutes")
    if not 0.0 <= cfg.label_dropout < 1.0:
        problems.append("label_dropout must be in [0, 1)")
    if cfg.in_channels != 3:
        problems.append(f"in_channels must be 3, not {cfg.in_channels}: every image is read as RGB")
    problems += route_problems(cfg)
    problems += objective_problems(cfg)
    if problems:
        raise SystemExit("error: " + "; ".join(problems))


def route_problems(cfg):
    """What is wrong with the routing fields (nothing to check about the span while routing is off)."""
    if not 0.0 <= cfg.route_ratio < 1.0:
        return ["route_ratio must be in [0, 1) (0 = routing off)"]
    end = cfg.route_end if cfg.route_end >= 0 else cfg.depth + cfg.route_end
    tokens = (cfg.image_size // max(cfg.patch_size, 1)) ** 2
    if cfg.route_ratio > 0 and not 0 <= cfg.route_start < end <= cfg.depth:
        return [f"route_start {cfg.route_start} and route_end {cfg.route_end} name no span of blocks in a depth-{cfg.depth} "
                f"model; pass 0 <= --route-start < --route-end <= {cfg.depth} (a negative --route-end counts from the end)"]
    if cfg.route_ratio > 0 and round(tokens * (1 - cfg.route_ratio)) < 1:
        return [f"route_ratio {cfg.route_ratio} routes all {tokens} tokens past the middle blocks; lower --route-ratio"]
    return []


def objective_problems(cfg):
    """What --objective flow cannot combine with, and samplers of the other objective."""
    problems = []
    if cfg.objective == "flow" and cfg.prediction == "eps":
        problems.append("--prediction eps does not apply to --objective flow (the model predicts the velocity); use --prediction v or x0")
    if cfg.objective == "flow" and cfg.min_snr_gamma:
        problems.append("--min-snr-gamma is for --objective diffusion only; drop it or use --min-snr-gamma 0")
    allowed = SAMPLERS.get(cfg.objective, ())
    if cfg.sampler != "auto" and cfg.objective in SAMPLERS and cfg.sampler not in allowed:
        problems.append(f"--sampler {cfg.sampler} is not a sampler of --objective {cfg.objective}; use auto or {' or '.join(allowed)}")
    return problems


def resolve_sampler(cfg):
    """cfg.sampler, with auto replaced by the objective's default."""
    return SAMPLERS[cfg.objective][0] if cfg.sampler == "auto" else cfg.sampler


def terminal_alpha_bar(cfg):
    """alpha-bar at t = max_t - 1: the share of the signal left in x_T (should be ~0)."""
    a = 1.0
    for i in range(cfg.max_t):
        a *= 1.0 - (cfg.beta_start + (cfg.beta_end - cfg.beta_start) * i / max(1, cfg.max_t - 1))
    return a


def config_from_dict(d):
    """Rebuild a Config from a checkpoint's plain dict, ignoring unknown keys."""
    names = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in d.items() if k in names})


# Fields that change the network's shapes or meaning: a checkpoint cannot resume across them.
ARCH_FIELDS = ("image_size", "patch_size", "in_channels", "emb_dim", "depth", "num_heads", "head_dim",
               "mlp_ratio", "mlp_act", "freq_dim", "num_labels", "label_dropout", "max_t", "beta_start", "beta_end", "prediction",
               "noise_schedule", "objective")

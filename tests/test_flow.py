"""Rectified flow (--objective flow): the loss against its closed form, the samplers against exact solutions, the
logit-normal t, the config rules, a resume across objectives, sample.py on a flow checkpoint, and the DDPM path unchanged."""
import contextlib
import math
import shutil
import types

import pytest
import torch
from torchvision.utils import make_grid

import sample
import train
from config import build_config, config_from_dict
from conftest import make_pandas, run_train
from diffusion import Diffusion, Flow, make_diffusion
from dit import DiT
from dataset import enlarge

T = 1000


def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol, rtol=tol)


def draws(seed, x0):
    """The (t, noise) that Flow.training_loss draws from a generator seeded with `seed`."""
    g = torch.Generator().manual_seed(seed)
    t = torch.sigmoid(torch.randn(x0.shape[0], generator=g))
    return t, torch.randn(x0.shape, generator=g)


class Recorder:
    """A 'model' returning 0.5 x_t - 0.1, keeping the timesteps it was given."""
    null_label = None

    def __call__(self, x_t, t, y):
        self.t = t
        return 0.5 * x_t - 0.1


@pytest.mark.parametrize("loss", ["l1", "mse", "hybrid"])
@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_loss_matches_closed_form(loss, prediction):
    """x_t = (1 - t) x_0 + t eps, the model sees t * max_t, the target is eps - x_0, and the loss is L1 / MSE (MSE at
    t >= hybrid_t / max_t) of the velocity: the output itself, or (x_t - output) / max(t, 0.05) for x0-prediction."""
    x0 = torch.rand(64, 3, 4, 4) * 2 - 1
    model, flow = Recorder(), Flow(T, loss, prediction=prediction, hybrid_t=500)
    value, out, target = flow.training_loss(model, x0, torch.zeros(64, dtype=torch.long), torch.Generator().manual_seed(3))
    t, eps = draws(3, x0)
    tv = t.view(-1, 1, 1, 1)
    x_t = (1 - tv) * x0 + tv * eps
    v = 0.5 * x_t - 0.1 if prediction == "v" else (x_t - (0.5 * x_t - 0.1)) / tv.clamp(min=0.05)
    err = (v - (eps - x0)).flatten(1)
    per = {"l1": err.abs().mean(1), "mse": err.square().mean(1)}
    per["hybrid"] = torch.where(t >= 0.5, per["mse"], per["l1"])
    close(model.t, t * T)
    close(target, eps - x0)
    close(out, v)
    close(value, per[loss].mean())
    assert (t < 0.5).any() and (t >= 0.5).any()  # both halves of the hybrid are exercised


def test_t_is_logit_normal():
    """The t the model is trained at is sigmoid(N(0, 1)): logit(t) has mean ~0 and std ~1."""
    model, n = Recorder(), 200_000
    Flow(T).training_loss(model, torch.zeros(n, 1, 1, 1), torch.zeros(n, dtype=torch.long), torch.Generator().manual_seed(0))
    t = model.t.double() / T
    logit = (t / (1 - t)).log()
    assert 0 < t.min() and t.max() < 1
    assert abs(logit.mean().item()) < 0.01 and abs(logit.std().item() - 1) < 0.01


def oracle(x0, prediction="v"):
    """A model that knows x_0: the velocity (x - x_0) / t (on the path x_t that is exactly eps - x_0), or x_0 itself."""
    def model(x, t_in, y):
        t = (t_in / T).view(-1, 1, 1, 1)
        return (x - x0) / t if prediction == "v" else x0.expand_as(x)
    model.null_label = None
    return model


@pytest.mark.parametrize("sampler, steps", [("euler", 1), ("euler", 7), ("heun", 1), ("heun", 4)])
@pytest.mark.parametrize("prediction", ["v", "x0"])
@pytest.mark.parametrize("clip", [True, False])
def test_oracle_recovers_x0_from_noise(sampler, steps, prediction, clip):
    """On the straight path, Euler and Heun land on x_0 exactly from pure noise, even Euler in one step, and the
    x_0 each step predicts (what the callback and --trajectory show) is x_0 all along."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(3, 3, 8, 8, generator=g) * 1.8 - 0.9
    noise = torch.randn(3, 3, 8, 8, generator=g)
    seen = []
    out = Flow(T, prediction=prediction).sample(oracle(x0, prediction), noise, torch.zeros(3, dtype=torch.long),
                                                 sampler, steps, clip=clip, callback=lambda i, t, x, x_start: seen.append(x_start))
    close(out, x0, tol=1e-5)
    assert len(seen) == steps
    for x_start in seen:
        close(x_start, x0, tol=1e-5)


def test_spaced_times_crowd_near_the_image_and_the_oracle_still_lands_on_x0():
    """spacing p: the times (1 - i / steps) ** p, so the steps shrink towards t = 0; the straight path is still exact."""
    flow = Flow(T)
    flow.spacing = 2
    assert flow.timesteps(4) == [1.0, 0.5625, 0.25, 0.0625, 0.0]
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(2, 3, 8, 8, generator=g) * 1.8 - 0.9
    out = flow.sample(oracle(x0, "v"), torch.randn(2, 3, 8, 8, generator=g), torch.zeros(2, dtype=torch.long), "heun", 5)
    close(out, x0, tol=1e-5)


def curved(x, t_in, y):
    """dx/dt = t x: from x(1), x(0) = x(1) exp(-1/2)."""
    return (t_in / T).view(-1, 1, 1, 1) * x


curved.null_label = None


def test_heun_beats_euler_on_a_curved_field():
    """On a field with a known solution Heun's error is far below Euler's at the same steps, and shrinks ~4x per
    halving of the step (second order) where Euler's halves."""
    x1 = torch.linspace(-1.6, 1.6, 12).view(1, 3, 2, 2)  # x(0) inside [-1, 1]: the sampler clamps its result
    exact = x1 * math.exp(-0.5)
    y = torch.zeros(1, dtype=torch.long)
    error = {(s, n): (Flow(T).sample(curved, x1, y, s, n, clip=False) - exact).abs().max().item()
             for s in ("euler", "heun") for n in (8, 16)}
    assert error["heun", 8] < error["euler", 8] / 5
    assert error["heun", 8] / error["heun", 16] > 3 and error["euler", 8] / error["euler", 16] < 2.5


def test_guidance_extrapolates_the_velocity():
    """cfg_scale s samples along v_u + s (v_c - v_u): with oracle fields towards a (label) and b (null) it lands on
    b + s (a - b)."""
    a, b = torch.full((2, 3, 4, 4), 0.2), torch.full((2, 3, 4, 4), -0.1)

    def model(x, t_in, y):
        target = torch.where((y == model.null_label).view(-1, 1, 1, 1), -0.1, 0.2)
        return (x - target) / (t_in / T).view(-1, 1, 1, 1)
    model.null_label = 1
    out = Flow(T).sample(model, torch.randn(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), "euler", 3, cfg_scale=3.0, clip=False)
    close(out, b + 3.0 * (a - b))


def test_samplers_refuse_the_other_objectives():
    with pytest.raises(ValueError):
        Flow(T).sample(curved, torch.zeros(1, 3, 2, 2), torch.zeros(1, dtype=torch.long), "ddim", 4)
    with pytest.raises(ValueError):
        Flow(T, prediction="eps")


# ---------------------------------------------------------------------------------------------
# config


def config(**overrides):
    return build_config({"preset": "tiny", **overrides})


def test_config_picks_flow_defaults_and_refuses_what_does_not_apply():
    """Flow predicts the velocity unless told x0 (cartoon48's), samples with heun by default; eps, a diffusion
    sampler and Min-SNR are refused in one sentence each; old checkpoints read as diffusion."""
    cfg = config(objective="flow")
    assert (cfg.prediction, make_diffusion(cfg).sampler, type(make_diffusion(cfg))) == ("v", "heun", Flow)
    assert build_config({"preset": "cartoon48", "objective": "flow"}).prediction == "x0"
    assert make_diffusion(config(objective="flow", sampler="heun")).sampler == "heun"
    refusals = {"prediction": ("eps", "--prediction eps does not apply to --objective flow"),
                "sampler": ("ddim", "--sampler ddim is not a sampler of --objective flow"),
                "min_snr_gamma": (5.0, "--min-snr-gamma is for --objective diffusion only")}
    for field, (value, message) in refusals.items():
        with pytest.raises(SystemExit) as e:
            config(objective="flow", **{field: value})
        assert str(e.value).startswith("error: " + message)
    with pytest.raises(SystemExit, match="--sampler heun is not a sampler of --objective diffusion"):
        config(sampler="heun")
    assert config_from_dict({"max_t": 10}).objective == "diffusion"


# ---------------------------------------------------------------------------------------------
# the DDPM path


def test_diffusion_path_unchanged(tiny_cfg):
    """The default (and the description's seed preset) is DDPM sampled with DDIM; the sample grid is bit-identical
    to a direct DDIM call; the DiT gives the same bits for integer and float timesteps."""
    seed = build_config({"preset": "seed"})
    assert (seed.objective, seed.prediction, seed.sampler) == ("diffusion", "eps", "auto")
    d = make_diffusion(tiny_cfg)
    assert type(d) is Diffusion and d.sampler == "ddim"
    torch.manual_seed(0)
    model = DiT.from_config(tiny_cfg).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 999])
    with torch.no_grad():
        assert torch.equal(model(x, t, t * 0), model(x, t.float(), t * 0))
    run = types.SimpleNamespace(cfg=tiny_cfg, model=model, ema=None, diffusion=d, device=torch.device("cpu"),
                                autocast=contextlib.nullcontext(), data=types.SimpleNamespace(classes=["pandas"]))
    grid = train.sample_grid(run)
    noise = torch.randn(tiny_cfg.sample_n, 3, 16, 16, generator=torch.Generator().manual_seed(tiny_cfg.seed + 1))
    images = d.sample(model, noise, torch.zeros(tiny_cfg.sample_n, dtype=torch.long), "ddim", tiny_cfg.sample_steps)
    assert torch.equal(grid, make_grid(enlarge((images + 1) / 2), nrow=2))


# ---------------------------------------------------------------------------------------------
# a tiny flow run: resume across objectives, sample.py


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    make_pandas(root / "pandas", 4)
    # the sample grid and the SWD evaluation must draw with a flow sampler (a DDIM call on Flow raises)
    run_train(root / "work", root / "pandas", "--objective", "flow", "--max-steps", 2, "--sample-every", 2,
              "--eval-every", 2, "--eval-n", 4, "--eval-steps", 2, "--no-log-graph")
    assert (root / "work/checkpoints/tiny/best.pt").exists()
    return root


def test_resume_across_objectives_is_refused(flow_run, tmp_path, capsys):
    """A flow run resumed with --objective diffusion stops with the one-line architecture error; without the flag
    it resumes as flow."""
    work = tmp_path / "work"
    shutil.copytree(flow_run / "work", work)
    with pytest.raises(SystemExit) as e:
        run_train(work, flow_run / "pandas", "--objective", "diffusion", "--max-steps", 4)
    message = str(e.value)
    assert message.startswith("error: run 'tiny' (") and "\n" not in message
    assert "different architecture (objective flow -> diffusion)" in message
    run_train(work, flow_run / "pandas", "--max-steps", 3, "--sample-every", 0, "--no-log-graph")
    assert "resuming 'tiny'" in capsys.readouterr().out
    state = torch.load(work / "checkpoints/tiny/latest.pt", weights_only=True)
    assert (state["step"], state["config"]["objective"]) == (3, "flow")


@pytest.mark.parametrize("sampler", ["heun", "euler"])
def test_sample_py_draws_a_flow_checkpoint(flow_run, tmp_path, capsys, sampler):
    sample.main(["--ckpt", str(flow_run / "work/checkpoints/tiny/latest.pt"), "--sampler", sampler, "--steps", "4",
                 "--n", "3", "--out", str(tmp_path), "--device", "cpu"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0000.png", "0001.png", "0002.png", "grid.png"]
    assert f"{sampler}-4" in capsys.readouterr().out


def test_sample_py_refuses_a_diffusion_sampler_on_flow(flow_run, tmp_path):
    ckpt = str(flow_run / "work/checkpoints/tiny/latest.pt")
    for argv, message in ((["--sampler", "ddim"], "error: --sampler ddim does not sample a flow checkpoint; use heun or euler"),
                          (["--eta", "0.5"], "error: --eta is for ddim; heun is deterministic, drop --eta")):
        with pytest.raises(SystemExit) as e:
            sample.main(["--ckpt", ckpt, "--out", str(tmp_path), "--device", "cpu", *argv])
        assert str(e.value) == message

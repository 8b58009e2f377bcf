"""Diffusion maths against formulas recomputed here in float64: schedule, q(x_t|x_0), DDPM, DDIM, guidance."""
import math

import pytest
import torch

from config import build_config
from diffusion import Diffusion, make_betas, make_diffusion
from dit import DiT

T = 1000
TS = [0, 1, 17, 250, 500, 998, 999]


def schedule64(max_t=T, beta_start=1e-4, beta_end=0.02):
    """(betas, alpha-bar) of the linear schedule, in plain float64 Python (no torch)."""
    betas = [beta_start + (beta_end - beta_start) * i / (max_t - 1) for i in range(max_t)]
    abar, running = [], 1.0
    for b in betas:
        running *= 1.0 - b
        abar.append(running)
    return betas, abar


BETAS, ABAR = schedule64()


def abar_at(t):
    return 1.0 if t < 0 else ABAR[t]


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol, rtol=tol)


def at(t, n=2):
    return torch.full((n,), t, dtype=torch.long)


@pytest.fixture(scope="module")
def diff():
    return Diffusion(T, 1e-4, 0.02)


def oracle(x0, abar=ABAR):
    """A 'model' returning the exact noise that produced x_t from the known x0 (float64 alpha-bar, linear by default)."""
    def model(x_t, t, y):
        a = torch.tensor([abar[int(i)] for i in t], dtype=torch.float64).view(-1, 1, 1, 1)
        return ((x_t.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()).float()
    return model


def test_schedule_matches_closed_form(diff):
    """betas are linear 1e-4..0.02 and every precomputed term equals its closed form at several t."""
    for t in TS:
        b, a, a_prev = BETAS[t], ABAR[t], abar_at(t - 1)
        expected = dict(
            betas=b, alphas_cumprod=a, alphas_cumprod_prev=a_prev, sqrt_alphas_cumprod=math.sqrt(a),
            sqrt_one_minus_alphas_cumprod=math.sqrt(1 - a), sqrt_recip_alphas_cumprod=math.sqrt(1 / a),
            sqrt_recipm1_alphas_cumprod=math.sqrt(1 / a - 1), posterior_variance=b * (1 - a_prev) / (1 - a))
        for name, value in expected.items():
            assert getattr(diff, name)[t].item() == pytest.approx(value, rel=1e-6, abs=1e-9), (name, t)
    assert diff.betas.shape == (T,)
    assert diff.betas[0].item() == pytest.approx(1e-4) and diff.betas[-1].item() == pytest.approx(0.02)


def test_q_sample_statistics(diff):
    """Over many noise draws x_t has mean sqrt(abar) x0 and variance 1 - abar."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([-0.9, -0.3, 0.0, 0.5, 1.0]).view(1, 5, 1, 1)
    n = 20000
    for t in (0, 100, 500, 999):
        noise = torch.randn(n, 5, 1, 1, generator=g)
        x_t = diff.q_sample(x0.expand(n, -1, -1, -1), at(t, n), noise)
        a = ABAR[t]
        mean, var = x_t.double().mean(0).flatten(), x_t.double().var(0).flatten()
        sd_mean = math.sqrt((1 - a) / n)  # standard error of the mean
        assert (mean - math.sqrt(a) * x0.flatten()).abs().max() < 5 * sd_mean + 1e-6, t
        assert (var - (1 - a)).abs().max() < 5 * (1 - a) * math.sqrt(2 / n) + 1e-7, t


def test_q_sample_is_the_closed_form(diff):
    """q_sample(x0, t, eps) = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps exactly to float precision."""
    x0, eps = torch.rand(2, 3, 4, 4) * 2 - 1, torch.randn(2, 3, 4, 4)
    for t in TS:
        a = ABAR[t]
        close(diff.q_sample(x0, at(t), eps), math.sqrt(a) * x0.double() + math.sqrt(1 - a) * eps.double())


def test_posterior_matches_ho_et_al_eq_6_7(diff):
    """q(x_{t-1}|x_t,x_0): mean and variance are Ho et al. 2020 eq. 7, to 1e-6 at several t."""
    x0, x_t = torch.rand(2, 3, 4, 4) * 2 - 1, torch.randn(2, 3, 4, 4)
    for t in TS:
        b, a, a_prev = BETAS[t], ABAR[t], abar_at(t - 1)
        mean = (math.sqrt(a_prev) * b / (1 - a)) * x0.double() + (math.sqrt(1 - b) * (1 - a_prev) / (1 - a)) * x_t.double()
        var = (1 - a_prev) / (1 - a) * b
        got_mean, got_var = diff.q_posterior(x0, x_t, at(t))
        close(got_mean, mean)
        close(got_var.flatten(), torch.full((2,), var, dtype=torch.float64))


def test_ddpm_step_matches_formula(diff):
    """One ancestral step is mu(x0_hat, x_t) + sqrt(var) z with x0_hat from eps (no noise at t = 0)."""
    x_t, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for t in TS:
        b, a, a_prev = BETAS[t], ABAR[t], abar_at(t - 1)
        x0_hat = (x_t.double() - math.sqrt(1 - a) * eps.double()) / math.sqrt(a)
        mean = (math.sqrt(a_prev) * b / (1 - a)) * x0_hat + (math.sqrt(1 - b) * (1 - a_prev) / (1 - a)) * x_t.double()
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(t)).double() if t > 0 else 0.0
        expected = mean + math.sqrt((1 - a_prev) / (1 - a) * b) * z
        got, got_x0 = diff.ddpm_step(eps, x_t, at(t), torch.Generator().manual_seed(t), clip=False)
        close(got, expected)
        close(got_x0, x0_hat, tol=1e-6 / math.sqrt(a))  # x0_hat amplifies float32 rounding by 1/sqrt(abar)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_song_et_al_eq_12(diff, eta):
    """x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps + sigma z (Song et al. 2021 eq. 12)."""
    x_t, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for t, t_prev in [(999, 979), (500, 499), (250, 0), (17, 3), (1, 0), (0, -1), (999, -1)]:
        a, a_prev = ABAR[t], abar_at(t_prev)
        x0_hat = (x_t.double() - math.sqrt(1 - a) * eps.double()) / math.sqrt(a)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(t)).double() if t_prev >= 0 else 0.0
        expected = math.sqrt(a_prev) * x0_hat + math.sqrt(1 - a_prev - sigma ** 2) * eps.double() + sigma * z
        got, _ = diff.ddim_step(eps, x_t, at(t), at(t_prev), eta, torch.Generator().manual_seed(t), clip=False)
        close(got, expected, tol=1e-6 / math.sqrt(a) if t_prev < 0 else 1e-6)  # t_prev = -1: x0_hat itself


@pytest.mark.parametrize("steps", [1, 3, 10, 50, 1000])
def test_ddim_with_oracle_recovers_x0(diff, steps):
    """Given the true noise, deterministic DDIM lands on x0 for any step count, staying on q(x_t|x0)'s path."""
    x0 = torch.rand(2, 3, 4, 4) * 1.8 - 0.9
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(steps))
    eps = (noise.double() - math.sqrt(ABAR[-1]) * x0) / math.sqrt(1 - ABAR[-1])  # the noise in x_{T-1}
    ts = diff.timesteps(steps) + [-1]
    path = []  # x after step i sits at t = ts[i + 1], and eta = 0 keeps the same eps all the way
    record = lambda i, t, x, x_start: path.append((ts[i + 1], x.clone()))
    out = diff.sample(oracle(x0), noise, torch.zeros(2, dtype=torch.long), "ddim", steps, clip=False, callback=record)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
    assert len(path) == steps
    for t_next, x in path:
        a = abar_at(t_next)
        torch.testing.assert_close(x.double(), math.sqrt(a) * x0.double() + math.sqrt(1 - a) * eps, atol=1e-4, rtol=0)


def test_ddpm_1000_with_oracle_recovers_x0_and_stays_on_the_marginals(diff):
    """The faithful 1000-step ancestral sampler, given the true noise, ends at x0; on the way each x_t is a
    draw from q(x_t | x0) = N(sqrt(abar_t) x0, 1 - abar_t), since every step samples the exact posterior.
    (The oracle makes every predicted x0 exact, so only the path shows a wrong posterior mean or variance.)"""
    x0 = torch.rand(8, 3, 16, 16) * 1.8 - 0.9
    noise = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    checked = {900, 500, 100, 20, 2}
    path = {}  # the step at t leaves x_{t-1}
    record = lambda i, t, x, x_start: path.update({t - 1: x.double()}) if t - 1 in checked else None  # noqa: E731
    out = diff.sample(oracle(x0), noise, torch.zeros(8, dtype=torch.long), "ddpm", T,
                      generator=torch.Generator().manual_seed(2), callback=record)
    torch.testing.assert_close(out, x0, atol=1e-3, rtol=0)
    assert sorted(path) == sorted(checked)
    for t, x in path.items():  # 6144 independent pixels: the standardised residual is N(0, 1)
        z = (x - math.sqrt(ABAR[t]) * x0.double()) / math.sqrt(1 - ABAR[t])
        assert abs(z.mean().item()) < 0.07 and abs(z.std().item() - 1) < 0.07, (t, z.mean().item(), z.std().item())


def posterior64(x0_hat, x_t, t):
    """Closed-form mean and variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020 eq. 7), float64, scalar t."""
    b, a, a_prev = BETAS[t], ABAR[t], abar_at(t - 1)
    mean = (math.sqrt(a_prev) * b / (1 - a)) * x0_hat.double() + (math.sqrt(1 - b) * (1 - a_prev) / (1 - a)) * x_t.double()
    return mean, (1 - a_prev) / (1 - a) * b


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_a_step_draws_from_the_closed_form_distribution(diff, sampler):
    """Repeated from one (x_t, eps) with a fixed generator, an ancestral step's outputs have the posterior's
    mean and variance (DDPM), or eq. 12's mean and sigma^2 (DDIM with eta = 1 from t to t_prev)."""
    n = 20000
    x_t = torch.tensor([-1.5, -0.2, 0.3, 1.2]).view(1, 4, 1, 1).expand(n, -1, -1, -1)
    eps = torch.tensor([0.7, -1.1, 0.1, 0.4]).view(1, 4, 1, 1).expand(n, -1, -1, -1)
    g = torch.Generator().manual_seed(0)
    for t, t_prev in ((1, 0), (17, 16), (500, 499), (999, 998), (500, 300), (999, 0)):
        if sampler == "ddpm" and t_prev != t - 1:
            continue
        a, a_prev = ABAR[t], abar_at(t_prev)
        x0_hat = (x_t[:1].double() - math.sqrt(1 - a) * eps[:1].double()) / math.sqrt(a)
        if sampler == "ddpm":
            mean, var = posterior64(x0_hat, x_t[:1], t)
            got, _ = diff.ddpm_step(eps, x_t, at(t, n), g, clip=False)
        else:
            var = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
            mean = math.sqrt(a_prev) * x0_hat + math.sqrt(1 - a_prev - var) * eps[:1].double()
            got, _ = diff.ddim_step(eps, x_t, at(t, n), at(t_prev, n), 1.0, g, clip=False)
        sd = math.sqrt(var)
        assert (got.double().mean(0) - mean[0]).abs().max() < 5 * sd / math.sqrt(n) + 1e-5, (t, t_prev)
        assert (got.double().var(0) - var).abs().max() < 5 * var * math.sqrt(2 / n) + 1e-9, (t, t_prev)


def test_ddpm_and_ddim_steps_take_each_images_own_t(diff):
    """A batch whose images sit at different timesteps steps each one as if it were alone: the deterministic
    parts match single-image calls, and each image's noise is scaled by its own t."""
    t, t_prev = torch.tensor([0, 999, 17, 500]), torch.tensor([-1, 979, 3, 499])
    x_t, eps = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4) * 2  # * 2: some x0 predictions clip
    for clip in (False, True):
        whole = diff.ddim_step(eps, x_t, t, t_prev, clip=clip)
        for i in range(4):
            alone = diff.ddim_step(eps[i:i + 1], x_t[i:i + 1], t[i:i + 1], t_prev[i:i + 1], clip=clip)
            for got, expected in zip(whole, alone):
                close(got[i:i + 1], expected, tol=1e-5)
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(3)).double()
    ddpm, x0_hat = diff.ddpm_step(eps, x_t, t, torch.Generator().manual_seed(3), clip=False)
    ddim, _ = diff.ddim_step(eps, x_t, t, t_prev, 0.5, torch.Generator().manual_seed(3), clip=False)
    for i, (s, s_prev) in enumerate(zip(t.tolist(), t_prev.tolist())):
        mean, var = posterior64(x0_hat[i], x_t[i], s)
        close(ddpm[i], mean + math.sqrt(var) * z[i], tol=1e-5)  # no noise at t = 0, noise elsewhere
        a, a_prev = ABAR[s], abar_at(s_prev)
        sigma = 0.5 * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        expected = math.sqrt(a_prev) * x0_hat[i].double() + math.sqrt(1 - a_prev - sigma ** 2) * eps[i].double() + sigma * z[i]
        close(ddim[i], expected, tol=1e-4 if s_prev < 0 else 1e-5)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_clipped_step_matches_reference(diff, eta):
    """With clipping, x0_hat is clamped to [-1, 1] and eps is recomputed from it before eq. 12."""
    target, eps = torch.rand(2, 3, 4, 4).double() * 4 - 2, torch.randn(2, 3, 4, 4)  # x0 predictions in [-2, 2]
    for t, t_prev in [(999, 979), (500, 250), (17, 3), (0, -1)]:
        a, a_prev = ABAR[t], abar_at(t_prev)
        x_t = (math.sqrt(a) * target + math.sqrt(1 - a) * eps.double()).float()
        x0_hat = ((x_t.double() - math.sqrt(1 - a) * eps.double()) / math.sqrt(a)).clamp(-1, 1)
        assert (x0_hat.abs() == 1).any() and (x0_hat.abs() < 1).any()  # the clamp does something, not everything
        eps_clipped = (x_t.double() - math.sqrt(a) * x0_hat) / math.sqrt(1 - a)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(t)).double() if t_prev >= 0 else 0.0
        expected = math.sqrt(a_prev) * x0_hat + math.sqrt(1 - a_prev - sigma ** 2) * eps_clipped + sigma * z
        got, got_x0 = diff.ddim_step(eps, x_t, at(t), at(t_prev), eta, torch.Generator().manual_seed(t), clip=True)
        close(got_x0, x0_hat, tol=2e-6 / math.sqrt(a))  # x0_hat amplifies float32 rounding by 1/sqrt(abar)
        close(got, expected, tol=2e-6 / math.sqrt(a) if t_prev < 0 else 1e-5)


def small_dit(**kw):
    args = dict(image_size=8, patch_size=2, emb_dim=16, depth=1, num_heads=2, head_dim=8, adaln_zero=False)
    return DiT(**{**args, **kw}).eval()


def test_ddim_eta1_all_steps_is_ddpm():
    """DDIM with steps = max_t and eta = 1 gives the ancestral sampler's images for the same seed."""
    diffusion = Diffusion(100)
    model = small_dit()
    noise, y = torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)
    ddpm = diffusion.sample(model, noise, y, "ddpm", 100, generator=torch.Generator().manual_seed(5))
    ddim = diffusion.sample(model, noise, y, "ddim", 100, eta=1.0, generator=torch.Generator().manual_seed(5))
    other = diffusion.sample(model, noise, y, "ddpm", 100, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(ddim, ddpm, atol=1e-4, rtol=0)
    assert (other - ddpm).abs().max() > 1e-2  # and the seed matters, so the match is not vacuous


def test_sample_batches_matches_one_batch_and_calls_back_on_the_first():
    """Deterministic DDIM in batches of 2 gives the one-batch images, on the CPU as float32; the callback
    sees every step of the first batch only; with eta > 0 the seed picks the images."""
    diffusion, model = Diffusion(100), small_dit()
    noise, y = torch.randn(5, 3, 8, 8), torch.zeros(5, dtype=torch.long)
    whole = diffusion.sample(model, noise, y, "ddim", 10)
    seen = []
    batched = diffusion.sample_batches(model, noise, y, 2, "cpu", "ddim", 10, callback=lambda i, t, x, x0: seen.append(x.shape[0]))
    torch.testing.assert_close(batched, whole, atol=1e-5, rtol=0)
    assert batched.dtype == torch.float32 and seen == [2] * 10
    a, b, c = (diffusion.sample_batches(model, noise, y, 2, "cpu", "ddim", 10, seed=s, eta=1.0) for s in (3, 3, 4))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - c).abs().max() > 1e-2


def test_classifier_free_guidance_scales():
    """Guidance scale 1 is the conditional prediction, 0 the unconditional, s the extrapolation between."""
    model = small_dit(num_labels=3, label_dropout=0.2)
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([5, 50, 90]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, model.null_label))
        assert (cond - uncond).abs().max() > 1e-4  # labels matter, so the checks below mean something
        torch.testing.assert_close(Diffusion.guided_eps(model, x, t, y, 1.0), cond, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(Diffusion.guided_eps(model, x, t, y, 0.0), uncond, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(Diffusion.guided_eps(model, x, t, y, 4.0), uncond + 4 * (cond - uncond),
                                   atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("sampler,steps", [("ddim", 10), ("ddpm", 100), ("ddpm", 7)])
def test_sampler_output_in_range(sampler, steps):
    """Even a wild noise predictor yields images inside [-1, 1], with and without x0 clipping."""
    diffusion = Diffusion(100)
    noise, y = torch.randn(2, 3, 8, 8) * 3, torch.zeros(2, dtype=torch.long)
    for clip in (True, False):
        out = diffusion.sample(lambda x, t, y: -5 * x, noise, y, sampler, steps, eta=0.3, clip=clip)
        assert out.shape == noise.shape and out.min() >= -1 and out.max() <= 1
        assert torch.isfinite(out).all()


def test_timesteps_bounds():
    """timesteps(n) runs from max_t - 1 down to 0; n < 1 or n > max_t is refused."""
    diffusion = Diffusion(100)
    assert diffusion.timesteps(100) == list(range(99, -1, -1))
    assert diffusion.timesteps(1) == [99]
    ts = diffusion.timesteps(10)
    assert ts[0] == 99 and ts[-1] == 0 and len(set(ts)) == 10 and ts == sorted(ts, reverse=True)
    for bad in (0, -3, 101):
        with pytest.raises(ValueError, match="steps"):
            diffusion.timesteps(bad)


@pytest.mark.parametrize("spacing", [1.5, 2, 7])
def test_spaced_timesteps_crowd_near_the_image(spacing):
    """spacing > 1: distinct steps from max_t - 1 down to 0, each gap no wider than the one before it, the last ones
    a single timestep apart; the step count stays exact, and steps = max_t is still every timestep."""
    diffusion = Diffusion(T, 1e-4, 0.02)
    even = diffusion.timesteps(50)
    diffusion.spacing = spacing
    for steps in (2, 25, 50, 333):
        ts = diffusion.timesteps(steps)
        gaps = [a - b for a, b in zip(ts, ts[1:])]
        assert len(ts) == steps and ts[0] == T - 1 and ts[-1] == 0 and min(gaps) >= 1
        assert all(later <= earlier + 1 for earlier, later in zip(gaps, gaps[1:]))  # +1: rounding
    ts = diffusion.timesteps(50)
    assert 5 * ts[-2] < even[-2] and ts[25] < even[25]  # a last step a fifth as long; half the steps lower down
    assert diffusion.timesteps(T) == list(range(T - 1, -1, -1))


def test_ddim_with_oracle_recovers_x0_on_spaced_steps():
    """Spacing moves the steps, not the path: given the true noise, DDIM on crowded steps still lands on x0."""
    diffusion = Diffusion(T, 1e-4, 0.02)
    diffusion.spacing = 2
    x0 = torch.rand(2, 3, 4, 4) * 1.8 - 0.9
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    seen = []
    out = diffusion.sample(oracle(x0), noise, torch.zeros(2, dtype=torch.long), "ddim", 20, clip=False,
                           callback=lambda i, t, x, x_start: seen.append(t))
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
    assert seen == diffusion.timesteps(20) and seen[-2] < 5


@pytest.mark.parametrize("spacing", [1, 3])
def test_dpm2m_with_oracle_recovers_x0(spacing):
    """Given the true noise every predicted x0 is exact, so DPM-Solver++(2M)'s extrapolation of two of them is too."""
    diffusion = Diffusion(T, 1e-4, 0.02)
    diffusion.spacing = spacing
    x0 = torch.rand(2, 3, 4, 4) * 1.8 - 0.9
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    out = diffusion.sample(oracle(x0), noise, torch.zeros(2, dtype=torch.long), "dpm2m", 20, clip=False)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


def gaussian_eps(var):
    """The exact noise predictor for data drawn from N(0, var) per pixel: E[eps | x_t] = sqrt(1 - a) x_t / (a var + 1 - a)."""
    def model(x_t, t, y):
        a = torch.tensor([ABAR[int(i)] for i in t], dtype=torch.float64).view(-1, 1, 1, 1)
        return ((1 - a).sqrt() * x_t.double() / (a * var + 1 - a)).float()
    return model


@pytest.mark.parametrize("spacing", [1, 3])
def test_dpm2m_follows_the_ode_closer_than_ddim(spacing):
    """On Gaussian data, whose noise predictor is exact, DPM-Solver++(2M) lands nearer the probability-flow ODE's end
    (DDIM over all 1000 steps) than DDIM does with the same steps, at least 3x nearer from 20 steps up: second order
    against first. With even steps the long last step into t = 0 stays first order, or it would overshoot."""
    diffusion = Diffusion(T, 1e-4, 0.02)
    noise, y = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.zeros(4, dtype=torch.long)
    model = gaussian_eps(0.25)
    ode_end = diffusion.sample(model, noise, y, "ddim", T, clip=False)
    diffusion.spacing = spacing
    for steps in (20, 50):
        ddim, dpm2m = ((diffusion.sample(model, noise, y, s, steps, clip=False) - ode_end).abs().max() for s in ("ddim", "dpm2m"))
        assert dpm2m * 3 < ddim, (steps, float(dpm2m), float(ddim))


def test_dpm2m_extrapolates_every_step_but_the_one_to_the_clean_image():
    """A step into t = 0 after a longer one is extrapolated, (1 + 1/2r) x_0 - (1/2r) x_0,prev with r the ratio of
    the steps' lengths in log-SNR; only the last step (t_prev = -1) and a first step (no previous one) take x_0 as is."""
    d = Diffusion(1000)
    lam = [0.5 * math.log(a / (1 - a)) for a in d.alphas_cumprod_64[:3].tolist()]
    r = (lam[1] - lam[2]) / (lam[0] - lam[1])
    now, before = torch.ones(1), (2, torch.zeros(1))
    assert d.dpm2m_start(now, 1, 0, before).item() == pytest.approx(1 + 0.5 / r) and r > 0.5
    assert d.dpm2m_start(now, 0, -1, (1, torch.zeros(1))) is now
    assert d.dpm2m_start(now, 1, 0, None) is now


def test_x0_prediction_converts_back_to_the_noise_that_made_x_t():
    """to_eps of an x_0 model's exact output is the noise in x_t, at any t."""
    d = Diffusion(1000, prediction="x0")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1, torch.randn(3, 3, 8, 8, generator=g)
    t = torch.tensor([100, 500, 900])
    assert torch.allclose(d.to_eps(x0, d.q_sample(x0, t, noise), t), noise, atol=1e-4)


def test_each_batch_of_a_seeded_ancestral_sampling_draws_its_own_noise():
    """sample_batches seeds each batch's generator by its first index: two batches that start from the same
    x_T do not repeat each other's ancestral noise."""
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)).repeat(2, 1, 1, 1)  # images 0 and 2 alike
    out = Diffusion(1000).sample_batches(lambda x, t, y: torch.zeros_like(x), noise, torch.zeros(4, dtype=torch.long),
                                         2, "cpu", "ddpm", 5, seed=0)
    assert not torch.allclose(out[0], out[2])


def test_min_snr_weighting_matches_the_formula():
    """Min-SNR-gamma scales each sample's loss by min(SNR_t, gamma) / SNR_t; gamma = 0 is the plain loss."""
    x0, y = torch.randn(6, 3, 8, 8), torch.zeros(6, dtype=torch.long)
    eps_model = lambda x, t, y: torch.zeros_like(x)  # noqa: E731  loss = mean(noise^2) per sample
    plain, weighted = Diffusion(loss="mse"), Diffusion(loss="mse", min_snr_gamma=5.0)
    torch.manual_seed(0)
    base, _, noise = plain.training_loss(eps_model, x0, y)
    torch.manual_seed(0)
    t = torch.randint(0, T, (6,))  # the t that training_loss draws first from the same seed
    torch.manual_seed(0)
    loss, _, _ = weighted.training_loss(eps_model, x0, y)
    snr = [ABAR[i] / (1 - ABAR[i]) for i in t.tolist()]
    expected = sum(min(s, 5.0) / s * (noise[i] ** 2).mean().item() for i, s in enumerate(snr)) / 6
    close(base, (noise ** 2).mean())
    close(loss, torch.tensor(expected), tol=1e-5)
    assert loss < base  # low-noise samples (SNR > 5) are down-weighted


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_min_snr_weighting_of_v_and_x0_predictions(prediction):
    """For v (and x0, whose loss is taken on the v it implies) min-SNR-gamma scales each sample's loss by
    min(SNR_t, gamma) / (SNR_t + 1): the x0-scale weight min(SNR, gamma) in v units."""
    x0, y = torch.rand(8, 3, 4, 4) * 2 - 1, torch.zeros(8, dtype=torch.long)
    zero = lambda x, t, y: torch.zeros_like(x)  # noqa: E731
    loss, _, _ = Diffusion(loss="mse", prediction=prediction, min_snr_gamma=5.0).training_loss(
        zero, x0, y, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)  # the draws training_loss makes, in its order
    t, noise = torch.randint(0, T, (8,), generator=g), torch.randn(x0.shape, generator=g).double()
    assert min(t) < 700 < max(t)  # both sides of SNR = 5 (t ~ 180)
    a = torch.tensor([ABAR[i] for i in t.tolist()], dtype=torch.float64).view(-1, 1, 1, 1)
    v = a.sqrt() * noise - (1 - a).sqrt() * x0.double()
    out = 0.0 if prediction == "v" else a.sqrt() * (a.sqrt() * x0 + (1 - a).sqrt() * noise) / (1 - a).sqrt().clamp(min=0.05)
    snr = (a / (1 - a)).flatten()
    weight = snr.clamp(max=5.0) / (snr + 1)
    close(loss, (weight * ((out - v) ** 2).flatten(1).mean(1)).mean(), tol=1e-5)


def test_negative_min_snr_gamma_is_refused():
    """A negative gamma would make the loss weights negative (a zero model scores below 0): one clear error."""
    with pytest.raises(SystemExit) as e:
        build_config({"preset": "tiny", "min_snr_gamma": -1.0})
    assert str(e.value).startswith("error: min_snr_gamma must be >= 0")
    assert build_config({"preset": "tiny", "min_snr_gamma": 0.0}).min_snr_gamma == 0.0


def test_sample_spacing_reaches_the_sampler_and_below_one_is_refused():
    """--sample-spacing is what training's samples, the evaluation and sample.py's default use; < 1 is one clear error."""
    for objective in ("diffusion", "flow"):
        assert make_diffusion(build_config({"preset": "tiny", "objective": objective, "sample_spacing": 2.5})).spacing == 2.5
    # the photo preset crowds its steps near the image; on the cartoons that draws fewer faces (docs/experiments.md)
    assert make_diffusion(build_config({"preset": "panda48"})).spacing == 3
    assert make_diffusion(build_config({"preset": "cartoon48"})).spacing == 1
    with pytest.raises(SystemExit) as e:
        build_config({"preset": "tiny", "sample_spacing": 0.5})
    assert str(e.value) == "error: sample_spacing must be >= 1 (1 = evenly spaced steps), not 0.5"


def test_hybrid_loss_is_mse_at_high_noise_and_l1_below():
    """--loss hybrid: each sample's loss is its squared error where t >= hybrid_t and its absolute error below."""
    out, target = torch.zeros(4, 3, 2, 2), torch.full((4, 3, 2, 2), 0.5)
    target[1] = 2.0  # errors 0.5 and 2.0: squared 0.25 and 4.0, absolute 0.5 and 2.0
    t = torch.tensor([999, 999, 699, 700])
    close(Diffusion(loss="hybrid", hybrid_t=700).per_sample_loss(out, target, t), torch.tensor([0.25, 4.0, 0.5, 0.25]))
    close(Diffusion(loss="mse").per_sample_loss(out, target, t), torch.tensor([0.25, 4.0, 0.25, 0.25]))
    close(Diffusion(loss="l1").per_sample_loss(out, target, t), torch.tensor([0.5, 2.0, 0.5, 0.5]))
    with pytest.raises(ValueError, match="loss"):
        Diffusion(loss="huber")


def v_oracle(x0, abar=ABAR):
    """The exact v = sqrt(abar) eps - sqrt(1 - abar) x0 for x_t built from the known x0 (float64 alpha-bar)."""
    eps_of = oracle(x0, abar)

    def model(x_t, t, y):
        a = torch.tensor([abar[int(i)] for i in t], dtype=torch.float64).view(-1, 1, 1, 1)
        return (a.sqrt() * eps_of(x_t, t, y).double() - (1 - a).sqrt() * x0.double()).float()
    return model


@pytest.mark.parametrize("sampler,steps", [("ddim", 10), ("ddim", 1000), ("ddpm", 1000)])
def test_v_prediction_with_oracle_recovers_x0(sampler, steps):
    """A v-prediction model's output is turned into the noise before each step: the exact v lands on x0."""
    x0 = torch.rand(2, 3, 4, 4) * 1.8 - 0.9
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(steps))
    y = torch.zeros(2, dtype=torch.long)
    for prediction, exact in (("v", True), ("eps", False)):  # the same oracle read as noise is wrong
        first = []  # the x0 predicted at the first (noisiest) step
        out = Diffusion(T, 1e-4, 0.02, prediction=prediction).sample(
            v_oracle(x0), noise, y, sampler, steps, generator=torch.Generator().manual_seed(2),
            callback=lambda i, t, x, x_start: first.append(x_start) if i == 0 else None)
        if exact:
            torch.testing.assert_close(out, x0, atol=1e-3, rtol=0)
            torch.testing.assert_close(first[0], x0, atol=1e-3, rtol=0)
        else:
            assert (first[0] - x0).abs().max() > 0.5


def test_v_prediction_loss_regresses_v():
    """training_loss with prediction='v' targets sqrt(abar) eps - sqrt(1 - abar) x0 at the drawn t."""
    x0, y = torch.rand(4, 3, 8, 8) * 2 - 1, torch.zeros(4, dtype=torch.long)
    zero = lambda x, t, y: torch.zeros_like(x)  # noqa: E731
    torch.manual_seed(0)
    loss, out, target = Diffusion(loss="mse", prediction="v").training_loss(zero, x0, y)
    torch.manual_seed(0)
    t = torch.randint(0, T, (4,))
    noise = torch.randn(x0.shape)
    a = torch.tensor([ABAR[i] for i in t.tolist()], dtype=torch.float64).view(-1, 1, 1, 1)
    close(target, a.sqrt() * noise.double() - (1 - a).sqrt() * x0.double())
    close(loss, (target ** 2).mean())
    with pytest.raises(ValueError, match="prediction"):
        Diffusion(prediction="score")


@pytest.mark.parametrize("sampler,steps", [("ddim", 10), ("ddpm", 1000)])
def test_x0_prediction_samples_and_trains_on_the_implied_v(sampler, steps):
    """An x0 model's output is the clean image: the sampler lands on it, and the loss is taken on the v it
    implies, so the exact x0 scores 0 (below t = 11 a documented extrapolation of it does) and any other
    output is scored against v, not against x0."""
    x0 = torch.rand(2, 3, 4, 4) * 1.8 - 0.9
    y = torch.zeros(2, dtype=torch.long)
    exact = lambda x, t, y: x0[:x.shape[0]]  # noqa: E731
    d = Diffusion(T, 1e-4, 0.02, loss="mse", prediction="x0")
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(steps))
    torch.testing.assert_close(d.sample(exact, noise, y, sampler, steps, generator=torch.Generator().manual_seed(1)),
                               x0, atol=1e-4, rtol=0)
    loss, out, target = d.training_loss(exact, x0, y)
    assert loss < 1e-8
    d.max_t = 11  # draw only t < 11, where sqrt(1 - alpha-bar) < 0.05 is capped in the output's conversion:

    def extrapolated(x, t, y):  # there the loss is 0 for x_0 + (k - 1)(x_0 - sqrt(alpha-bar) x_t), k = 0.05 / sigma
        sigma, root = d.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1), d.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
        return x0 + (0.05 / sigma - 1) * (x0 - root * x)

    for seed in range(5):
        g = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
        assert d.training_loss(extrapolated, x0, y, g())[0] < 1e-8 < d.training_loss(exact, x0, y, g())[0]
    d.max_t = T
    torch.manual_seed(0)
    loss, out, target = d.training_loss(lambda x, t, y: torch.zeros_like(x), x0, y)
    torch.manual_seed(0)
    t, noise = torch.randint(0, T, (2,)), torch.randn(x0.shape)
    a = torch.tensor([ABAR[i] for i in t.tolist()], dtype=torch.float64).view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()
    close(target, a.sqrt() * noise.double() - (1 - a).sqrt() * x0.double())
    close(out, a.sqrt() * x_t / (1 - a).sqrt().clamp(min=0.05))  # v implied by x0 = 0


def test_cosine_schedule_matches_nichol_dhariwal():
    """alpha-bar(t) = f(t + 1) / f(0), f(t) = cos^2((t / T + 0.008) / 1.008 * pi / 2), betas capped at 0.999;
    it keeps more signal than the linear schedule through the middle and still ends in pure noise."""
    d = Diffusion(T, prediction="v", schedule="cosine")
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in TS[:-1]:  # the last beta is the capped one
        close(d.alphas_cumprod[t], torch.tensor(f(t + 1) / f(0)))
    assert float(d.betas.max()) == pytest.approx(0.999) and bool((d.betas > 0).all())
    assert float(d.alphas_cumprod[-1]) < 1e-6
    assert float(d.alphas_cumprod[500]) > 0.45 > 5 * ABAR[500]  # linear: 0.08 of the signal left at t = 500
    with pytest.raises(ValueError, match="schedule"):
        make_betas("quadratic", T)


def test_cosine_schedule_v_oracle_recovers_x0():
    """The samplers take their terms from the schedule: the exact v under the cosine schedule lands on x0."""
    d = Diffusion(T, prediction="v", schedule="cosine")
    x0 = torch.rand(2, 3, 4, 4) * 1.8 - 0.9
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    out = d.sample(v_oracle(x0, d.alphas_cumprod_64.tolist()), noise, torch.zeros(2, dtype=torch.long), "ddim", 10)
    torch.testing.assert_close(out, x0, atol=1e-3, rtol=0)

"""Gaussian diffusion with a linear (or cosine) beta schedule: noising, the training loss, DDPM, DDIM and DPM-Solver++(2M) sampling;
and rectified flow (`Flow`, --objective flow) with Euler and Heun sampling, behind the same interface.

Names follow Ho et al. 2020 (DDPM) and Song et al. 2021 (DDIM): x_start = x_0, x_t, eps,
alphas_cumprod = alpha-bar. Every schedule term is computed once in float64 and stored as float32.
"""
import math

import torch
from tqdm.auto import tqdm

from config import CHOICES, SAMPLERS, resolve_sampler


def make_betas(schedule, max_t, beta_start=1e-4, beta_end=0.02):
    """float64 betas. linear: beta_start..beta_end (Ho et al. 2020, the description). cosine: Nichol &
    Dhariwal 2021, alpha-bar(t) = cos^2((t / T + s) / (1 + s) * pi / 2) with s = 0.008, betas capped at
    0.999; it spends fewer steps on near-pure noise (the last 30% of the linear one has SNR < 0.01)."""
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, max_t, dtype=torch.float64)
    if schedule == "cosine":
        s = 0.008
        f = torch.cos((torch.arange(max_t + 1, dtype=torch.float64) / max_t + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"noise schedule must be one of {', '.join(CHOICES['noise_schedule'])}, got {schedule}")


class Diffusion:
    """Schedule terms, q(x_t | x_0), the training loss (noise, v or x_0 prediction) and the reverse samplers."""
    sampler = "ddim"  # the default of sample_batches; make_diffusion sets the config's
    spacing = 1.0  # the power of the sampling steps' spacing (`spaced`); make_diffusion sets the config's

    def __init__(self, max_t=1000, beta_start=1e-4, beta_end=0.02, loss="l1", device="cpu", min_snr_gamma=0.0,
                 prediction="eps", schedule="linear", hybrid_t=850):
        for name, value in (("prediction", prediction), ("loss", loss)):
            if value not in CHOICES[name]:
                raise ValueError(f"{name} must be one of {', '.join(CHOICES[name])}, got {value}")
        self.max_t, self.loss_type, self.min_snr_gamma, self.prediction = max_t, loss, min_snr_gamma, prediction
        self.hybrid_t = hybrid_t
        betas = make_betas(schedule, max_t, beta_start, beta_end)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        terms = dict(
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1.0 - alphas_cumprod).sqrt(),
            sqrt_recip_alphas_cumprod=(1.0 / alphas_cumprod).sqrt(),
            sqrt_recipm1_alphas_cumprod=(1.0 / alphas_cumprod - 1.0).sqrt(),
            # q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, posterior_variance)   (Ho et al. eq. 6-7)
            posterior_variance=betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
        )
        for name, value in terms.items():
            setattr(self, name, value.to(device=device, dtype=torch.float32))
        self.alphas_cumprod_64 = alphas_cumprod  # CPU float64: DDIM coefficients for arbitrary (t, t_prev)

    @staticmethod
    def _at(values, t, x):
        """values[t] shaped to broadcast over x: (N,) -> (N, 1, 1, 1)."""
        return values.to(x.device)[t].view(-1, *([1] * (x.dim() - 1)))

    @staticmethod
    def _per_image(values, x):
        """Per-image float64 terms (N,) as float32 shaped to broadcast over x: (N, 1, 1, 1)."""
        return values.to(device=x.device, dtype=torch.float32).view(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x_start, t, noise):
        """x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps."""
        return self._at(self.sqrt_alphas_cumprod, t, x_start) * x_start + \
            self._at(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise

    def q_posterior(self, x_start, x_t, t):
        """Mean and variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at(self.posterior_mean_coef1, t, x_t) * x_start + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self._at(self.posterior_variance, t, x_t)

    def predict_start(self, x_t, t, eps):
        """x_0 implied by a noise prediction: (x_t - sqrt(1 - alpha-bar) eps) / sqrt(alpha-bar)."""
        return self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - self._at(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def velocity(self, x_start, t, noise):
        """v = sqrt(alpha-bar) eps - sqrt(1 - alpha-bar) x_0 (Salimans & Ho 2022), the v-prediction target."""
        return self._at(self.sqrt_alphas_cumprod, t, x_start) * noise - \
            self._at(self.sqrt_one_minus_alphas_cumprod, t, x_start) * x_start

    def to_eps(self, out, x_t, t):
        """The model's output as a noise prediction: itself for eps-prediction, converted from v or x_0 otherwise."""
        if self.prediction == "eps":
            return out
        if self.prediction == "x0":  # eps = (x_t - sqrt(alpha-bar) x_0) / sqrt(1 - alpha-bar)
            return (x_t - self._at(self.sqrt_alphas_cumprod, t, x_t) * out) / \
                self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        return self._at(self.sqrt_alphas_cumprod, t, x_t) * out + self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t

    def training_loss(self, model, x_start, y, generator=None):
        """Noise x_0 at a random t and regress the target: the noise, or v (also for an x_0 model, below).
        Returns (loss, model output in the target's units, target)."""
        t = torch.randint(0, self.max_t, (x_start.shape[0],), device=x_start.device, generator=generator)
        noise = torch.randn(x_start.shape, device=x_start.device, generator=generator)
        x_t = self.q_sample(x_start, t, noise)
        out = model(x_t, t, y)
        target = noise if self.prediction == "eps" else self.velocity(x_start, t, noise)
        if self.prediction == "x0":
            # The model draws the clean image, an easier output than noise or v for a token whose patch has about as
            # many numbers as its width (Li & He 2025); the loss is on the v it implies, v = (sqrt(alpha-bar) x_t - x_0)
            # / sqrt(1 - alpha-bar). Only this conversion is capped (1 / sigma <= 20), not the target: the slight
            # over-denoising at the last steps sharpens, and capping both scored worse (docs/experiments.md).
            sigma = self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t).clamp(min=0.05)
            out = (self._at(self.sqrt_alphas_cumprod, t, x_t) * x_t - out.float()) / sigma
        per_sample = self.per_sample_loss(out.float(), target, t)
        if not self.min_snr_gamma:
            return per_sample.mean(), out, target
        # Min-SNR-gamma (Hang et al. 2023): the x_0 loss weighted by min(SNR, gamma), so the easy
        # low-noise steps stop dominating. In eps units that is min(SNR, gamma) / SNR, in v units
        # min(SNR, gamma) / (SNR + 1).
        snr = self.alphas_cumprod.to(t.device)[t] / (1 - self.alphas_cumprod.to(t.device)[t])
        weight = snr.clamp(max=self.min_snr_gamma) / (snr if self.prediction == "eps" else snr + 1)
        return (weight * per_sample).mean(), out, target

    def per_sample_loss(self, out, target, t):
        """Mean L1 or squared error of each sample. "hybrid": squared error where t >= hybrid_t, L1 below.
        Given x_t, the target is affine in x_0, so MSE regresses the mean of the images x_t could have come
        from and L1 their per-pixel median; at high noise the median leaves out minority parts (a panda's
        dark ears and eye patches on a light face), so the layout is learnt late. MSE there, L1 for detail."""
        err = (out - target).flatten(1)
        if self.loss_type == "l1":
            return err.abs().mean(1)
        if self.loss_type == "mse":
            return err.square().mean(1)
        return torch.where(t >= self.hybrid_t, err.square().mean(1), err.abs().mean(1))

    # ---- reverse process ----

    @staticmethod
    def guided_eps(model, x, t, y, cfg_scale=1.0):
        """Classifier-free guidance: eps_u + s (eps_c - eps_u). s = 1 is the plain conditional model."""
        if cfg_scale == 1.0:
            return model(x, t, y)
        null = torch.full_like(y, model.null_label)
        eps = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        eps_c, eps_u = eps.chunk(2)
        return eps_u + cfg_scale * (eps_c - eps_u)

    def ddpm_step(self, eps, x_t, t, generator=None, clip=True):
        """One ancestral step x_t -> x_{t-1} (Ho et al. alg. 2) with the predicted x_0 clipped to [-1, 1].
        Each image takes its own t; the posterior variance is 0 at t = 0, so those get the mean alone."""
        x_start = self.predict_start(x_t, t, eps)
        if clip:
            x_start = x_start.clamp(-1, 1)
        mean, var = self.q_posterior(x_start, x_t, t)
        if not bool((t > 0).any()):
            return mean, x_start
        noise = torch.randn(x_t.shape, device=x_t.device, generator=generator)
        return mean + var.sqrt() * noise, x_start

    def ddim_step(self, eps, x_t, t, t_prev, eta=0.0, generator=None, clip=True, x_start=None):
        """One DDIM step x_t -> x_{t_prev} (Song et al. eq. 12); t_prev = -1 means the clean image.

        Each image takes its own (t, t_prev). The coefficients come from the float64 table, rounded to
        float32 only at the end: 1 - alpha-bar in float32 keeps only ~3 digits near t = 0. A given x_start
        (dpm2m's extrapolation) replaces the one eps implies, unclipped.
        """
        a_t = self.alphas_cumprod_64[t.cpu()]
        a_prev = torch.where(t_prev.cpu() >= 0, self.alphas_cumprod_64[t_prev.cpu().clamp(min=0)], 1.0)
        coef = lambda values: self._per_image(values, x_t)  # noqa: E731
        given = x_start is not None
        if not given:
            x_start = self.predict_start(x_t, t, eps)
            if clip:
                x_start = x_start.clamp(-1, 1)
        if clip or given:  # keep eps consistent with the x_0 the step uses, as the DDPM step does implicitly
            eps = (x_t - coef(a_t.sqrt()) * x_start) / coef((1 - a_t).sqrt())
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()  # 0 where t_prev = -1
        x_prev = coef(a_prev.sqrt()) * x_start + coef((1 - a_prev - sigma ** 2).clamp(min=0).sqrt()) * eps
        if eta > 0 and bool((t_prev >= 0).any()):
            x_prev = x_prev + coef(sigma) * torch.randn(x_t.shape, device=x_t.device, generator=generator)
        return x_prev, x_start

    def dpm2m_start(self, x_start, t, t_prev, before):
        """The x_0 a DDIM step from t to t_prev uses under DPM-Solver++(2M) (Lu et al. 2022): this step's prediction
        extrapolated with the previous step's, before = (its t, its x_0), in lambda = log(alpha / sigma). A DDIM step
        is the first-order solver, so the first step (no before) and the last (to the clean image) stay DDIM's, and so
        does a step over twice as long as the one before (evenly spaced steps' last, into t = 0), where the
        extrapolation overshoots."""
        if before is None or t_prev < 0:
            return x_start
        lam = lambda i: 0.5 * math.log(self.alphas_cumprod_64[i] / (1 - self.alphas_cumprod_64[i]))  # noqa: E731
        r = (lam(t) - lam(before[0])) / (lam(t_prev) - lam(t))  # the previous step's length over this one's
        if r < 0.5:
            return x_start
        return (1 + 0.5 / r) * x_start - (0.5 / r) * before[1]

    def timesteps(self, steps):
        """`steps` distinct timesteps from max_t - 1 down to 0, evenly spaced or, with spacing > 1, denser near 0
        (`spaced`); steps = max_t gives every timestep whatever the spacing."""
        if not 1 <= steps <= self.max_t:
            raise ValueError(f"steps must be between 1 and max_t={self.max_t}, got {steps}")
        # the even steps in float32, so that they stay the ones every earlier figure was sampled with
        ts = torch.linspace(self.max_t - 1, 0, steps) if self.spacing == 1 else spaced(steps, self.spacing) * (self.max_t - 1)
        ts = ts.round().long().tolist()
        for i in range(steps - 2, -1, -1):  # where rounding makes two steps equal near 0, the earlier one moves up
            ts[i] = max(ts[i], ts[i + 1] + 1)
        return ts

    @torch.inference_mode()
    def sample(self, model, noise, y, sampler="ddim", steps=50, eta=0.0, cfg_scale=1.0, generator=None,
               clip=True, progress=False, callback=None):
        """Denoise `noise` (N, C, H, W) into images in [-1, 1].

        sampler='ddpm' with steps = max_t is the description's 1000-step ancestral sampler;
        with fewer steps it is the respaced ancestral sampler (DDIM with eta = 1).
        callback(i, t, x_t, x_start) sees each step; nothing else is kept.
        """
        ts = self.timesteps(steps)
        if sampler == "ddpm":
            eta = 1.0
        elif sampler not in ("ddim", "dpm2m"):
            raise ValueError(f"sampler must be ddpm, ddim or dpm2m, got {sampler}")
        x, before = noise, None
        for i, t_now in enumerate(tqdm(ts, desc=f"{sampler}-{steps}", disable=not progress, leave=False)):
            t = torch.full((x.shape[0],), t_now, device=x.device, dtype=torch.long)
            eps = self.to_eps(self.guided_eps(model, x, t, y, cfg_scale).float(), x, t)
            if sampler == "ddpm" and steps == self.max_t:
                x, x_start = self.ddpm_step(eps, x, t, generator, clip)
            else:
                t_next = ts[i + 1] if i + 1 < len(ts) else -1
                x_start = None
                if sampler == "dpm2m":
                    x_start = self.predict_start(x, t, eps)
                    x_start = x_start.clamp(-1, 1) if clip else x_start
                    x_start, before = self.dpm2m_start(x_start, t_now, t_next, before), (t_now, x_start)
                x, x_start = self.ddim_step(eps, x, t, torch.full_like(t, t_next), eta, generator, clip, x_start)
            if callback is not None:
                callback(i, t_now, x, x_start)
        return x.clamp(-1, 1)

    def sample_batches(self, model, noise, y, batch_size, device, sampler=None, steps=50, seed=None,
                       callback=None, start=0, **kwargs):
        """`sample` over CPU noise (N, C, H, W) and labels (N,), batch_size images at a time on `device`;
        returns the N images on the CPU as float32. With a seed, each batch's stochastic steps (eta > 0)
        draw from their own generator, seeded by (seed, the batch's first index counted from `start`, where
        these images begin in a larger set shared across ranks); sampler None: the objective's own (self.sampler);
        callback sees the first batch only. Other keyword arguments go to `sample`."""
        sampler = sampler or self.sampler
        out = []
        for lo in range(0, noise.shape[0], batch_size):
            generator = None if seed is None else torch.Generator(device).manual_seed(seed * 7919 + start + lo)
            out.append(self.sample(model, noise[lo:lo + batch_size].to(device), y[lo:lo + batch_size].to(device),
                                   sampler, steps, generator=generator, callback=callback if lo == 0 else None,
                                   **kwargs).float().cpu())
        return torch.cat(out)


class Flow:
    """Rectified flow (Liu et al. 2023; Esser et al. 2024): x_t = (1 - t) x_0 + t eps on a straight line, t in [0, 1],
    the model regressing its velocity dx_t/dt = eps - x_0; sampling integrates that ODE from t = 1 (pure noise) to 0.

    The model sees t * max_t, the range of the diffusion steps its sinusoidal embedding was made for. Same interface
    as Diffusion: training_loss, sample, sample_batches. Heun is the default sampler (config.SAMPLERS): on a trained
    model its samples score better than Euler's at any step count, even at fewer model calls (docs/experiments.md)."""
    sampler = "heun"
    spacing = 1.0

    x0_min_t = 0.05  # an x_0 output becomes the velocity (x_t - x_0) / t: below this t the division would blow up its error

    def __init__(self, max_t=1000, loss="l1", device="cpu", prediction="v", hybrid_t=850):
        if loss not in CHOICES["loss"] or prediction not in ("v", "x0"):
            raise ValueError(f"flow needs loss in {', '.join(CHOICES['loss'])} and prediction v or x0, got {loss}, {prediction}")
        self.max_t, self.loss_type, self.prediction, self.hybrid_t = max_t, loss, prediction, hybrid_t

    @staticmethod
    def sample_t(n, device, generator=None):
        """Logit-normal t = sigmoid(n), n ~ N(0, 1) (Esser et al. 2024): most training near t = 1/2, where the velocity is
        hardest to guess; none at exactly 0 or 1."""
        return torch.sigmoid(torch.randn(n, device=device, generator=generator))

    @staticmethod
    def _view(t, x):
        return t.view(-1, *([1] * (x.dim() - 1)))  # (N,) -> (N, 1, 1, 1)

    def to_velocity(self, out, x_t, t):
        """The model's output as a velocity: itself, or converted from an x_0 prediction."""
        if self.prediction == "v":
            return out
        return (x_t - out) / self._view(t, x_t).clamp(min=self.x0_min_t)

    def training_loss(self, model, x_start, y, generator=None):
        """Noise x_0 at a logit-normal t and regress the velocity eps - x_0. Returns (loss, velocity prediction, target)."""
        t = self.sample_t(x_start.shape[0], x_start.device, generator)
        noise = torch.randn(x_start.shape, device=x_start.device, generator=generator)
        x_t = (1 - self._view(t, x_start)) * x_start + self._view(t, x_start) * noise
        out = self.to_velocity(model(x_t, t * self.max_t, y).float(), x_t, t)
        target = noise - x_start
        return self.per_sample_loss(out, target, t * self.max_t).mean(), out, target

    per_sample_loss = Diffusion.per_sample_loss  # the same l1 / mse / hybrid on the model's timestep scale t * max_t
    sample_batches = Diffusion.sample_batches

    def velocity(self, model, x, t, y, cfg_scale=1.0, clip=True):
        """The (guided) velocity at one t in (0, 1] for the whole batch. clip: the x_0 it implies, x - t v, is clipped to
        [-1, 1] and the velocity made consistent with it, as the DDIM step does with eps."""
        t_vec = torch.full((x.shape[0],), t, device=x.device)
        v = self.to_velocity(Diffusion.guided_eps(model, x, t_vec * self.max_t, y, cfg_scale).float(), x, t_vec)
        return (x - (x - t * v).clamp(-1, 1)) / t if clip else v

    def timesteps(self, steps):
        """steps + 1 times from 1 down to 0, evenly spaced or, with spacing > 1, denser near 0 (`spaced`)."""
        if not 1 <= steps <= self.max_t:
            raise ValueError(f"steps must be between 1 and max_t={self.max_t}, got {steps}")
        return spaced(steps + 1, self.spacing).tolist()

    @torch.inference_mode()
    def sample(self, model, noise, y, sampler="euler", steps=50, eta=0.0, cfg_scale=1.0, generator=None,
               clip=True, progress=False, callback=None):
        """Integrate the velocity from t = 1 (noise (N, C, H, W)) to t = 0: images in [-1, 1].

        euler: one model call per step. heun: Euler, then the average of the two velocities (Karras et al. 2022,
        alg. 1), except on the last step to t = 0, where a second call is not made: 2 * steps - 1 calls.
        Deterministic: eta and generator are taken for the interface and must be 0 / unused.
        callback(i, t, x_t, x_start) sees each step; x_start is the x_0 predicted at the step's start."""
        if sampler not in SAMPLERS["flow"] or eta:
            raise ValueError(f"flow samples with euler or heun and eta 0, got {sampler}, eta {eta}")
        ts, x = self.timesteps(steps), noise
        for i in tqdm(range(steps), desc=f"{sampler}-{steps}", disable=not progress, leave=False):
            t, t_next = ts[i], ts[i + 1]
            v = self.velocity(model, x, t, y, cfg_scale, clip)
            x_start, x_next = x - t * v, x + (t_next - t) * v
            if sampler == "heun" and t_next > 0:
                x_next = x + (t_next - t) * (v + self.velocity(model, x_next, t_next, y, cfg_scale, clip)) / 2
            x = x_next
            if callback is not None:
                callback(i, t, x, x_start)
        return x.clamp(-1, 1)


def spaced(n, power):
    """n points from 1 down to 0 (float64): u ** power for u evenly spaced. power 1 is even; above 1 the steps crowd near 0,
    where the sampler adds the finest detail (as Karras et al. 2022's rho crowds them at low noise; docs/experiments.md)."""
    return torch.linspace(1, 0, n, dtype=torch.float64) ** power


def make_diffusion(cfg, device="cpu"):
    """Diffusion or Flow by cfg.objective, with .sampler: the one the in-training samples and the evaluation use."""
    if cfg.objective == "flow":
        process = Flow(cfg.max_t, cfg.loss, device, cfg.prediction, cfg.hybrid_t)
    else:
        process = Diffusion(cfg.max_t, cfg.beta_start, cfg.beta_end, cfg.loss, device, cfg.min_snr_gamma, cfg.prediction,
                            cfg.noise_schedule, cfg.hybrid_t)
    process.sampler, process.spacing = resolve_sampler(cfg), cfg.sample_spacing
    return process

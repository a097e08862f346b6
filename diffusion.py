"""Diffusion for PixArt-Σ: the noise schedule, the training loss and two samplers.

PixArt-Σ (Chen et al. 2024, arXiv 2403.04692) keeps the diffusion of DiT / PixArt-α unchanged:
a 1000-step DDPM with a linear β schedule (Ho et al. 2020, arXiv 2006.11239), ε-prediction, and
IDDPM's learned-range variance (Nichol & Dhariwal 2021, arXiv 2102.09672). The network returns 2C
channels, ε̂ and v ∈ [−1, 1]; v interpolates the reverse-step variance in log space between the two
DDPM choices, log Σ = frac·log β_t + (1 − frac)·log β̃_t with frac = (v + 1)/2 (IDDPM eq. 15).

- Training: L = ‖ε − ε̂‖² + L_vb, IDDPM's hybrid loss (eq. 16). With T = 1000 and λ = 0.001 the
  VB part is one per-timestep KL in bits. Its mean is detached so that only v learns from it.
- `dpm_solver`: DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Alg. 2), step for step what
  diffusers' DPMSolverMultistepScheduler does with its defaults (the sampler in diffusers'
  PixArtSigmaPipeline): M steps at t_i = round(linspace(0, 999, M + 1))[::-1][:-1], first order on
  the first step, second order after that, and a last first-order step to σ = 0 (the x̂_0 prediction).
- `ancestral`: IDDPM's sampler respaced to any number of steps. This is the native sampler of the
  learned variance (the official repo's `IDDPM(100)`) and it shows what the variance head is for.
- `sample`: the one sampling recipe of sample.py, train.py's preview and the quick start: classifier-free
  guidance (`guided`), x̂_0 clipping for pixel models (`clip_denoised`), then one of the two samplers.

Notation (VP): x_t = α_t x_0 + σ_t ε with α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t); λ_t = log(α_t/σ_t) is
half the log-SNR; h = λ_t − λ_s is a step in λ. Tensors are latents (N, C, H, W); t is (N,) long.
The schedules are float64 and the sampler state float32, even when the network runs in bf16.

    x0 = sample(model, torch.randn(1, 4, 128, 128), y, mask, y_null, mask_null)   # CFG 4.5, DPM-Solver++ 20 steps
"""
import math

import numpy as np
import torch
from tqdm import tqdm

NUM_TIMESTEPS = 1000
# The schedule, computed once, float64 (T,): β_t linear from 1e-4 to 0.02 (DDPM §4), ᾱ_t = Π_{s≤t} (1 − β_s), and the
# coefficients of x_t = α_t x_0 + σ_t ε
BETAS = torch.linspace(1e-4, 0.02, NUM_TIMESTEPS, dtype=torch.float64)
ALPHAS_CUMPROD = torch.cumprod(1 - BETAS, dim=0)
ALPHAS, SIGMAS = ALPHAS_CUMPROD.sqrt(), (1 - ALPHAS_CUMPROD).sqrt()


def _at(a, t, x):
    """a[t] of a float64 schedule (T,) as float32 (N, 1, 1, 1) on x's device, to broadcast against x.
    The table goes to the device (no float64 there; no host sync) and is gathered there."""
    return a.float().to(x.device, non_blocking=True)[t.to(x.device).long()].view(-1, *[1] * (x.ndim - 1))


def q_sample(x0, t, noise):
    """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε: a draw from q(x_t | x_0) (DDPM eq. 4)."""
    return _at(ALPHAS, t, x0) * x0 + _at(SIGMAS, t, x0) * noise


def predict_x0(x, eps, alpha, sigma):
    """x̂_0 = (x_t − σ_t ε̂)/α_t: eq. 4 solved for x_0 with the predicted noise; DPM-Solver++'s data prediction."""
    return (x - sigma * eps) / alpha


def _posterior(ac):
    """Coefficients of q(x_{t−1} | x_t, x_0) = N(c0·x_0 + ct·x_t, β̃_t) (DDPM eqs. 6–7) for a chain with
    cumulative products ac (the full 1000 steps, or a respaced subset: then β_t = 1 − ᾱ_t/ᾱ_{t−1})."""
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])  # ᾱ_{t−1}, with ᾱ_{−1} = 1
    beta = 1 - ac / ac_prev
    var = beta * (1 - ac_prev) / (1 - ac)  # β̃_t; β̃_0 = 0
    log_var = torch.log(torch.cat([var[1:2], var[1:]]))  # log β̃_t with t = 0 clipped to t = 1, as IDDPM
    c0 = beta * ac_prev.sqrt() / (1 - ac)
    ct = (1 - ac_prev) * (1 - beta).sqrt() / (1 - ac)
    return beta, log_var, c0, ct


def _p_mean_log_var(out, x, i, ac):
    """The model's reverse step p(x_{t−1} | x_t) = N(mean, exp(log_var)) at position i of the chain ac.
    out: (N, 2C or C, H, W) float32 network output; x: (N, C, H, W) = x_t."""
    beta, post_log_var, c0, ct = _posterior(ac)
    C = x.shape[1]
    x0 = predict_x0(x, out[:, :C], _at(ac.sqrt(), i, x), _at((1 - ac).sqrt(), i, x))
    mean = _at(c0, i, x) * x0 + _at(ct, i, x) * x  # posterior mean at x̂_0 (DDPM eq. 7)
    if out.shape[1] == 2 * C:  # learned range (IDDPM eq. 15)
        frac = (out[:, C:] + 1) / 2
        log_var = frac * _at(beta.log(), i, x) + (1 - frac) * _at(post_log_var, i, x)
    else:  # an ε-only model has no variance head: fall back to the posterior variance β̃_t (DDPM §3.2)
        log_var = _at(post_log_var, i, x).expand_as(x)
    return mean, log_var


def _decoder_nll(x0, mean, log_var):
    """−log₂ p(x_0 | x_1) per element: the Gaussian's mass on x_0's bin, for data in [−1, 1] cut into 256
    bins of width 2/255 whose edge bins reach ±∞ (DDPM eq. 13). Exact Φ (IDDPM uses a tanh fit)."""
    std = torch.exp(0.5 * log_var)
    upper = torch.where(x0 > 0.999, 1.0, torch.special.ndtr((x0 + 1 / 255 - mean) / std))
    lower = torch.where(x0 < -0.999, 0.0, torch.special.ndtr((x0 - 1 / 255 - mean) / std))
    return -torch.log((upper - lower).clamp(min=1e-12)) / math.log(2)


def training_losses(model, x0, t, y, mask, noise=None):
    """IDDPM's hybrid loss per sample: dict(loss, mse, vb), each (N,) float32.
    x0: (N, C, H, W) clean latents; t: (N,) long in [0, 1000); y, mask: the caption, passed through."""
    noise = torch.randn_like(x0) if noise is None else noise
    x_t = q_sample(x0, t, noise)
    out = model(x_t, t, y, mask).float()  # (N, 2C, H, W): ε̂, v
    C = x0.shape[1]
    if out.shape[1] != 2 * C:
        raise ValueError(f"the model must return 2*C = {2 * C} channels (ε and v), got {out.shape[1]}")
    mse = ((noise - out[:, :C]) ** 2).flatten(1).mean(1)  # L_simple (DDPM eq. 14)

    # L_vb = KL(q(x_{t−1} | x_t, x_0) ‖ p(x_{t−1} | x_t)) in bits, with ε̂ detached so that this term
    # trains only the variance; L_simple alone trains the mean (IDDPM §3.1)
    mean, log_var = _p_mean_log_var(torch.cat([out[:, :C].detach(), out[:, C:]], 1), x_t, t, ALPHAS_CUMPROD)
    _, post_log_var, c0, ct = _posterior(ALPHAS_CUMPROD)
    q_mean, q_log_var = _at(c0, t, x0) * x0 + _at(ct, t, x0) * x_t, _at(post_log_var, t, x0)
    # KL of two Gaussians per element: ½ (log Σ_p − log Σ_q + Σ_q/Σ_p + (μ_q − μ_p)²/Σ_p − 1)
    kl = 0.5 * (log_var - q_log_var + torch.exp(q_log_var - log_var) + (q_mean - mean) ** 2 * torch.exp(-log_var) - 1)
    kl = kl.flatten(1).mean(1) / math.log(2)  # (N,) bits per dimension
    nll = _decoder_nll(x0, mean, log_var).flatten(1).mean(1)  # t = 0 has no posterior: L_0 instead
    vb = torch.where(t.to(kl.device) == 0, nll, kl)
    return dict(loss=mse + vb, mse=mse, vb=vb)


def drop_padding(y, mask):
    """y (N, L, D), mask (N, L) cut after the last column any row attends to: exact (masked tokens get zero weight), and
    the DiT's caption work then covers the longest prompt, not 300 tokens. A host sync: once per call, not per step."""
    used = mask.bool().any(0).nonzero()  # (K, 1): the columns some row attends to
    L = int(used.max()) + 1 if len(used) else mask.shape[1]
    return y[:, :L], mask[:, :L]


def guided(model, y, mask, y_null, mask_null, scale):
    """Classifier-free guidance (Ho & Salimans 2022) as diffusers' PixArtSigmaPipeline does it: one forward
    of 2N samples (null caption first, then the caption), out = uncond + scale·(cond − uncond) on the whole
    output (ε and v). scale ≤ 1 runs the caption alone (diffusers guides only when scale > 1).
    y: (N, L, D), mask: (N, L); y_null: (L, D) or (1, L, D), mask_null: (L,) or (1, L), broadcast to N.
    Returns model_fn(x, t) -> (N, 2C, H, W) float32. x is cast to y's dtype (the network's)."""
    N = y.shape[0]
    if y_null.shape[-2:] != y.shape[1:] or mask_null.shape[-1] != mask.shape[1]:
        raise ValueError(f"null caption {tuple(y_null.shape)}, mask {tuple(mask_null.shape)} does not match the "
                         f"caption {tuple(y.shape)}, mask {tuple(mask.shape)}: pad both to the same length L")
    if scale > 1:  # the captions of every step, built once: the null caption's N rows first
        y = torch.cat([y_null.reshape(-1, *y.shape[1:]).to(y).expand_as(y), y])  # (2N, L, D)
        mask = torch.cat([mask_null.reshape(-1, mask.shape[1]).to(mask).expand_as(mask), mask])  # (2N, L)
    y, mask = drop_padding(y, mask)

    def model_fn(x, t):
        if scale <= 1:
            return model(x.to(y.dtype), t, y, mask).float()
        x2, t2 = torch.cat([x, x]).to(y.dtype), torch.cat([t, t])  # (2N, C, H, W), (2N,)
        uncond, cond = model(x2, t2, y, mask).float().split(N)  # (N, 2C, H, W) each
        return uncond + scale * (cond - uncond)

    return model_fn


def clip_denoised(model_fn, bound=1.0):
    """model_fn whose ε̂ is replaced by the ε of x̂0 = (x − σ ε̂)/α clipped to [−bound, bound]: IDDPM's and ADM's
    `clip_denoised`, for models of pixels (whose range is known; latents have none). At t = 999, 1/α = 158
    turns any ε̂ error into a huge x̂0; clipping keeps every step's data prediction inside the image range."""
    def fn(x, t):
        out = model_fn(x, t)
        C, alpha, sigma = x.shape[1], _at(ALPHAS, t, x), _at(SIGMAS, t, x)
        x0 = predict_x0(x, out[:, :C], alpha, sigma).clamp(-bound, bound)
        return torch.cat([(x - alpha * x0) / sigma, out[:, C:]], 1)  # the ε that gives the clipped x̂0
    return fn


def _check_steps(steps):
    if not 1 <= steps <= NUM_TIMESTEPS:
        raise ValueError(f"steps must be in 1..{NUM_TIMESTEPS}, got {steps}")


def dpm_timesteps(steps):
    """t_0 > t_1 > ... > t_{M−1}: diffusers' 'linspace' spacing, round(linspace(0, 999, M + 1)) reversed,
    without its final 0 (the last step goes to σ = 0 instead). 20 → [999, 949, ..., 100, 50]. (M,) long."""
    _check_steps(steps)
    return torch.from_numpy(np.linspace(0, NUM_TIMESTEPS - 1, steps + 1).round()[::-1][:-1].copy()).long()


@torch.no_grad()
def dpm_solver(model_fn, x, steps=20, progress=True):
    """DPM-Solver++(2M) from x = x_{t_0} (pure noise, (N, C, H, W)) to x̂_0, float32.
    model_fn(x, t) -> (N, 2C or C, H, W); its first C channels are ε̂."""
    ts = dpm_timesteps(steps)
    # α, σ, λ at t_0..t_{M−1}, then the end point σ = 0 (α = 1, λ = +∞), all float64 scalars
    alpha, sigma = ALPHAS[ts].tolist() + [1.0], SIGMAS[ts].tolist() + [0.0]
    lam = [math.log(a / s) for a, s in zip(alpha[:-1], sigma[:-1])] + [math.inf]
    x, C = x.float(), x.shape[1]
    ts, x0_prev = ts.to(x.device), None  # on the device before the loop: a step copies nothing from the host
    for i in tqdm(range(steps), desc="dpm-solver++", disable=not progress):
        eps = model_fn(x, ts[i].expand(x.shape[0]))[:, :C].float()
        x0 = predict_x0(x, eps, alpha[i], sigma[i])  # data prediction x_θ(x_t, t), the quantity DPM-Solver++ integrates
        if i == steps - 1:
            # last step, to σ = 0: the first-order update below has σ_{t_M} = 0 and e^{−h} = 0, so it lands on
            # x_θ = E[x_0 | x_{t_{M−1}}] (t = 50 for 20 steps), slightly smoother than the ODE's own end point
            x = x0
            continue  # not break: tqdm counts a step when the loop asks for the next one, so the bar reaches M/M
        h = lam[i + 1] - lam[i]
        if x0_prev is None:  # first step: no history yet, first order (DPM-Solver++1 = DDIM)
            D = x0
        else:  # multistep second order: a linear extrapolation of x_θ in λ, with r = h_{i−1}/h_i (§4.2, Alg. 2)
            r = (lam[i] - lam[i - 1]) / h
            D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        # exact solution of the data-prediction ODE with x_θ ≈ D constant over the step (Lu et al. §4.1):
        # x_{t_{i+1}} = (σ_{t_{i+1}}/σ_{t_i}) x_{t_i} − α_{t_{i+1}} (e^{−h} − 1) D
        x = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * math.expm1(-h) * D
        x0_prev = x0
    return x


@torch.no_grad()
def ancestral(model_fn, x, steps=100, generator=None, progress=True):
    """IDDPM ancestral sampling with the learned variance, respaced to `steps` of the 1000 timesteps.
    x: (N, C, H, W) noise; model_fn(x, t) -> (N, 2C, H, W) (or (N, C, H, W): then Σ = β̃_t).
    Noise is drawn on the CPU and moved to x's device, with `generator` (a CPU torch.Generator, or None) or with one
    generator per image (a list of N): then each image's noise is drawn alone and does not depend on the batch."""
    _check_steps(steps)
    if isinstance(generator, list) and len(generator) != len(x):
        raise ValueError(f"one generator per image: {len(generator)} generators for {len(x)} images")
    # respacing (IDDPM §4): keep timesteps evenly spaced over 0..999 (rounded), then rebuild a shorter chain
    # with the same ᾱ at the kept steps, i.e. β'_i = 1 − ᾱ_{t_i}/ᾱ_{t_{i−1}}; the network still sees t_i
    stride, kept, s = (NUM_TIMESTEPS - 1) / max(steps - 1, 1), [], 0.0
    for _ in range(steps):
        kept.append(round(s))
        s += stride
    ac = ALPHAS_CUMPROD[kept]  # (steps,) ᾱ of the respaced chain
    x = x.float()
    for i in tqdm(reversed(range(steps)), total=steps, desc="ancestral", disable=not progress):
        t = torch.full((x.shape[0],), kept[i], dtype=torch.long, device=x.device)
        mean, log_var = _p_mean_log_var(model_fn(x, t).float(), x, torch.full_like(t, i), ac)
        if i > 0:  # x_{t−1} = μ + Σ^½ z; the last step (t = 0) returns the mean
            if isinstance(generator, list):  # image n's noise from generator[n] alone: (1, C, H, W) each
                z = torch.cat([torch.randn((1, *x.shape[1:]), generator=g, device="cpu") for g in generator])
            else:
                z = torch.randn(x.shape, generator=generator, device="cpu")
            x = mean + torch.exp(0.5 * log_var) * z.to(x.device, non_blocking=True)  # no stream sync per step
        else:
            x = mean
    return x


@torch.no_grad()
def sample(model, noise, y, mask, y_null, mask_null, sampler="dpm", steps=20, cfg=4.5, clip_x0=None, generator=None,
           progress=True):
    """The sampling recipe of every caller: model(x, t, y, mask) guided at scale `cfg`, x̂_0 clipped to ±clip_x0 if
    given (pixel models, whose range is known), then from `noise` (N, C, H, W) 'dpm' (DPM-Solver++(2M)) or 'ancestral'
    (IDDPM; its noise from `generator`: a CPU generator, or a list of one per image) -> x̂_0 (N, C, H, W) float32."""
    model_fn = guided(model, y, mask, y_null, mask_null, cfg)
    if clip_x0:
        model_fn = clip_denoised(model_fn, clip_x0)
    if sampler == "dpm":
        return dpm_solver(model_fn, noise, steps, progress)
    if sampler == "ancestral":
        return ancestral(model_fn, noise, steps, generator, progress)
    raise ValueError(f"sampler must be 'dpm' or 'ancestral', got {sampler!r}")

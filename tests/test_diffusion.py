"""diffusion.py against diffusers' schedulers and against closed forms.

References: diffusers' DPMSolverMultistepScheduler (defaults) and DDPMScheduler (learned_range / fixed_small)
run on the same model callables; a Gaussian data distribution whose exact ε-predictor and exact reverse
variance are known; torch.distributions for the KL and the discretized decoder likelihood.
"""
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from torch.distributions import Normal, kl_divergence

import diffusion

# diffusers' schedulers trip a numpy-2 DeprecationWarning on every set_timesteps; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every op here is tiny: intra-op threads only add overhead, and stall badly on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The schedule written out independently of diffusion.py (DDPM §4): linear β, ᾱ = cumprod(1 − β), float64.
BETA = torch.from_numpy(np.linspace(1e-4, 0.02, 1000))
AC = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))


def gaussian_eps(mu, s):
    """Exact ε-predictor for data x0 ~ N(mu, s²) per element: x_t = a x0 + b ε is jointly Gaussian with ε,
    so E[ε | x_t] = Cov(ε, x_t)/Var(x_t) (x_t − a mu) = b (x_t − a mu) / (a² s² + b²)."""
    def eps(x, t):
        a2 = AC[t].view(-1, 1, 1, 1)
        a, b = a2.sqrt(), (1 - a2).sqrt()
        return (b * (x - a * mu) / (a2 * s * s + b * b)).float()
    return eps


def wobbly_model(x, t):
    """A nonlinear model callable with sane magnitudes: the exact ε of N(0.3, 0.6²) plus a nonlinear term,
    and a v half in [−1, 1] (which DPM-Solver must ignore)."""
    b = (1 - AC[t].view(-1, 1, 1, 1)).sqrt().float()
    eps = gaussian_eps(0.3, 0.6)(x, t) + 0.3 * b * torch.tanh(2 * x) * torch.sin(x + 5 * (1 - b))
    return torch.cat([eps, 0.9 * torch.tanh(x)], 1)


def test_schedule():
    # float64 both sides, the same formula: a few eps (2.2e-16) of each β; atol 0, or allclose's 1e-8 would dominate
    assert torch.allclose(diffusion.BETAS, BETA, rtol=1e-12, atol=0) and diffusion.BETAS.dtype == torch.float64
    assert torch.allclose(diffusion.ALPHAS_CUMPROD, AC, rtol=1e-12, atol=0)
    x0, noise, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0, 500, 999])
    a2 = AC[t].view(-1, 1, 1, 1)  # float64: 1 - ᾱ in float32 would lose 3 digits at t = 0 (ᾱ = 0.9999)
    want = a2.sqrt() * x0.double() + (1 - a2).sqrt() * noise.double()
    assert (diffusion.q_sample(x0, t, noise) - want).abs().max() <= 1e-6 * want.abs().max()  # float32: ~8 eps of it


def test_dpm_timesteps_match_diffusers():
    assert diffusion.dpm_timesteps(20).tolist() == [999, 949, 899, 849, 799, 749, 699, 649, 599, 549,
                                                     500, 450, 400, 350, 300, 250, 200, 150, 100, 50]
    for steps in range(1, 101):
        ref = DPMSolverMultistepScheduler()
        ref.set_timesteps(steps)
        assert diffusion.dpm_timesteps(steps).tolist() == ref.timesteps.tolist(), steps
    with pytest.raises(ValueError, match="steps"):
        diffusion.dpm_timesteps(0)


@pytest.mark.parametrize("steps", [5, 14, 15, 20, 25])
def test_dpm_solver_matches_diffusers(steps):
    x = torch.randn(2, 4, 8, 6)
    ref = DPMSolverMultistepScheduler()  # defaults: dpmsolver++, order 2, midpoint, lower_order_final, σ_last 0
    ref.set_timesteps(steps)
    xr = x.clone()
    for t in ref.timesteps:
        xr = ref.step(wobbly_model(xr, t.expand(2))[:, :4], t, xr).prev_sample
    calls = []
    out = diffusion.dpm_solver(lambda x, t: calls.append(t.clone()) or wobbly_model(x, t), x, steps, progress=False)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert [c.tolist() for c in calls] == [[t, t] for t in ref.timesteps.tolist()]  # (N,) discrete timesteps
    assert (out - xr).abs().max() <= 1e-5 * xr.abs().max()  # float32 steps in another order: ~100 eps of the sample's scale


def respaced(steps):
    """IDDPM's respacing written out: `steps` timesteps evenly spaced over 0..999, rounded (no .5 ties here)."""
    return [round(i * 999 / (steps - 1)) for i in range(steps)]


@pytest.mark.parametrize("variance", ["learned_range", "fixed_small"])
@pytest.mark.parametrize("steps", [10, 100])
def test_ancestral_matches_diffusers_ddpm(steps, variance):
    # fixed_small: the model returns only ε, so the sampler falls back to β̃ (diffusers' "fixed_small")
    model = wobbly_model if variance == "learned_range" else (lambda x, t: wobbly_model(x, t)[:, :4])
    x = torch.randn(2, 4, 6, 6)
    ref = DDPMScheduler(variance_type=variance, clip_sample=False)
    ref.set_timesteps(timesteps=respaced(steps)[::-1])
    g, xr = torch.Generator().manual_seed(1), x.clone()
    for t in ref.timesteps:
        xr = ref.step(model(xr, t.expand(2)), t, xr, generator=g).prev_sample
    out = diffusion.ancestral(model, x, steps, generator=torch.Generator().manual_seed(1), progress=False)
    assert (out - xr).abs().max() <= 1e-4 * xr.abs().max()  # of the sample's scale: diffusers keeps ᾱ in float32


@pytest.mark.parametrize("sampler", [diffusion.dpm_solver, diffusion.ancestral])
def test_progress_bar_reaches_the_last_step(sampler, capsys):
    calls = []
    sampler(lambda x, t: calls.append(t) or torch.zeros(1, 2, 2, 2), torch.zeros(1, 1, 2, 2), 5)
    assert len(calls) == 5 and "| 5/5 [" in capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]


def test_dpm_solver_closed_form():
    mu, s = 0.5, 1.5
    out = diffusion.dpm_solver(gaussian_eps(mu, s), torch.randn(20000, 1, 1, 1), steps=20, progress=False)
    assert abs(out.mean().item() - mu) < 0.04 * s
    assert abs(out.std().item() / s - 1) < 0.03


def exact_reverse_model(mu, s, steps):
    """ε̂ exact, and v such that Σ equals the exact Var(x_{t'} | x_t) of the Gaussian data (t' = previous
    respaced step). With both exact, ancestral sampling is exact for any number of steps."""
    kept = respaced(steps)
    eps_fn = gaussian_eps(mu, s)

    def model(x, t):
        t0 = int(t[0])
        eps = eps_fn(x, t)
        if t0 == 0:
            return torch.cat([eps, torch.zeros_like(eps)], 1)  # last step adds no noise
        at, ap = AC[t0], AC[kept[kept.index(t0) - 1]]
        var_p, var_t = ap * s * s + 1 - ap, at * s * s + 1 - at  # Var(x_{t'}), Var(x_t)
        sigma2 = var_p - (at / ap) * var_p ** 2 / var_t  # Var(x_{t'} | x_t), Cov = √(ᾱ_t/ᾱ_{t'}) Var(x_{t'})
        beta = 1 - at / ap  # respaced β and β̃ (the two ends of IDDPM's range)
        beta_tilde = beta * (1 - ap) / (1 - at)
        v = 2 * (sigma2.log() - beta_tilde.log()) / (beta.log() - beta_tilde.log()) - 1
        return torch.cat([eps, torch.full_like(eps, v.item())], 1)
    return model


@pytest.mark.parametrize("steps", [20, 100])
def test_ancestral_closed_form(steps):
    mu, s = 0.5, 1.5
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 1, 1, 1, generator=g)
    out = diffusion.ancestral(exact_reverse_model(mu, s, steps), x, steps, generator=g, progress=False)
    assert abs(out.mean().item() - mu) < 0.04 * s
    assert abs(out.std().item() / s - 1) < 0.03
    if steps == 20:  # the variance head matters: β̃ alone (ε-only model) is 15% too narrow at 20 steps
        eps_only = diffusion.ancestral(gaussian_eps(mu, s), x, steps, generator=g, progress=False)
        assert eps_only.std().item() / s < 0.9


def test_guided_batches_and_guides():
    N, L, D = 3, 5, 7
    y, y_null = torch.randn(N, L, D), torch.randn(L, D)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    mask_null = torch.tensor([1, 1, 0, 0, 0])
    calls = []

    def model(x, t, y, mask):  # nonlinear in every input, so a mix-up of the halves shows
        calls.append(x.shape[0])
        w = (y * mask[..., None]).sum(1).mean(1)  # (N,)
        return torch.cat([torch.sin(x * w.view(-1, 1, 1, 1)), torch.cos(x + t.view(-1, 1, 1, 1))], 1)

    x, t = torch.randn(N, 4, 2, 2), torch.tensor([10, 10, 10])
    for scale in (4.5, 2.0):
        calls.clear()
        out = diffusion.guided(model, y, mask, y_null[None], mask_null[None], scale)(x, t)
        assert calls == [2 * N]  # one forward for uncond + cond
        uncond = model(x, t, y_null.expand(N, L, D), mask_null.expand(N, L))
        cond = model(x, t, y, mask)
        want = uncond + scale * (cond - uncond)  # float32: rounding of about scale·eps of the magnitudes mixed
        assert (out - want).abs().max() <= 1e-6 * scale * max(cond.abs().max(), uncond.abs().max())
        # (L, D) null caption broadcasts the same way
        assert (diffusion.guided(model, y, mask, y_null, mask_null, scale)(x, t) - out).abs().max() <= \
            1e-6 * scale * max(cond.abs().max(), uncond.abs().max())
    calls.clear()
    out = diffusion.guided(model, y, mask, y_null, mask_null, 1.0)(x, t)
    assert calls == [N] and torch.allclose(out, model(x, t, y, mask), rtol=1e-6, atol=0)  # scale 1: the model alone
    with pytest.raises(ValueError, match="null caption"):
        diffusion.guided(model, y, mask, torch.randn(L + 1, D), torch.ones(L + 1), 4.5)


def test_sample_is_guidance_then_clipping_then_the_sampler():
    """diffusion.sample, the recipe sample.py, train.py's preview and the quick start share, is exactly its parts."""
    y, mask, y_null, mask_null = torch.randn(2, 3, 4), torch.ones(2, 3), torch.zeros(3, 4), torch.ones(3)
    model = lambda x, t, y, mask: wobbly_model(x, t) * (1 + y.mean((1, 2)).view(-1, 1, 1, 1))
    noise = torch.randn(2, 4, 3, 3)
    fn = diffusion.clip_denoised(diffusion.guided(model, y, mask, y_null, mask_null, 4.5), 0.5)
    got = diffusion.sample(model, noise, y, mask, y_null, mask_null, "dpm", 7, 4.5, clip_x0=0.5, progress=False)
    assert torch.equal(got, diffusion.dpm_solver(fn, noise, 7, progress=False)) and got.abs().max() <= 0.5 + 1e-6
    gens = [torch.Generator().manual_seed(k) for k in range(2)]
    got = diffusion.sample(model, noise, y, mask, y_null, mask_null, "ancestral", 9, 2.0, generator=gens, progress=False)
    gens = [torch.Generator().manual_seed(k) for k in range(2)]
    fn = diffusion.guided(model, y, mask, y_null, mask_null, 2.0)
    assert torch.equal(got, diffusion.ancestral(fn, noise, 9, gens, progress=False))
    with pytest.raises(ValueError, match="'dpm' or 'ancestral'"):
        diffusion.sample(model, noise, y, mask, y_null, mask_null, "euler")


def gaussian_kl_bits(m1, logv1, m2, logv2):
    """KL(N(m1, v1) ‖ N(m2, v2)) per element, in bits, by torch.distributions."""
    return kl_divergence(Normal(m1, (0.5 * logv1).exp()), Normal(m2, (0.5 * logv2).exp())) / math.log(2)


def reference_vb(x0, noise, t, out):
    """IDDPM's L_t written out independently: DDPM eqs. 4, 6, 7; IDDPM eq. 15; DDPM eq. 13 at t = 0."""
    x0, noise, out = x0.double(), noise.double(), out.double()
    C = x0.shape[1]
    ac = AC[t].view(-1, 1, 1, 1)
    ac_prev = torch.where(t > 0, AC[(t - 1).clamp(min=0)], torch.ones(())).view(-1, 1, 1, 1)
    beta = BETA[t].view(-1, 1, 1, 1)
    x_t = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
    c0, ct = beta * ac_prev.sqrt() / (1 - ac), (1 - ac_prev) * (1 - beta).sqrt() / (1 - ac)
    beta_tilde = beta * (1 - ac_prev) / (1 - ac)
    beta_tilde_1 = BETA[1] * (1 - AC[0]) / (1 - AC[1])
    log_bt = torch.where(t.view(-1, 1, 1, 1) == 0, beta_tilde_1.log(), beta_tilde.clamp(min=1e-300).log())
    x0_hat = (x_t - (1 - ac).sqrt() * out[:, :C]) / ac.sqrt()
    mean = c0 * x0_hat + ct * x_t
    frac = (out[:, C:] + 1) / 2
    log_var = frac * beta.log() + (1 - frac) * log_bt
    kl = gaussian_kl_bits(c0 * x0 + ct * x_t, log_bt.expand_as(x0), mean, log_var).flatten(1).mean(1)
    # decoder: mass of N(mean, var) on x0's bin [x0 − 1/255, x0 + 1/255], edge bins open to ±∞
    p = Normal(mean, (0.5 * log_var).exp())
    hi = torch.where(x0 > 0.999, torch.ones(()).double(), p.cdf(x0 + 1 / 255))
    lo = torch.where(x0 < -0.999, torch.zeros(()).double(), p.cdf(x0 - 1 / 255))
    nll = (-(hi - lo).log() / math.log(2)).flatten(1).mean(1)
    return torch.where(t == 0, nll, kl)


def test_vb_term_matches_direct_computation():
    N, C = 6, 4
    x0 = torch.rand(N, C, 3, 3) * 2 - 1
    x0[0, 0, 0, :] = torch.tensor([-1.0, 1.0, 0.0])  # edge bins of the decoder
    noise = torch.randn(N, C, 3, 3)
    out = torch.cat([torch.randn(N, C, 3, 3) * 0.5 + noise, torch.rand(N, C, 3, 3) * 2 - 1], 1)
    t = torch.tensor([0, 0, 1, 37, 500, 999])
    model = lambda x, t_, y, mask: out  # noqa: E731  a hand-made output for the given inputs
    got = diffusion.training_losses(model, x0, t, None, None, noise=noise)
    ref_vb = reference_vb(x0, noise, t, out).float()
    # float32 against float64: the KL at large t is a difference of O(1) log terms, so its error is ~100 eps of those
    # terms (atol 1e-5 bits), not of the small KL; rtol for the rest
    assert torch.allclose(got["vb"], ref_vb, rtol=1e-4, atol=1e-5), (got["vb"], ref_vb)
    assert (ref_vb > 0).all()
    # a float32 mean of 36 squares in another order: a few eps of it
    assert torch.allclose(got["mse"], ((noise - out[:, :C]) ** 2).mean((1, 2, 3)), rtol=1e-6, atol=0)
    assert torch.allclose(got["loss"], got["mse"] + got["vb"], rtol=1e-6, atol=0)


def test_vb_gradient_reaches_only_the_variance():
    N, C = 4, 4
    eps_p = torch.randn(N, C, 4, 4, requires_grad=True)
    v_p = torch.zeros(N, C, 4, 4, requires_grad=True)
    model = lambda x, t, y, mask: torch.cat([eps_p, v_p], 1)  # noqa: E731
    losses = diffusion.training_losses(model, torch.randn(N, C, 4, 4), torch.tensor([0, 3, 400, 999]), None, None)
    losses["vb"].sum().backward()
    assert eps_p.grad is None or eps_p.grad.abs().max() == 0  # the predicted mean is detached inside L_vb
    assert v_p.grad.abs().min() > 0
    v_p.grad = None
    losses = diffusion.training_losses(model, torch.randn(N, C, 4, 4), torch.tensor([0, 3, 400, 999]), None, None)
    losses["mse"].sum().backward()
    assert eps_p.grad.abs().max() > 0 and (v_p.grad is None or v_p.grad.abs().max() == 0)


class TinyDenoiser(torch.nn.Module):
    """An MLP taking (x, t, y, mask) like the DiT does, small enough to memorise one batch on a CPU."""

    def __init__(self, C=4, H=4, W=4, D=8, width=256):
        super().__init__()
        self.shape = (2 * C, H, W)
        self.net = torch.nn.Sequential(torch.nn.Linear(C * H * W + 1 + D, width), torch.nn.SiLU(),
                                       torch.nn.Linear(width, width), torch.nn.SiLU(),
                                       torch.nn.Linear(width, 2 * C * H * W))

    def forward(self, x, t, y, mask):
        y = (y * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (N, D) mean over real tokens
        h = torch.cat([x.flatten(1), t[:, None].float() / 1000, y], 1)
        return self.net(h).view(-1, *self.shape)


def test_tiny_model_overfits_one_batch():
    N = 8
    model = TinyDenoiser()
    x0, noise = torch.randn(N, 4, 4, 4).clamp(-1, 1), torch.randn(N, 4, 4, 4)
    t = torch.randint(1, 1000, (N,))
    y, mask = torch.randn(N, 5, 8), torch.ones(N, 5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = None
    for step in range(100):
        loss = diffusion.training_losses(model, x0, t, y, mask, noise=noise)["loss"].mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 100, (first, loss.item())


def test_bf16_network_float32_sampler_state():
    """The network may run in bf16; the latents it sees follow y's dtype, the sampler state stays float32."""
    seen = []

    def model(x, t, y, mask):
        seen.append(x.dtype)
        assert x.dtype == y.dtype == torch.bfloat16
        return torch.cat([x * 0.1, x * 0], 1)

    y, mask = torch.randn(2, 3, 4, dtype=torch.bfloat16), torch.ones(2, 3)
    model_fn = diffusion.guided(model, y, mask, torch.zeros(3, 4), torch.ones(3), 4.5)
    for out in (diffusion.dpm_solver(model_fn, torch.randn(2, 4, 2, 2), 5, progress=False),
                diffusion.ancestral(model_fn, torch.randn(2, 4, 2, 2), 5, progress=False)):
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert seen and set(seen) == {torch.bfloat16}

"""CAME: Confidence-guided Adaptive Memory Efficient optimizer (Luo et al., ACL 2023, arXiv 2307.02047).

PixArt-α and PixArt-Σ train with CAME (the official PixArt-sigma configs: lr 2e-5, betas (0.9, 0.999, 0.9999),
eps (1e-30, 1e-16), weight decay 0). It is Adafactor plus a confidence term:
- the second moment of a matrix gradient G (R×C) is kept factored, as a row mean r (R,) and a column
  mean c (C,), so a 1152×4608 layer stores 5,760 numbers instead of 5.3M (Adafactor, arXiv 1804.04235);
- the normalised update u = G/√v̂ is clipped to RMS ≤ 1, then averaged into a first moment m;
- "confidence": the instability (u − m)² gets its own factored moving average S, and the step is
  m/√S — directions where the update keeps changing are damped (paper Alg. 1).
Vectors (biases, norms) use an unfactored second moment and no confidence term. No bias correction.
"""
import torch


def _factored_rsqrt(row, col):
    """1/√(r c^T / mean(r)): Adafactor's rank-1 estimate of the per-element moment, inverted."""
    r = (row / row.mean(dim=-1, keepdim=True)).rsqrt_()  # (..., R)
    return r.unsqueeze(-1) * col.rsqrt().unsqueeze(-2)  # (..., R, C)


class CAME(torch.optim.Optimizer):
    def __init__(self, params, lr=2e-5, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16),
                 clip_threshold=1.0, weight_decay=0.0):
        if lr <= 0:
            raise ValueError(f"CAME needs a positive learning rate, got {lr}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, clip_threshold=clip_threshold,
                                      weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2, b3 = group["betas"]
            eps1, eps2 = group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                state = self.state[p]
                factored = g.dim() >= 2  # matrices (and conv kernels: last two dims) are factored
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(g)
                    if factored:
                        for name in ("exp_avg_sq_row", "exp_avg_res_row"):
                            state[name] = g.new_zeros(g.shape[:-1])
                        for name in ("exp_avg_sq_col", "exp_avg_res_col"):
                            state[name] = g.new_zeros(g.shape[:-2] + g.shape[-1:])
                    else:
                        state["exp_avg_sq"] = torch.zeros_like(g)
                state["step"] += 1

                # second moment of g (+eps1 keeps the rsqrt finite), factored for matrices
                g2 = (g * g).add_(eps1)
                if factored:
                    state["exp_avg_sq_row"].lerp_(g2.mean(dim=-1), 1 - b2)
                    state["exp_avg_sq_col"].lerp_(g2.mean(dim=-2), 1 - b2)
                    u = _factored_rsqrt(state["exp_avg_sq_row"], state["exp_avg_sq_col"]).mul_(g)
                else:
                    state["exp_avg_sq"].lerp_(g2, 1 - b2)
                    u = state["exp_avg_sq"].rsqrt().mul_(g)
                # update clipping: RMS(u) ≤ d (Adafactor §6)
                rms = u.norm() / u.numel() ** 0.5
                u.div_((rms / group["clip_threshold"]).clamp(min=1.0))
                m = state["exp_avg"].lerp_(u, 1 - b1)

                # confidence: the instability (u − m)² gets its own factored moment S; step = m/√S
                if factored:
                    res = u.sub_(m).square_().add_(eps2)  # u is not needed any more
                    state["exp_avg_res_row"].lerp_(res.mean(dim=-1), 1 - b3)
                    state["exp_avg_res_col"].lerp_(res.mean(dim=-2), 1 - b3)
                    update = _factored_rsqrt(state["exp_avg_res_row"], state["exp_avg_res_col"]).mul_(m)
                else:
                    update = m
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled, as AdamW
                p.add_(update.to(p.dtype), alpha=-group["lr"])
        return loss

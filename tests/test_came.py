"""CAME (came.py) against came-pytorch, the reference implementation."""
import torch

from came import CAME


def test_came_matches_came_pytorch():
    from came_pytorch import CAME as Reference
    shapes = [(24, 40), (40,), (8, 1, 2, 2), (3, 6, 5)]  # matrix, vector, conv kernel, 3-D
    init = [torch.randn(s) for s in shapes]
    ours = [p.clone().requires_grad_() for p in init]
    ref = [p.clone().requires_grad_() for p in init]
    opt_a = CAME(ours, lr=1e-3, weight_decay=0.01)
    opt_b = Reference(ref, lr=1e-3, weight_decay=0.01)  # same defaults: betas (0.9,0.999,0.9999), eps (1e-30,1e-16)
    for step in range(8):
        for a, b, s in zip(ours, ref, shapes):
            g = torch.randn(s) * (3.0 if step % 3 else 0.01)  # large and tiny gradients: the clipping path runs
            a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    moved = max((a - p).abs().max().item() for a, p in zip(ours, init))
    assert moved > 1e-3
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # fp32, weights ~1: relative; atol for those near 0

"""train.train_step, the training step's arithmetic, against arithmetic written out here: 2 micro-batches of 2 are one
batch of 4 (gradient norm, clip, SGD update), EMA's weights, a non-finite step that changes nothing, warmup's lr, the
count of non-finite steps in a row, and the signal handlers given back when training returns."""
import contextlib
import copy
import json
import signal
from types import SimpleNamespace

import pytest
import torch

import checkpoints
import diffusion
import quickstart
import sigma
import train
from test_train import run_args, tiny  # noqa: F401 (tiny: a fixture)

CONFIG = sigma.SigmaConfig(depth=1, hidden_size=32, num_heads=2, patch_size=2, in_channels=4, out_channels=8,
                           caption_channels=16, caption_tokens=8, sample_size=8, pe_interpolation=1.0)
EPS = torch.finfo(torch.float32).eps


def model():
    """CONFIG's DiT, every weight random: the zero-inits (final layer, cross-attention out) would leave most of the
    network without a gradient."""
    m = sigma.PixArtSigma(CONFIG).train()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m


def micro_batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    x0, noise = (torch.randn(n, 4, 8, 8, generator=g) for _ in range(2))
    return train.MicroBatch(x0, torch.randint(0, diffusion.NUM_TIMESTEPS, (n,), generator=g), noise,
                            torch.randn(n, 8, 16, generator=g), torch.ones(n, 8, dtype=torch.long), epoch=0, skipped=0)


def joined(parts):
    """Micro-batches -> one batch of all their rows."""
    return train.MicroBatch(*(torch.cat(f) for f in list(zip(*parts))[:5]), epoch=0, skipped=0)


def step(net, parts, ema=None, clip=1e9, decay=0.0, lr=1.0):
    """train_step over `parts` (one micro-batch each) with SGD at lr -> its StepResult."""
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=lr)
    args = SimpleNamespace(grad_accum=len(parts), clip=clip, ema=decay)
    return train.train_step(net, net, ema, opt, iter(parts), args, 1, contextlib.nullcontext())


def by_hand(net, batch):
    """The loss of one batch, its mean's gradient -> (per-image losses, [gradient of each weight], their global norm)."""
    net = copy.deepcopy(net)
    loss = diffusion.training_losses(net, batch.x0, batch.t, batch.y, batch.mask, batch.noise)["loss"]
    grads = torch.autograd.grad(loss.mean(), list(net.parameters()))
    return loss.detach(), grads, torch.cat([g.flatten() for g in grads]).norm()


@pytest.mark.parametrize("clip", [None, 0.5], ids=["no-clip", "clipped"])
def test_two_micro_batches_of_two_step_as_one_batch_of_four(one_thread, clip):
    """--grad-accum 2 over two batches of 2 = one batch of 4: the same gradient norm (before clipping), loss sums and
    SGD update w - lr·g·min(1, clip/|g|) (a loss not divided by --grad-accum doubles the gradient, and the update)."""
    net, parts = model(), [micro_batch(2, 1), micro_batch(2, 2)]
    losses, grads, norm = by_hand(net, joined(parts))
    before = [p.detach().clone() for p in net.parameters()]
    result = step(net, parts, clip=1e9 if clip is None else clip * norm.item())
    scale = 1.0 if clip is None else clip
    assert result.finite and result.sums[3].item() == 4
    # float32 sums in another order: a few eps relative to the magnitudes compared; 1e-5 leaves a wide margin
    assert abs(result.grad_norm - norm) <= 1e-5 * norm
    assert abs(result.sums[0] - losses.sum()) <= 1e-5 * losses.abs().sum()
    for w, p, g in zip(before, net.parameters(), grads):
        assert (p - (w - scale * g)).abs().max() <= 1e-5 * max(w.abs().max(), g.abs().max())
    assert max((p - w).abs().max() for w, p in zip(before, net.parameters())) > 1e-3  # it moved


def test_ema_takes_one_minus_decay_of_the_new_weights(one_thread):
    """EMA after one step = decay·before + (1 − decay)·after. At decay 0.75 the swapped reading (decay·after) is
    0.5·(after − before) away."""
    net, decay = model(), 0.75
    ema = copy.deepcopy(net).requires_grad_(False)
    before = [p.detach().clone() for p in net.parameters()]
    step(net, [micro_batch(4, 3)], ema=ema, decay=decay)
    for w, p, e in zip(before, net.parameters(), ema.parameters()):
        want = decay * w + (1 - decay) * p.detach()
        assert (e - want).abs().max() <= 4 * EPS * max(w.abs().max(), p.abs().max())  # one lerp's rounding, in eps
    assert max((p - w).abs().max() for w, p in zip(before, net.parameters())) > 1e-3


def test_the_ema_carries_no_autograd_history(one_thread):
    """The EMA's update is no part of a graph: an update recorded by autograd chains every step onto the last, and a
    ControlNet run's memory grew ~4 MB a step with it (0.6 -> 1.7 GB in 270 steps of the quick start's demo)."""
    net = model()
    ema = copy.deepcopy(net).requires_grad_(False)
    for seed in (3, 4):
        step(net, [micro_batch(2, seed)], ema=ema, decay=0.75)
    assert not any(e.requires_grad or e.grad_fn is not None for e in ema.parameters())


def test_a_step_with_a_non_finite_loss_changes_nothing(one_thread):
    net = model()
    ema, opt = copy.deepcopy(net).requires_grad_(False), torch.optim.AdamW(net.parameters(), lr=1e-2)
    bad = micro_batch(2, 4)._replace(x0=torch.full((2, 4, 8, 8), float("nan")))
    weights, averaged = copy.deepcopy(net.state_dict()), copy.deepcopy(ema.state_dict())
    args = SimpleNamespace(grad_accum=2, clip=1.0, ema=0.9)
    result = train.train_step(net, net, ema, opt, iter([micro_batch(2, 5), bad]), args, 1, contextlib.nullcontext())
    assert not result.finite and opt.state == {} and all(p.grad is None for p in net.parameters())
    assert all(torch.equal(net.state_dict()[k], v) for k, v in weights.items())
    assert all(torch.equal(ema.state_dict()[k], v) for k, v in averaged.items())


def test_a_finite_step_resets_the_count_of_non_finite_ones(tmp_path, capsys):
    """--max-nonfinite 3 counts steps in a row: bad, bad, good, bad, bad goes on; bad, bad, bad stops (status 1)."""
    args = SimpleNamespace(out=str(tmp_path), lr=1e-3, clip=1.0, bf16=False, max_nonfinite=3)
    nan = torch.tensor(float("nan"))
    good = train.StepResult(torch.tensor([4.0, 4.0, 0.0, 4.0]), torch.tensor(1.0), True, 0, 0)
    bad = train.StepResult(torch.tensor([nan, nan, nan, 4.0]), nan, False, 0, 0)
    in_a_row, counts = 0, []
    for n, result in enumerate([bad, bad, good, bad, bad], 1):
        in_a_row = checkpoints.count_skipped(result, n, in_a_row, args, 0)
        counts.append(in_a_row)
    assert counts == [1, 2, 0, 1, 2]
    in_a_row = 0
    with pytest.raises(SystemExit) as stopped:
        for n in (1, 2, 3):
            in_a_row = checkpoints.count_skipped(bad, n, in_a_row, args, 0)
    assert stopped.value.code == 1 and n == 3
    assert "step 3: 3 steps in a row with a non-finite loss or gradient" in capsys.readouterr().err


def test_warmup_lr_and_the_signal_handlers_given_back(tmp_path, tiny):
    """--warmup 3 at --lr 1e-3: the lr of step s is 1e-3·s/3 up to step 3, then 1e-3. Training installs its own SIGTERM
    and SIGINT handlers (checkpoints.Interrupts): once it returns, the caller's are back."""
    mine = lambda number, frame: None
    previous = signal.signal(signal.SIGTERM, mine), signal.getsignal(signal.SIGINT)
    try:
        quickstart.train(run_args(tmp_path, "--steps", 4, "--warmup", 3, "--lr", 1e-3, "--preview-every", 0))
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is previous[1]
    finally:
        signal.signal(signal.SIGTERM, previous[0])
    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "log.jsonl")]
    assert lrs == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3], rel=4 * EPS)  # Python floats; eps of float32 is ample


def test_interrupts_give_the_handlers_back_after_a_signal_and_a_stop(tmp_path):
    """Interrupts notes a SIGTERM (and sets the default action for a second one); however the loop inside it ends, the
    handlers are the caller's again."""
    mine = lambda number, frame: None
    previous = signal.signal(signal.SIGTERM, mine), signal.getsignal(signal.SIGINT)
    args = SimpleNamespace(out=str(tmp_path))
    try:
        with checkpoints.Interrupts(args, 0, 1, torch.device("cpu")) as interrupts:
            signal.raise_signal(signal.SIGTERM)
            assert interrupts.stop_signal() == signal.SIGTERM and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is previous[1]
        with pytest.raises(SystemExit):
            with checkpoints.Interrupts(args, 0, 1, torch.device("cpu")):
                checkpoints.stop(None)
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is previous[1]
    finally:
        signal.signal(signal.SIGTERM, previous[0])

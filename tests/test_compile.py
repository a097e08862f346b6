"""Compile-readiness on the CPU (issue 29): a denoising step is one graph of fixed shapes with no host sync, and
`PixArtSigma.compile_blocks` (sample.py / train.py --compile) compiles the block once: not once per block, per step
or per image size. Tracing checks use the 'eager' / 'aot_eager' backends (dynamo's graph capture without code
generation: seconds); compiled = eager (aot_eager, and inductor that builds C++) is marked slow."""
import copy
import traceback

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import diffusion
import sigma
from test_sample import components  # noqa: F401 -- the fixture: a tiny pipeline in the released layout

TINY = dict(depth=2, hidden_size=32, num_heads=2, caption_channels=16, caption_tokens=12, sample_size=8,
            pe_interpolation=1.0)


def tiny(kv=(), mode="conv", device="cpu", depth=2):
    """A random tiny DiT: every weight drawn (the zero-inits would make the output 0 and any comparison trivially equal)."""
    with torch.device(device):
        model = sigma.PixArtSigma(sigma.SigmaConfig(**dict(TINY, depth=depth), kv_compress_layers=kv,
                                                    kv_compress_mode=mode))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, p[0].numel() ** -0.5 if p.dim() > 1 else 0.3)
    return model.eval()


def captions(used=(5, 3), null_used=1, L=12, device="cpu"):
    """Caption features (N, L, 16) with the first used[n] tokens real, and the null caption T5("") (one token)."""
    y, y_null = torch.randn(len(used), L, 16, device=device), torch.randn(1, L, 16, device=device)
    mask = (torch.arange(L)[None] < torch.tensor(used)[:, None]).float().to(device)  # (N, L)
    mask_null = (torch.arange(L)[None] < null_used).float().to(device)  # (1, L)
    return y, mask, y_null, mask_null


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # compiled code is cached on PixArtBlock.forward: each test starts from none
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", [None, "conv", "uniform", "avgpool"])
def test_block_is_one_graph(mode):
    """fullgraph=True raises on any graph break (a .item(), a Python branch on a tensor value, an unsupported call):
    the block, plain and with each KV compression, traces as one graph, and that graph computes the block."""
    model = tiny(kv=(0,) if mode else (), mode=mode or "conv")
    block, N, T, L, D = model.blocks[0], 2, 16, 5, 32
    x, y, t0 = torch.randn(N, T, D), torch.randn(N, L, D), torch.randn(N, 6 * D)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)[:, None, None, :]  # (N, 1, 1, L)
    with torch.no_grad():
        expected = block(x, y, mask, t0, (4, 4))
        got = torch.compile(block, fullgraph=True, backend="eager")(x, y, mask, t0, (4, 4))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # the eager backend runs the captured ops as they are


class HostSyncs(TorchDispatchMode):
    """Records each operation that makes the host wait for an accelerator, with where it was called from, while
    `step` > 0 (the sampler's loop; `step` is advanced by the model wrapper). The model runs on the meta device, a
    stand-in for the accelerator: a tensor there has no data, so reading a value (`.item()`, `int()`, `if t:`,
    `nonzero`'s output size) must sync, and a blocking copy from the host (a CPU tensor `.to(device)` in the step)
    shows as a CPU -> meta copy. Copies with non_blocking=True do not wait for the device's stream: allowed."""
    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
             torch.ops.aten.equal.default, torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default}

    def __init__(self):
        super().__init__()
        self.step, self.syncs = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {a.device.type for a in args if isinstance(a, torch.Tensor)}
        copy_in = (func is torch.ops.aten._to_copy.default and devices == {"cpu"}
                   and kwargs.get("device", torch.device("cpu")).type != "cpu")
        copy_in |= func is torch.ops.aten.copy_.default and len(devices) > 1
        blocking = not (kwargs.get("non_blocking") or (func is torch.ops.aten.copy_.default and args[2:] == (True,)))
        if self.step and ((func in self.READS and devices - {"cpu"}) or (copy_in and blocking)):
            where = [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.line}" for f in traceback.extract_stack()
                     if f.filename.endswith(("diffusion.py", "sigma.py", "sample.py"))]
            self.syncs.append((self.step, str(func), where[-1:] or ["?"]))
            if func in self.READS:  # meta tensors have no value to read: stop here, with the record made
                raise AssertionError(f"host sync in denoising step {self.step}: {func} at {where}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("sampler,steps", [("dpm", 20), ("ancestral", 6)])
@pytest.mark.parametrize("cfg", [4.5, 1.0])
def test_denoising_steps_have_no_host_sync(monkeypatch, sampler, steps, cfg):
    """diffusion.sample's loop (guidance, the sampler's update, the DiT forward) never makes the host wait: no value
    read back, no blocking copy from the host. The one sync of a sampling call, the caption length of drop_padding,
    comes before the loop; it cannot run on meta tensors (no data), so here it is the identity (tested below)."""
    monkeypatch.setattr(diffusion, "drop_padding", lambda y, mask: (y, mask))
    model = tiny(kv=(1,), device="meta")
    y, mask, y_null, mask_null = captions(device="meta")
    x = torch.randn(2, 4, 8, 8, device="meta")
    model(x, torch.zeros(2, device="meta"), y, mask)  # fills the position-table cache: once per image size, not per step
    mode = HostSyncs()

    def counted(*args):
        mode.step += 1
        return model(*args)

    with mode:
        out = diffusion.sample(counted, x, y, mask, y_null, mask_null, sampler, steps, cfg, progress=False,
                               generator=[torch.Generator().manual_seed(k) for k in range(2)])
    assert mode.step == steps and out.shape == x.shape and out.device.type == "meta"
    assert mode.syncs == [], mode.syncs


def test_drop_padding_cuts_to_the_last_used_column_exactly():
    """The cut keeps every column some row attends to (holes included) and nothing after; the DiT's output is the
    same with and without the padding, and cutting one column more changes it (the test can fail both ways)."""
    model = tiny(kv=(1,))
    L = 12
    mask = torch.zeros(3, L)
    mask[0, :4] = 1
    mask[1, [0, 2, 6]] = 1  # a hole at 1, 3-5: kept, masked
    mask[2, :1] = 1
    last = max(j for row in mask.tolist() for j, m in enumerate(row) if m)  # written out: column 6
    y = torch.randn(3, L, 16)
    y_cut, mask_cut = diffusion.drop_padding(y, mask)
    assert mask_cut.shape == (3, last + 1) and torch.equal(y_cut, y[:, :last + 1]) and torch.equal(mask_cut, mask[:, :7])
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([999, 500, 3])
    with torch.no_grad():
        full, cut = model(x, t, y, mask), model(x, t, y_cut, mask_cut)
        short = model(x, t, y[:, :last], mask[:, :last])
    scale = full.abs().max()
    # fp32: a masked key's weight is exactly 0, so only the summation order of the attention kernel may differ (~1e-7)
    assert (cut - full).abs().max() <= 1e-5 * scale
    assert (short - full).abs().max() > 1e-3 * scale  # a real token dropped: row 1 loses its column 6
    # nothing used (no real token anywhere): nothing to cut
    assert diffusion.drop_padding(y, torch.zeros(3, L))[1].shape == (3, L)


def test_guidance_cuts_the_cfg_batch_once():
    """guided() builds the 2N-row CFG captions (null rows first) and cuts them to the longest of caption and null
    caption once, before any step: every forward sees the same (2N, L') captions."""
    y, mask, y_null, mask_null = captions(used=(5, 3), null_used=2)
    seen = []

    def model(x, t, yy, mm):
        seen.append((yy, mm))
        return torch.zeros(len(x), 8, *x.shape[2:])

    diffusion.sample(model, torch.randn(2, 4, 8, 8), y, mask, y_null, mask_null, steps=3, progress=False)
    assert len(seen) == 3 and all(a is seen[0][0] and b is seen[0][1] for a, b in seen)  # built once, reused
    yy, mm = seen[0]
    assert yy.shape == (4, 5, 16)  # 2N rows, cut to the longest caption (5 tokens)
    torch.testing.assert_close(yy, torch.cat([y_null.expand(2, -1, -1), y])[:, :5], rtol=0, atol=0)
    assert mm.tolist() == [[1, 1, 0, 0, 0]] * 2 + [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]


def test_regional_compile_once_per_block_kind_then_once_per_new_shape():
    """compile_blocks: the three blocks (two plain, one KV-compressed) build two graphs, not three; 20 steps build
    none more; a second image size and caption length recompile each kind once, with dynamic shapes, and a third
    reuses those. The module keeps its own state_dict keys (checkpoints never carry `_orig_mod.`)."""
    model = tiny(kv=(2,), depth=3)
    keys = list(model.state_dict())
    graphs = []

    def backend(gm, example_inputs):  # called once per graph dynamo builds: counts compilations, runs them as traced
        graphs.append(gm)
        return gm.forward

    assert model.compile_blocks(backend=backend) is model
    _, _, y_null, mask_null = captions()
    counts = []
    for side, used, steps in ((8, (5, 3), 20), (16, (7, 2), 2), (24, (9, 2), 2)):  # longest caption: 5, 7, 9 tokens
        y, mask, _, _ = captions(used)
        diffusion.sample(model, torch.randn(2, 4, side, side), y, mask, y_null, mask_null, steps=steps, progress=False)
        counts.append(len(graphs))
    assert counts == [2, 4, 4], counts
    assert list(model.state_dict()) == keys and not any("_orig_mod" in k for k in keys)


@pytest.mark.slow  # aot_eager ~10 s, inductor (C++ builds) a minute or more of CPU
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_sampling_equals_eager(backend):
    """Regional compilation changes no result: a whole DPM-Solver++ sampling (CFG, 8 steps) and a training loss with
    its gradients through compiled blocks (and gradient checkpointing) equal the eager ones. aot_eager runs the decomposed, functionalized graph
    (what inductor receives); inductor generates and compiles C++ for it (slow)."""
    eager = tiny(kv=(1,))
    compiled = copy.deepcopy(eager).compile_blocks(backend=backend)
    y, mask, y_null, mask_null = captions()
    x = torch.randn(2, 4, 8, 8)
    a = diffusion.sample(eager, x, y, mask, y_null, mask_null, steps=8, progress=False)
    b = diffusion.sample(compiled, x, y, mask, y_null, mask_null, steps=8, progress=False)
    # fp32. inductor fuses and reorders the reductions (LayerNorm, softmax) and may use vectorized tanh/exp within a
    # few ULP: ~1e-6 relative per op, carried through 2 blocks and 8 steps. 1e-4 of the magnitude holds on any CPU's
    # kernels and is far below what one wrong operation changes (the output moves by its own size).
    assert (b - a).abs().max() <= 1e-4 * a.abs().max()
    loss = lambda m: diffusion.training_losses(m.train(), x, torch.tensor([10, 900]), *diffusion.drop_padding(y, mask),
                                               noise=torch.ones_like(x))["loss"].sum()  # noqa: E731
    loss(eager).backward()
    compiled.gradient_checkpointing = True  # train.py --compile --grad-checkpoint: each compiled block recomputed
    loss(compiled).backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert (q.grad - p.grad).abs().max() <= 1e-4 * p.grad.abs().max() + 1e-12, name


@pytest.mark.slow  # inductor builds C++ for the block: a minute or more of CPU
def test_sample_cli_compile_gives_the_eager_image(components, tmp_path, capsys):
    """`sample.py --compile` end to end (the tiny released-layout pipeline of test_sample.py, inductor): the PNG is the
    eager run's within 1/255, and compiling built one graph for its two blocks (regional), none per step."""
    from test_sample import cli, pixels
    common = ["a red fox in snow", "--model", components, "--steps", 3, "--size", "256", "--seed", 4, "--device", "cpu"]
    assert cli(capsys, *common, "--out", tmp_path / "eager")[0] == 0
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert cli(capsys, *common, "--out", tmp_path / "compiled", "--compile")[0] == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1
    # where dynamo keeps compiled code (a debugging hook of torch's): on the block's forward, not on the network's
    compiled_on = lambda f: len(torch._dynamo.eval_frame._debug_get_cache_entry_list(f.__code__))  # noqa: E731
    assert compiled_on(sigma.PixArtBlock.forward) == 1 and compiled_on(sigma.PixArtSigma.forward) == 0
    # fp32; inductor's reordered reductions move the output ~1e-6 relatively: at most a rounding flip of one 8-bit level
    assert np.abs(pixels(tmp_path / "compiled/00000-4.png") - pixels(tmp_path / "eager/00000-4.png")).max() <= 1

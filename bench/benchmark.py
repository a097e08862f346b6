"""Speed benchmarks: this code against the reference implementations, same weights, same inputs.

A script, not a test:  python bench/benchmark.py [section ...]   (no section = all of them)
Every section times ours and the reference in one run and prints the ratio ours/reference.
"""
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import diffusion  # noqa: E402


def timeit(fn, warmup=1, repeat=3):
    """Best wall-clock seconds of `repeat` calls after `warmup` calls (synchronising CUDA)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def report(name, ours, ref):
    print(f"{name:<48} ours {ours:8.3f}s   reference {ref:8.3f}s   ratio {ours / ref:5.2f}x", flush=True)


SECTIONS = {}  # name -> function(); each section adds itself below


def bench_dit():
    """The DiT forward: ours vs diffusers' PixArtTransformer2DModel, full XL/2, same weights and inputs."""
    import dataclasses
    from diffusers import PixArtTransformer2DModel
    import sigma
    import weights

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    config = sigma.CONFIGS["2K" if cuda else "1024"]
    kwargs = {k: v for k, v in weights.diffusers_config(config).items() if not k.startswith("_")}
    ref = PixArtTransformer2DModel(**kwargs).eval()
    ours = weights.load_checkpoint(ref.state_dict(), config)
    ref, ours = ref.to(device, dtype), ours.to(device, dtype)
    # CPU: batch 2 at a 32² latent (256 px); GPU: the CFG batch of 2 at 1024² and 4096² (128², 512² latents)
    for side in ([128, 512] if cuda else [32]):
        x = torch.randn(2, 4, side, side, device=device, dtype=dtype)
        t = torch.tensor([999, 999], device=device)
        y = torch.randn(2, 300, 4096, device=device, dtype=dtype)
        mask = torch.zeros(2, 300, device=device)
        mask[:, :40] = 1
        t_ref = timeit(lambda: ref(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask), repeat=3)
        y_cut, mask_cut = diffusion.drop_padding(y, mask)  # as sample.py and train.py give it: the 40 used tokens
        t_ours = timeit(lambda: ours(x, t, y_cut, mask_cut), repeat=3)
        report(f"DiT forward {side}² latent, batch 2, {str(dtype)[6:]}", t_ours, t_ref)
        if cuda:  # KV compression in the deep half (paper), and torch.compile
            kv = weights.load_checkpoint(ours.state_dict(), dataclasses.replace(config, kv_compress_layers=sigma.KV_DEEP_HALF))
            kv = kv.to(device, dtype)
            report(f"  + KV compression blocks 14-27", timeit(lambda: kv(x, t, y_cut, mask_cut)), t_ref)
            compiled = copy.deepcopy(ours).compile_blocks()  # sample.py --compile: each block (regional)
            report(f"  + torch.compile", timeit(lambda: compiled(x, t, y_cut, mask_cut), warmup=2), t_ref)
            compiled_kv = copy.deepcopy(kv).compile_blocks()
            report(f"  + KV compression + torch.compile", timeit(lambda: compiled_kv(x, t, y_cut, mask_cut), warmup=2), t_ref)
            del kv, compiled, compiled_kv


SECTIONS["dit"] = bench_dit


def bench_sampler():
    """Sampler overhead alone (a trivial model): 20 DPM-Solver++ steps, ours vs diffusers' scheduler loop."""
    from diffusers import DPMSolverMultistepScheduler

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(2, 4, 128, 128, device=device)
    model_fn = lambda x, t: 0.5 * x  # noqa: E731

    def ref():
        sched = DPMSolverMultistepScheduler()
        sched.set_timesteps(20, device=device)
        z = x
        for t in sched.timesteps:
            z = sched.step(model_fn(z, t.expand(2)), t, z).prev_sample
        return z

    report("DPM-Solver++ 20 steps, 2x4x128x128, trivial model", timeit(
        lambda: diffusion.dpm_solver(model_fn, x, 20, progress=False)), timeit(ref))


SECTIONS["sampler"] = bench_sampler


def random_t5(config, dtype=torch.float32, device="cpu"):
    """Our T5 encoder with random weights at T5's init scales, allocated once (meta device -> to_empty)."""
    import t5

    with torch.device("meta"):
        model = t5.T5Encoder(config)
    model = model.to(dtype).to_empty(device=device).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.fill_(1.0)
            else:  # q at (D·d_kv)^-½ (T5 does not scale scores), other matrices at fan_in^-½, tables at 1
                p.normal_(0, 1.0 if p.shape[1] < 128 or "shared" in name else
                          (p.shape[1] * (config.d_kv if name.endswith(".q.weight") else 1)) ** -0.5)
    return model


def hf_t5(model):
    """transformers' T5EncoderModel sharing our model's tensors (same dtype and device, no copy)."""
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        ref = T5EncoderModel(T5Config(feed_forward_proj="gated-gelu", **vars(model.config))).eval()
    ref.load_state_dict(model.state_dict(), strict=False, assign=True)  # all but encoder.embed_tokens:
    ref.set_input_embeddings(ref.shared)  # which is tied to shared
    return ref


def alternate(*fns, rounds=4):
    """Best seconds of each fn, called in turn round after round: on a shared, loaded machine this is
    fairer than timing one implementation after the other."""
    best = [timeit(fn, warmup=1, repeat=1) for fn in fns]
    for _ in range(rounds - 1):
        best = [min(b, timeit(fn, warmup=0, repeat=1)) for b, fn in zip(best, fns)]
    return best


def padded_ids(config, N=4, L=300, device="cpu"):
    ids = torch.randint(3, config.vocab_size, (N, L), device=device)
    mask = (torch.arange(L, device=device)[None] < torch.linspace(L, 20, N, device=device)[:, None]).long()
    return ids * mask, mask  # prompts of 300 ... 20 tokens, padded with id 0


def peak_rss_gib(code):
    """Peak resident memory (GiB) that `code` adds to a fresh interpreter. Measured in a subprocess with
    VmHWM from /proc: ru_maxrss would also count the parent's memory, which a forked child starts from."""
    import subprocess
    import textwrap

    script = textwrap.dedent(f"""
        import re, sys, torch
        sys.path.insert(0, {os.path.join(os.path.dirname(__file__), '..')!r})
        import t5, transformers, weights
        hwm = lambda: int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
        base = hwm()
        {code}
        print((hwm() - base) / 2**20)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    return float(out.stdout.split()[-1])


def bench_t5():
    """T5 encoder: ours vs transformers' T5EncoderModel (CPU speed, fp32 and bf16), CPU dtype choice,
    peak host memory of loading a sharded fp32 folder into bf16, and (GPU only) T5-XXL encode time."""
    import json
    import tempfile

    from safetensors.torch import save_file
    from transformers import T5Config

    import t5

    if torch.cuda.is_available():  # T5-XXL, bf16, random weights: a CFG-sized batch and a training-sized one
        model = random_t5(t5.T5Config(), torch.bfloat16, "cuda")
        ref = hf_t5(model)
        for N in (2, 32):
            ids, mask = padded_ids(model.config, N, device="cuda")
            report(f"T5-XXL encode, {N} prompts x 300 tokens, bf16, GPU",
                   *alternate(lambda: model(ids, mask), lambda: ref(input_ids=ids, attention_mask=mask)))
        del model, ref
        torch.cuda.empty_cache()

    # CPU speed: T5 v1.1-large width (1024/2816/16 heads), 8 layers, 4 prompts of 300..20 tokens
    config = t5.T5Config(vocab_size=32128, d_model=1024, d_ff=2816, num_heads=16, d_kv=64, num_layers=8)
    ids, mask = padded_ids(config)
    for dtype in (torch.float32, torch.bfloat16):
        model = random_t5(config, dtype)
        ref = hf_t5(model)
        report(f"T5 large width x8 layers, 4x300 tokens, {str(dtype)[6:]}, CPU",
               *alternate(lambda: model(ids, mask), lambda: ref(input_ids=ids, attention_mask=mask)))
    del model, ref

    # CPU dtype: our encoder at the full XXL width (2 of its 24 layers), fp32 vs bf16
    config = t5.T5Config(num_layers=2)
    ids, mask = padded_ids(config, N=2)
    model = random_t5(config)
    half = random_t5(config, torch.bfloat16)
    t32, t16 = alternate(lambda: model(ids, mask), lambda: half(ids, mask), rounds=3)
    print(f"{'T5-XXL width x2 layers, 2x300 tokens, CPU':<48} fp32 {t32:8.3f}s   bf16 {t16:8.3f}s   "
          f"bf16/fp32 {t16 / t32:5.2f}x", flush=True)
    del model, half

    # Peak host memory: load a sharded fp32 text_encoder/ folder (the released layout) into bf16
    config = t5.T5Config(d_model=2048, d_ff=5120, num_heads=32, num_layers=12)
    with tempfile.TemporaryDirectory() as folder:
        sd = random_t5(config).state_dict()
        keys = sorted(sd)
        shards = {k: f"model-0000{1 + (i >= len(keys) // 2)}-of-00002.safetensors" for i, k in enumerate(keys)}
        for shard in sorted(set(shards.values())):
            save_file({k: sd[k] for k in keys if shards[k] == shard}, os.path.join(folder, shard))
        fp32 = sum(v.numel() * 4 for v in sd.values()) / 2**30
        del sd
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": int(fp32 * 2**30)}, "weight_map": shards}, f)
        T5Config(feed_forward_proj="gated-gelu", **vars(config)).to_json_file(os.path.join(folder, "config.json"))
        ours = peak_rss_gib(f"m = weights.load_t5({folder!r}, torch.bfloat16)")
        ref = peak_rss_gib(f"m = transformers.T5EncoderModel.from_pretrained({folder!r}, dtype=torch.bfloat16)")
    print(f"{'load sharded fp32 T5 (d_model 2048, 12 layers) -> bf16':<48} peak RSS ours {ours:.2f} GiB   "
          f"transformers {ref:.2f} GiB   (fp32 files {fp32:.2f} GiB, bf16 model {fp32 / 2:.2f} GiB)", flush=True)


SECTIONS["t5"] = bench_t5


def pipeline_gpu(spiece, reference_tokenizer, device="cuda", dtype=torch.bfloat16, sides=(1024, 2048, 4096),
                 dit_config=None, t5_config=None, vae_config=None, prompt="a small cactus with a happy face"):
    """sample.generate vs diffusers' PixArtSigmaPipeline, full-size random weights (the speed does not depend
    on the values), 20 DPM-Solver++ steps with CFG, exact sizes (no binning), one image; seconds per image,
    with KV compression (blocks 14-27) and torch.compile; peak GPU memory while the DiT and the VAE run.
    The default configs are the released ones; pass tiny ones to smoke-test the code on a CPU."""
    import dataclasses
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    import sample
    import sigma
    import t5
    import vae as vaelib
    import weights
    from tokenizer import Tokenizer

    cuda = device == "cuda"
    t5_config, vae_config = t5_config or t5.T5Config(), vae_config or vaelib.SDXL
    text_encoder = random_t5(t5_config, dtype, device)
    tokenizer = Tokenizer(spiece)
    vae = vaelib.AutoencoderKL(vae_config).to(device, dtype).eval()  # default init: random, fine for timing
    c = vae_config
    ref_vae = AutoencoderKL(block_out_channels=c.block_out_channels, layers_per_block=c.layers_per_block,
                            latent_channels=c.latent_channels, norm_num_groups=c.norm_num_groups,
                            down_block_types=("DownEncoderBlock2D",) * len(c.block_out_channels),
                            up_block_types=("UpDecoderBlock2D",) * len(c.block_out_channels),
                            scaling_factor=c.scaling_factor)
    ref_vae.load_state_dict(vae.state_dict())
    ref_vae, ref_t5 = ref_vae.to(device, dtype).eval(), hf_t5(text_encoder)  # shares our T5's tensors

    def weight_bytes(*modules):
        return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())

    for side in sides:
        config = dit_config or sigma.CONFIGS["1024" if side <= 1536 else "2K"]
        kwargs = {k: v for k, v in weights.diffusers_config(config).items() if not k.startswith("_")}
        ref_dit = PixArtTransformer2DModel(**kwargs).eval()
        dit = weights.load_checkpoint(ref_dit.state_dict(), config).to(device, dtype)
        kv = weights.load_checkpoint(ref_dit.state_dict(), dataclasses.replace(
            config, kv_compress_layers=sigma.deep_half(config.depth))).to(device, dtype)
        pipe = PixArtSigmaPipeline(tokenizer=reference_tokenizer, text_encoder=ref_t5, vae=ref_vae,
                                   transformer=ref_dit.to(device, dtype), scheduler=DPMSolverMultistepScheduler())
        pipe.set_progress_bar_config(disable=True)
        if side * side > 2048 * 2048:
            ref_vae.enable_tiling()  # untiled, its mid-block attention over 262k pixels does not fit (ours tiles itself)
        repeat, warmup = (1, 0) if side > 2048 else (2, 1)  # 4096²: ~a minute per image, no warm-up needed

        def ref():
            return pipe(prompt, height=side, width=side, num_inference_steps=20, use_resolution_binning=False,
                        clean_caption=False, generator=torch.Generator("cpu").manual_seed(0))

        def ours(model):
            return lambda: sample.generate([prompt], model, text_encoder, tokenizer, vae, size=(side, side),
                                           binning=False, progress=False)

        t_ref = timeit(ref, warmup=warmup, repeat=repeat)
        name = f"pipeline {side}², 20 steps, {str(dtype)[6:]}, {device}"
        report(name, timeit(ours(dit), warmup=warmup, repeat=repeat), t_ref)
        report("  + KV compression blocks 14-27", timeit(ours(kv), warmup=warmup, repeat=repeat), t_ref)
        if cuda:
            compiled, compiled_kv = copy.deepcopy(dit).compile_blocks(), copy.deepcopy(kv).compile_blocks()
            report("  + torch.compile", timeit(ours(compiled), warmup=2, repeat=repeat), t_ref)
            report("  + KV compression + torch.compile", timeit(ours(compiled_kv), warmup=2, repeat=repeat), t_ref)
            del compiled, compiled_kv
            # peak = DiT + VAE weights + the most memory allocated on top of everything resident; every model
            # of this benchmark stays on the GPU, so the T5 and the other pipeline's weights are counted out
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            ref()  # its T5 forward is inside this window too (small next to the DiT's activations)
            peak_ref = torch.cuda.max_memory_allocated() - base + weight_bytes(ref_dit, ref_vae)
            captions = sample.encode_prompts(text_encoder, tokenizer, [prompt])
            torch.cuda.reset_peak_memory_stats()  # T5 is done: from here on, the DiT + VAE phase
            start = torch.cuda.memory_allocated()
            latents = sample.sample_latents(dit, captions, (side // 8, side // 8), progress=False)
            sample.decode(vae, latents, (side, side))
            peak = torch.cuda.max_memory_allocated() - start + weight_bytes(dit, vae)
            print(f"{'  peak GPU memory, DiT + VAE (weights included)':<48} ours {peak / 2**30:6.2f} GiB   "
                  f"diffusers {peak_ref / 2**30:6.2f} GiB", flush=True)
        del pipe, ref_dit, dit, kv
        if cuda:
            torch.cuda.empty_cache()


def bench_pipeline():
    """End to end seconds per image (T5, 20 DPM-Solver++ steps with CFG, VAE decode): sample.generate vs
    diffusers' PixArtSigmaPipeline on identical components. CPU: the tiny random pipeline of tests/test_sample.py
    at 256². GPU (when present): full-size random weights at 1024², 2048², 4096² (pipeline_gpu)."""
    import tempfile
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from test_sample import diffusers_pipeline, reference_tokenizer, write_components
    import sample
    import weights
    from tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = write_components(os.path.join(tmp, "pipeline"))
        pipe = diffusers_pipeline(root)
        pipe.set_progress_bar_config(disable=True)
        model, vae = weights.load_checkpoint(f"{root}/transformer"), weights.load_vae(f"{root}/vae")
        text_encoder, tokenizer = weights.load_t5(f"{root}/text_encoder", torch.float32), Tokenizer(f"{root}/tokenizer")
        prompt = "a small cactus with a happy face in the sahara desert"
        report("pipeline 256², 20 steps, tiny weights, CPU", timeit(
            lambda: sample.generate([prompt], model, text_encoder, tokenizer, vae, size=(256, 256), progress=False)),
            timeit(lambda: pipe(prompt, height=256, width=256, num_inference_steps=20, clean_caption=False,
                                generator=torch.Generator("cpu").manual_seed(0))))
        if torch.cuda.is_available():
            pipeline_gpu(f"{root}/tokenizer/spiece.model", reference_tokenizer(root))
        else:
            print("pipeline: no CUDA device, GPU part (1024², 2048², 4096², bf16) not run", flush=True)


SECTIONS["pipeline"] = bench_pipeline


def bench_train():
    """Training: CAME step ours vs came_pytorch; a full training step (IDDPM loss, backward, CAME) with our DiT
    vs diffusers' PixArtTransformer2DModel under the same loss; on a GPU also images/s, MFU and the cost of
    encoding on the fly (T5-XXL + SDXL VAE, random weights) that the feature cache removes."""
    from came_pytorch import CAME as RefCAME
    from diffusers import PixArtTransformer2DModel
    import sigma
    import weights
    from came import CAME

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    with torch.inference_mode(False), torch.enable_grad():
        config = sigma.CONFIGS["1024"] if cuda else sigma.SigmaConfig(depth=4, hidden_size=384, num_heads=6)
        params = [torch.randn(p.shape, device=device) for p in sigma.PixArtSigma(config).parameters()]
        seconds = []
        for cls in (CAME, RefCAME):
            ps = [p.clone().requires_grad_() for p in params]
            for p in ps:
                p.grad = torch.randn_like(p)
            seconds.append(timeit(cls(ps, lr=2e-5).step))
            del ps
        report(f"CAME step, {sum(p.numel() for p in params) / 1e6:.0f}M params", *seconds)
        del params
        kwargs = {k: v for k, v in weights.diffusers_config(config).items() if not k.startswith("_")}
        ref = PixArtTransformer2DModel(**kwargs).to(device)
        ours = weights.load_checkpoint(ref.state_dict(), config).to(device).train()
        ref_fn = lambda x, t, y, mask: ref(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask).sample
        cases = [(512, 32), (1024, 8)] if cuda else [(256, 2)]  # (pixels, batch)
        for px, N in cases:
            side = px // 8
            x0 = torch.randn(N, 4, side, side, device=device)
            t = torch.randint(0, 1000, (N,), device=device)
            y = torch.randn(N, 300, 4096, device=device)
            mask = torch.zeros(N, 300, device=device)
            mask[:, :60] = 1
            autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cuda)

            def step(model, opt, y=y, mask=mask):
                with autocast:
                    loss = diffusion.training_losses(model, x0, t, y, mask)["loss"].mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            o_ours, o_ref = CAME(ours.parameters(), lr=2e-5), CAME(ref.parameters(), lr=2e-5)
            for ckpt in ([False, True] if cuda else [False]):
                ours.gradient_checkpointing = ckpt
                ref.enable_gradient_checkpointing() if ckpt else ref.disable_gradient_checkpointing()
                s_ours = timeit(lambda: step(ours, o_ours, *diffusion.drop_padding(y, mask)))  # as train.py cuts it
                s_ref = timeit(lambda: step(lambda *a: ref_fn(*a), o_ref))
                label = f"train step {px}² batch {N}{' bf16' if cuda else ''}{' +grad ckpt' if ckpt else ''}"
                report(label, s_ours, s_ref)
                T, D = side * side // 4, config.hidden_size
                flops = 3 * N * (2 * 0.52e9 * T + config.depth * 4 * T * T * D)  # fwd + bwd ≈ 3 forwards (a backward costs ~2)
                print(f"{'':<48} {N / s_ours:8.1f} images/s"
                      + (f", MFU {flops / s_ours / 989e12:5.1%} of 989 TFLOP/s" if cuda else ""), flush=True)
            if cuda:
                compiled = copy.deepcopy(ours).compile_blocks()  # train.py --compile: each block (regional)
                s_c = timeit(lambda: step(compiled, CAME(compiled.parameters(), lr=2e-5), *diffusion.drop_padding(y, mask)),
                             warmup=2)
                report(f"  + torch.compile", s_c, s_ref)
            del o_ours, o_ref
        if cuda:  # on-the-fly encoding, per image, that a feature cache saves (T5-XXL bf16 + SDXL VAE encode)
            import t5
            import vae
            text = t5.T5Encoder(t5.T5Config()).to(device, torch.bfloat16).eval()
            ae = vae.AutoencoderKL().to(device, torch.bfloat16).eval()
            ids = torch.randint(0, 32000, (8, 300), device=device)
            with torch.no_grad():
                for px in (512, 1024):
                    img = torch.randn(8, 3, px, px, device=device, dtype=torch.bfloat16)
                    enc = timeit(lambda: (text(ids, (ids > 0).long()), ae.encode(img)))
                    print(f"on-the-fly T5 + VAE encode {px}²: {enc / 8 * 1e3:8.1f} ms per image (0 with --cache)")


SECTIONS["train"] = bench_train


LORA_STEP = """
import re, sys, time, torch
sys.path.insert(0, {root!r})
import diffusion, lora, sigma
from came import CAME
hwm = lambda: int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 2**20  # GiB
torch.manual_seed(0)
model = sigma.PixArtSigma(sigma.SigmaConfig(depth=4, hidden_size=384, num_heads=6)).train()
if {rank}:
    lora.add(model, {rank}, {rank})
params = [p for p in model.parameters() if p.requires_grad]
opt = CAME(params, lr=2e-5) if {came} else torch.optim.AdamW(params, lr=1e-4)
x0, t, y = torch.randn(2, 4, 32, 32), torch.randint(0, 1000, (2,)), torch.randn(2, 300, 4096)
mask = torch.zeros(2, 300)
mask[:, :60] = 1
y, mask = diffusion.drop_padding(y, mask)  # as train.py cuts it
def step():
    diffusion.training_losses(model, x0, t, y, mask)["loss"].mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
base = hwm()
step()  # warm-up; allocates the optimizer state
times = []
for _ in range(5):
    t0, c0 = time.perf_counter(), time.process_time()
    step()
    times.append((time.perf_counter() - t0, time.process_time() - c0))
print(sum(p.numel() for p in params), *min(times), hwm() - base)  # the fastest step: the least disturbed
"""


def bench_lora():
    """LoRA vs full fine-tuning. The adapter's size on disk for XL/2 (rank 16, both target sets); then one
    training step (IDDPM loss, backward, optimizer) of the small DiT at 256², batch 2, each in a fresh process:
    wall and CPU seconds, and the peak resident memory it adds above the model's weights (gradients, optimizer
    state, activations)."""
    import subprocess
    import tempfile
    import lora
    import sigma

    with torch.device("meta"):
        model = sigma.PixArtSigma(sigma.CONFIGS["1024"])
    model = model.to_empty(device="cpu")  # no init work: only the adapters' files are measured
    for targets in ("blocks", "all"):
        m = lora.add(model, 16, 16, targets)
        with tempfile.TemporaryDirectory() as tmp:
            lora.save(m, tmp)
            size = os.path.getsize(os.path.join(tmp, "adapter_model.safetensors"))
        n = sum(v.numel() for v in lora.adapters(m).values())
        print(f"XL/2 LoRA rank 16, targets {targets!r}: {n / 1e6:.2f}M parameters, adapter_model.safetensors "
              f"{size / 1e6:.1f} MB (fp32)", flush=True)
        for name, module in list(m.named_modules()):  # unwrap for the next target set
            for leaf, child in list(module.named_children()):
                if isinstance(child, lora.LoRA):
                    setattr(module, leaf, child.base)
    del model, m
    root = os.path.join(os.path.dirname(__file__), "..")
    for label, rank, came in [("full fine-tuning, CAME", 0, True), ("full fine-tuning, AdamW", 0, False),
                              ("LoRA rank 16, AdamW", 16, False)]:
        out = subprocess.run([sys.executable, "-c", LORA_STEP.format(root=root, rank=rank, came=came)],
                             capture_output=True, text=True, check=True)
        n, wall, cpu, gib = map(float, out.stdout.split()[-4:])
        print(f"train step small DiT 256² batch 2, {label:<24} {n / 1e6:6.2f}M trained: {wall:.3f} s wall, "
              f"{cpu:.3f} s CPU, peak RSS +{gib:.3f} GiB", flush=True)


SECTIONS["lora"] = bench_lora

def bench_vae():
    """VAE decode, SDXL config, same random weights and latents: ours (load_vae: channels_last on CPU) vs
    diffusers' AutoencoderKL. CPU: fp32 decode of a 32² latent (256 px), then peak memory of 1024²/2048² decodes
    with and without tiling (fresh subprocesses). GPU: bf16 decodes at 1024² and 4096² (tiled), time and peak."""
    import tempfile
    from diffusers import AutoencoderKL
    import vae as vaelib
    import weights

    c, cuda = vaelib.SDXL, torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    ref = AutoencoderKL(block_out_channels=c.block_out_channels, layers_per_block=c.layers_per_block,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        scaling_factor=c.scaling_factor, sample_size=1024).eval()  # tiles of 1024 px, as ours
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = weights.load_vae(tmp, dtype=dtype, device=device)
    ref = ref.to(device, dtype) if cuda else ref  # (.to() would only print a dtype warning on CPU)
    for side, tiled in ([(1024, False), (4096, True)] if cuda else [(256, False)]):
        z = torch.randn(1, 4, side // 8, side // 8, device=device, dtype=dtype)
        ref.enable_tiling() if tiled else ref.disable_tiling()
        cpu = {}
        for name, fn in [("ours", lambda: ours.decode(z, tiled=tiled)), ("ref", lambda: ref.decode(z / c.scaling_factor))]:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.process_time()
            cpu[name] = (timeit(fn, repeat=2), (time.process_time() - t0) / 3,
                         torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0)
        report(f"VAE decode {side}² px{' tiled' if tiled else ''}, {str(dtype)[6:]}", cpu["ours"][0], cpu["ref"][0])
        print(f"  {'peak GPU memory' if cuda else 'CPU seconds per decode'}: ours "
              f"{cpu['ours'][2 if cuda else 1]:.2f}, reference {cpu['ref'][2 if cuda else 1]:.2f}", flush=True)
    if cuda:
        return
    # 2048² untiled: ~4x the activations of 1024² (~12 GiB in fp32) and half an hour on 2 shared cores;
    # set VAE_BENCH_ALL=1 to run it anyway.
    cases = [(1024, False), (1024, True), (2048, True)] + [(2048, False)] * (os.environ.get("VAE_BENCH_ALL") == "1")
    for side, tiled in cases:
        t0 = time.perf_counter()
        gib = peak_rss_gib(f"import vae; m = vae.AutoencoderKL().eval().to(memory_format=torch.channels_last); "
                           f"torch.set_grad_enabled(False); m.decode(torch.randn(1, 4, {side // 8}, {side // 8}), "
                           f"tiled={tiled})")
        print(f"VAE decode {side}² px {'tiled  ' if tiled else 'untiled'} fp32 CPU: peak RSS +{gib:.2f} GiB "
              f"(weights 0.31 GiB), {time.perf_counter() - t0:.0f} s", flush=True)


SECTIONS["vae"] = bench_vae

if __name__ == "__main__":
    names = sys.argv[1:] or list(SECTIONS)
    for name in names:
        if name not in SECTIONS:
            sys.exit(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}")
    for name in names:
        with torch.inference_mode():
            SECTIONS[name]()

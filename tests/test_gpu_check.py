"""bench/gpu_check.py --dry: every section of the GPU check runs on the CPU (tiny configs), so the one command that
gets a few minutes of a GPU cannot fail on a typo, and its parity checks hold here too."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.join(os.path.dirname(HERE), "bench")  # the GPU check is a script there, not a test
sys.path.insert(0, BENCH)


@pytest.mark.slow  # ~45 s on 2 cores: every section's models built and run once (CI runs the slow tests too)
def test_gpu_check_dry_runs_every_section(tmp_path):
    res = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_check.py"), "--dry", "--out", str(tmp_path),
                          "--budget", "900"], capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    report = json.load(open(tmp_path / "gpu_check.json"))
    failed = {k: v["status"] for k, v in report["sections"].items() if v["status"] != "ok"}
    assert res.returncode == 0 and not failed, (failed, res.stdout[-4000:])
    import gpu_check
    assert list(report["sections"]) == [name for name, _, _ in gpu_check.SECTIONS]
    # the correctness rows: each judged against the reference in this very run
    goals = [r["goal"] for r in report["rows"] if r["section"] in ("dit", "kv", "pipeline", "lora", "ddp")]
    assert len(goals) == 8 and all(g.endswith(": ok") for g in goals), goals
    compiled = [r for r in report["rows"] if r["what"].startswith("compiled vs fp32")]  # regional compile = eager
    assert len(compiled) == 1 and compiled[0]["goal"].endswith(": ok"), compiled
    # the table comes last, and the log holds everything printed
    assert res.stdout.rstrip().splitlines()[-1].startswith("ratio: reference time / ours")
    assert "sigma GPU check: " in open(tmp_path / "gpu_check.log").read()


def test_gpu_check_refuses_bad_sections_and_a_missing_gpu(tmp_path):
    script = os.path.join(BENCH, "gpu_check.py")
    res = subprocess.run([sys.executable, script, "--dry", "--only", "dit,warp"], capture_output=True, text=True)
    assert res.returncode == 2 and "unknown section(s) warp" in res.stderr
    res = subprocess.run([sys.executable, script, "--out", str(tmp_path)], capture_output=True, text=True,
                         env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert res.returncode == 2 and "no CUDA device here" in res.stderr


def test_without_diffusers_ours_is_timed_alone(tmp_path):
    """The GPU machine may lack diffusers: the check then times ours alone and says so, and the parity checks that
    need it are skipped by name, not failed."""
    (tmp_path / "hide").mkdir()
    (tmp_path / "hide" / "diffusers.py").write_text("raise ImportError('hidden for this test')\n")
    res = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_check.py"), "--dry", "--out", str(tmp_path / "out"),
                          "--only", "env,dit,forward", "--sides", "64"], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(tmp_path / "hide")))
    report = json.load(open(tmp_path / "out" / "gpu_check.json"))
    assert res.returncode == 0, res.stdout[-3000:]
    assert "diffusers NOT INSTALLED (ours alone)" in res.stdout
    assert report["sections"]["dit"]["status"] == "skipped: diffusers not installed"
    forward = [r for r in report["rows"] if r["section"] == "forward"]
    assert len(forward) == 3 and all(r["ref"] is None and r["ours"] > 0 for r in forward)  # ours, all 300 tokens, KV


def test_kernel_kinds_of_real_cuda_kernel_names():
    """The profile's split by kind, on kernel names the CUDA profiler prints (cuBLAS/cuDNN/flash/efficient attention,
    elementwise, inductor's fused Triton kernels): the efficient-attention kernel says "cutlass" too, and is attention."""
    import gpu_check
    names = {"fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel)": "attention",
             "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<72>>": "attention",
             "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3": "attention",
             "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1": "matmul",
             "nvjet_tst_192x192_64x3_1x2_h_bz_coopA_TNN": "matmul",
             "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x2_tn_align8>": "matmul",
             "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>": "other",
             "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>": "other",
             "triton_poi_fused_add_mul_native_layer_norm_0": "other"}
    assert {name: gpu_check.kernel_kind(name) for name in names} == names

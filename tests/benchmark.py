"""Speed benchmarks: this code against the reference implementations, same weights, same inputs.

A script, not a test:  python tests/benchmark.py [section ...]   (no section = all of them)
Every section times ours and the reference in one run and prints the ratio ours/reference.
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


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

import os
import sys

import pytest
import torch

# Tests import the flat top-level modules (sigma, diffusion, ...) from the repository root.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
# Nothing in the tests may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long test that still runs in CI (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "bf16_attention: runs torch's bfloat16 attention (skipped where it cannot run)")


def pytest_collection_modifyitems(config, items):
    """torch's bfloat16 attention raises 'pack_vnni2 is only supported when avx512 is supported' on an AVX-512 CPU
    whose kernels ATEN_CPU_CAPABILITY forces lower (default, avx2), at 300 tokens (not at 16): torch's limit, not ours.
    There the tests that run it are skipped, saying so."""
    marked = [item for item in items if "bf16_attention" in item.keywords]
    if not marked:
        return
    q = torch.zeros(1, 1, 300, 64, dtype=torch.bfloat16)
    try:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    except RuntimeError as e:
        for item in marked:
            item.add_marker(pytest.mark.skip(reason=f"torch's bf16 attention here: {e}"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices and convolutions: one thread is as fast, and immune to a busy machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def free_port():
    """A TCP port free right now, for torchrun's rendezvous: a fixed one collides with any other run on the machine."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])

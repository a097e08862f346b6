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

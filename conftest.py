"""Fixtures for every test folder of the repository (kvagents' tests and the integration packages' tests)."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny models run faster on one thread (and do not fight parallel jobs); real models keep all threads."""
    import torch

    if request.node.get_closest_marker("real_model"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

import pytest
import torch

from selfforcing.models.wan import CausalWanModel, preset


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Re-draw every parameter so no LayerNorm/RMSNorm weight is trivially 1 (tests see all of them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


@pytest.fixture
def tiny_model() -> CausalWanModel:
    torch.manual_seed(0)
    return randomize_(CausalWanModel(preset("tiny"))).eval()


@pytest.fixture(scope="module")
def single_thread():
    """For modules of tiny tensors: thread start-up and contention would dominate the run time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

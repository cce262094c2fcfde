import pytest
import torch

from factories import randomize_
from selfforcing.models.wan import CausalWanModel, preset


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

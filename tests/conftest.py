import pytest
import torch

from factories import TINY, randomize_
from selfforcing.models.wan import CausalWanModel, WanConfig, preset


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


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """A random tiny bidirectional 'teacher' saved in diffusers layout (training and DMD tests)."""
    torch.manual_seed(123)
    model = CausalWanModel(WanConfig.from_dict({**preset("toy").to_dict(), **TINY}))
    path = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(path)
    return path

import time

import pytest
import torch

from factories import TINY, randomize_
from selfforcing import threads
from selfforcing.models.wan import CausalWanModel, WanConfig, preset


@pytest.fixture
def tiny_model() -> CausalWanModel:
    torch.manual_seed(0)
    return randomize_(CausalWanModel(preset("tiny"))).eval()


@pytest.fixture(scope="session", autouse=True)
def thread_count():
    """One thread count for the whole suite, chosen as the product chooses it (``selfforcing.threads``:
    the cores other programs leave free, read over half a second) and fixed through
    OMP_NUM_THREADS, which every command and subprocess of the suite then keeps: the runs a test
    compares bit for bit share it. With one core of two busy, the suite at torch's two threads took
    36 min against 12 idle on the machine of issue 29; on the development machine, 6 min 31 s
    before this policy and 4 min 49 s with it (docs/PERFORMANCE.md, "Threads on a shared machine")."""
    count = threads.env_threads()
    if count is None:
        policy = threads.ThreadPolicy()
        time.sleep(threads.MIN_WINDOW_S * 2)
        count = policy.adapt(torch.device("cpu")) or torch.get_num_threads()
    torch.set_num_threads(count)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", str(count))
        yield count


@pytest.fixture(scope="module")
def single_thread():
    """For modules of tiny tensors: thread start-up and contention would dominate the run time."""
    with threads.policy(requested=1):
        yield


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """A random tiny bidirectional 'teacher' saved in diffusers layout (training and DMD tests)."""
    torch.manual_seed(123)
    model = CausalWanModel(WanConfig.from_dict({**preset("toy").to_dict(), **TINY}))
    path = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(path)
    return path

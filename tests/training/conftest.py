"""Tiny training setups shared by the training tests."""

import pytest
import torch

from factories import TINY
from selfforcing.models import CausalWanModel, WanConfig, preset


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """A random tiny bidirectional 'teacher' saved in diffusers layout."""
    torch.manual_seed(123)
    model = CausalWanModel(WanConfig.from_dict({**preset("toy").to_dict(), **TINY}))
    path = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(path)
    return path

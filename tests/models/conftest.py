"""Tiny text-encoder setups shared by the model tests."""

import pytest

from factories import write_tiny_umt5


@pytest.fixture(scope="module")
def umt5_dir(tmp_path_factory):
    """A tiny random UMT5 encoder saved in a diffusers pipeline layout."""
    root = tmp_path_factory.mktemp("wan")
    write_tiny_umt5(root)
    return root

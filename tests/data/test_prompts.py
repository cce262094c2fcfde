"""Tests for prompt files and the prompt dataset."""

import pytest

from selfforcing.data.prompts import PromptDataset, read_prompts
from selfforcing.errors import SelfForcingError


def write(tmp_path, text):
    path = tmp_path / "prompts.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_read_prompts_strips_and_skips_blank_and_comment_lines(tmp_path):
    path = write(tmp_path, "# animals\n  a cat plays piano  \n\n\t\n   # indented comment\na red fox\r\n")
    assert read_prompts(path) == ["a cat plays piano", "a red fox"]


def test_read_prompts_missing_file_is_named(tmp_path):
    with pytest.raises(SelfForcingError, match="nope.txt does not exist"):
        read_prompts(tmp_path / "nope.txt")


@pytest.mark.parametrize("text", ["", "\n  \n", "# only a comment\n\n"])
def test_read_prompts_without_prompts(tmp_path, text):
    with pytest.raises(SelfForcingError, match="no prompts in .*prompts.txt"):
        read_prompts(write(tmp_path, text))


def test_prompt_dataset_keeps_order_without_seed():
    dataset = PromptDataset(["a", "b", "c"])
    assert len(dataset) == 3
    assert [dataset[i] for i in range(3)] == [
        {"prompt": "a", "index": 0}, {"prompt": "b", "index": 1}, {"prompt": "c", "index": 2},
    ]


def test_prompt_dataset_seed_gives_a_fixed_permutation():
    prompts = [f"prompt {i}" for i in range(50)]
    items = [PromptDataset(prompts, seed=3)[i] for i in range(50)]
    assert items == [PromptDataset(prompts, seed=3)[i] for i in range(50)]
    assert [item["index"] for item in items] != list(range(50))
    assert sorted(item["index"] for item in items) == list(range(50))
    assert all(item["prompt"] == prompts[item["index"]] for item in items)
    assert [PromptDataset(prompts, seed=4)[i] for i in range(50)] != items


@pytest.mark.parametrize("prompts", [[], "a single string", ["ok", "  "], ["ok", None]])
def test_prompt_dataset_rejects_bad_prompts(prompts):
    with pytest.raises(SelfForcingError):
        PromptDataset(prompts)

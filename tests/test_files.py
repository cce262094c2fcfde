"""Reading the text files users hand the program: bad encodings, bad syntax, deep nesting and
YAML aliases that expand without bound are each one line naming the file."""

import time

import pytest

from selfforcing.errors import SelfForcingError
from selfforcing.files import MAX_YAML_VALUES, load_json, load_yaml, parse_json, parse_yaml


def billion_laughs(levels: int) -> str:
    """Nine aliases of nine aliases of ...: 9**levels values from a few hundred bytes."""
    text = "l0: &l0 [x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, levels):
        text += f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n"
    return text + f"steps: *l{levels - 1}\n"


def test_yaml_aliases_are_values_like_any_other_up_to_the_limit():
    assert parse_yaml("base: &b {lr: 0.001}\nrun: *b\n", "cfg") == {"base": {"lr": 0.001}, "run": {"lr": 0.001}}
    assert len(parse_yaml(billion_laughs(4), "cfg")["steps"]) == 9  # 9**4 values: fine
    assert parse_yaml("", "cfg") is None


def test_a_billion_laughs_is_refused_at_once():
    started = time.perf_counter()
    with pytest.raises(SelfForcingError, match=f"cannot parse cfg.yaml: it expands to more than {MAX_YAML_VALUES:,}"):
        parse_yaml(billion_laughs(10), "cfg.yaml")  # 9**10 = 3.5e9 values
    assert time.perf_counter() - started < 2


@pytest.mark.parametrize("parse", [parse_json, parse_yaml])
def test_nesting_deeper_than_the_parser_recurses_is_named(parse):
    with pytest.raises(SelfForcingError, match="cannot parse deep: nested too deeply"):
        parse("[" * 200_000, "deep")


def test_a_recursive_alias_and_bad_syntax_are_named():
    with pytest.raises(SelfForcingError, match="line 1: an alias refers to a value that holds it"):
        parse_yaml("steps: &s [1, *s]\n", "cfg.yaml")
    with pytest.raises(SelfForcingError, match=r"cannot parse cfg.yaml: line 2, column 1: expected ',' or ']'"):
        parse_yaml("steps: [1, 2\n", "cfg.yaml")
    with pytest.raises(SelfForcingError, match="cannot parse x.json: line 1, column 2"):
        parse_json("{", "x.json")


def test_a_file_that_is_not_utf8_is_named_with_the_byte(tmp_path):
    for load, name in [(load_yaml, "cfg.yaml"), (load_json, "config.json")]:
        (tmp_path / name).write_bytes(b"name: \xe9t\xe9\n")
        with pytest.raises(SelfForcingError, match=rf"cannot read .*{name}: not UTF-8 text \(byte 0xe9 at offset 6\)"):
            load(tmp_path / name)
    with pytest.raises(SelfForcingError, match="cannot read .*missing.yaml: No such file"):
        load_yaml(tmp_path / "missing.yaml")

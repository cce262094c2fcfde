"""Reading the small text files a user hands the program: training configs, experiment plans,
model ``config.json`` files, cache indexes. One place decides what a bad one looks like: a file
that is not UTF-8, is not valid JSON or YAML, is nested deeper than the parsers recurse, or (YAML
aliases repeating aliases: a "billion laughs") expands past any config's size. Each is named in
one line, before the value reaches code that would walk or print it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from selfforcing.errors import SelfForcingError

# Values (scalars, lists, mappings) a YAML document may expand to, aliases counted at each use.
# The largest shipped config has a few hundred; ten aliases of ten aliases of ... reach billions.
MAX_YAML_VALUES = 100_000


def read_text(path: str | Path) -> str:
    """``path``'s text, which must be UTF-8."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SelfForcingError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SelfForcingError(f"cannot read {path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                               f"{e.start})") from None


def load_json(path: str | Path) -> Any:
    """The JSON value in the file ``path``."""
    return parse_json(read_text(path), str(path))


def parse_json(text: str, source: str) -> Any:
    """The JSON value in ``text``; ``source`` names it in errors."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SelfForcingError(f"cannot parse {source}: line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise SelfForcingError(f"cannot parse {source}: nested too deeply") from None


def load_yaml(path: str | Path) -> Any:
    """The YAML value in the file ``path``."""
    return parse_yaml(read_text(path), str(path))


def parse_yaml(text: str, source: str) -> Any:
    """The value of the one YAML document in ``text`` (safe types only); ``source`` names it in errors."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}, set(), source) > MAX_YAML_VALUES:
            raise SelfForcingError(f"cannot parse {source}: it expands to more than {MAX_YAML_VALUES:,} values "
                                   "(aliases repeating aliases)")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise SelfForcingError(f"cannot parse {source}: {yaml_problem(e)}") from None
    except RecursionError:
        raise SelfForcingError(f"cannot parse {source}: nested too deeply") from None
    finally:
        loader.dispose()


def yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's message spans several lines with a source excerpt: keep the place and the problem."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int], source: str) -> int:
    """How many values ``node`` becomes once every alias is expanded, counting each shared node
    once (linear in the document, not in its expansion). A node inside itself is refused."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        mark = node.start_mark
        raise SelfForcingError(f"cannot parse {source}: line {mark.line + 1}: an alias refers to a value that holds it")
    open_nodes.add(key)
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = []
    size = 1
    for child in children:
        size += _expanded_size(child, sizes, open_nodes, source)
        if size > MAX_YAML_VALUES:  # stop counting: the answer is already known
            break
    open_nodes.discard(key)
    sizes[key] = size
    return size

"""The command line as a new user meets it: every option explained, the README's synopses whole."""

import argparse
import re
from pathlib import Path

import pytest

from selfforcing.cli import build_parser

README = Path(__file__).parents[1] / "README.md"
GLOBAL = {"-h", "--help", "--debug", "--threads"}  # every command takes them; the README says so once


def _commands(parser: argparse.ArgumentParser, name: str = "selfforcing"):
    """(command line, parser) of every command and subcommand."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                yield from _commands(subparser, f"{name} {sub}")


def test_every_argument_of_every_command_says_what_it_is():
    missing = [f"{name} {action.option_strings or action.dest}" for name, parser in _commands(build_parser())
               for action in parser._actions
               if not action.help and not isinstance(action, (argparse._SubParsersAction, argparse._HelpAction))]
    assert not missing


@pytest.mark.parametrize("command", ["generate", "serve", "data encode"])
def test_the_readme_synopsis_lists_every_option(command):
    block = README.read_text().split("## Commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    synopsis = next(line for line in block.splitlines() if line.startswith(f"selfforcing {command} "))
    parser = dict(_commands(build_parser()))[f"selfforcing {command}"]
    listed = set(re.findall(r"(?<![\w-])--?[a-z][a-z-]*", synopsis))
    unlisted = [action.option_strings for action in parser._actions
                if action.option_strings and not set(action.option_strings) & (listed | GLOBAL)]
    assert not unlisted

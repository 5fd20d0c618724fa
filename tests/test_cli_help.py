"""Every option of every subcommand has help, and states its default once (in process)."""

from __future__ import annotations

import argparse
import re

import pytest

from metarec.cli import build_parser

PARSER = build_parser()
SUBCOMMANDS = next(a for a in PARSER._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_option_has_help_and_one_default(name):
    sub = SUBCOMMANDS[name]
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        flag = action.option_strings[-1]
        assert action.help, f"metarec {name} {flag}: no help"
    text = " ".join(sub.format_help().split())  # unwrapped
    for flag_help in re.split(r"\s(?=--?[a-z])", text):
        assert flag_help.count("default") <= 1, f"metarec {name}: {flag_help!r}"
    assert "(default: None)" not in text and "(default: False)" not in text

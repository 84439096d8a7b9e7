"""Help that reads well: every option of every subcommand has help text, one metavar style (UPPER_CASE),
no reStructuredText backticks, and every default a user would otherwise have to guess is shown."""

import argparse
import re

import pytest

from minillm.cli import build_parser, main


def all_parsers(parser, path=("minillm",)):
    """(command path, parser) for the parser and every subparser under it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from all_parsers(sub, (*path, name))


PARSERS = list(all_parsers(build_parser()))


def options(parser):
    return [a for a in parser._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


@pytest.mark.parametrize("path, parser", PARSERS, ids=[" ".join(p) for p, _ in PARSERS])
def test_every_option_reads_well(path, parser):
    problems = []
    for action in options(parser):
        name = "/".join(action.option_strings) or action.dest
        text = action.help or ""
        if not text.strip():
            problems.append(f"{name}: no help")
        if "`" in text:
            problems.append(f"{name}: backticks in {text!r}")
        takes_value = action.nargs != 0 and not isinstance(action, argparse._VersionAction)
        if takes_value and not action.choices:
            metavar = action.metavar if action.metavar is not None else action.dest.upper()
            if not isinstance(metavar, str) or not re.fullmatch(r"[A-Z][A-Z0-9_]*", metavar):
                problems.append(f"{name}: metavar {metavar!r} is not UPPER_CASE")
            if action.option_strings and action.metavar is None:
                problems.append(f"{name}: no explicit metavar")
        shown = action.default not in (None, False, [], argparse.SUPPRESS)
        said = "default" in text or (not action.option_strings      # a positional may name its default
                                     and re.search(rf"(?<![\w-]){re.escape(str(action.default))}(?![\w-])", text))
        if takes_value and shown and not said:
            problems.append(f"{name}: default {action.default!r} not shown in {text!r}")
    for text in (parser.description or "", parser.epilog or ""):
        if "``" in text:
            problems.append(f"description has backticks: {text[:60]!r}")
    assert not problems, f"minillm {' '.join(path[1:])}: " + "; ".join(problems)


def test_every_command_prints_its_help(capsys):
    for path, _ in PARSERS:
        with pytest.raises(SystemExit) as exit_info:
            main([*path[1:], "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: minillm") and "`" not in out


def test_version(capsys):
    from minillm import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"minillm {__version__}\n"

"""Calling ``minillm`` in-process, as the command-line tests do (``from cli_helpers import run, usage_error``)."""

import pytest

from minillm.cli import main


def run(argv):
    """``minillm ARGV...`` (any items, made strings, e.g. paths): its exit code."""
    return main([str(a) for a in argv])


def usage_error(argv, capsys):
    """argparse rejects ``argv``: exit code 2; returns the message."""
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err

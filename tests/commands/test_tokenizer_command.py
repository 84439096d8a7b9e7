"""`minillm tokenizer train|encode|decode`, driven through argparse as cli.py does."""

import argparse
import io
import json
import runpy
import sys
from pathlib import Path

import pytest

from minillm.tokenizer import BPETokenizer
from minillm.commands import tokenizer as tokenizer_command

TEXT = "Hello world! Hello tokenizer.\nSecond line, with ünïcödé and 日本語.\r\n" * 50


def run(argv, stdin=""):
    parser = argparse.ArgumentParser(prog="minillm")
    tokenizer_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    old_in, old_out = sys.stdin, sys.stdout
    sys.stdin, sys.stdout = io.StringIO(stdin), io.StringIO()
    try:
        assert args.func(args) == 0
        return sys.stdout.getvalue()
    finally:
        sys.stdin, sys.stdout = old_in, old_out


def test_train_encode_decode(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(TEXT, encoding="utf-8", newline="")
    b.write_text(TEXT.upper(), encoding="utf-8", newline="")
    out = tmp_path / "tok.json"
    run(["tokenizer", "train", "--input", str(a), str(b), "--vocab-size", "300", "--out", str(out),
         "--special-token", "<|endoftext|>", "--quiet"])
    tok = BPETokenizer.load(out)
    assert tok.vocab_size == 300 and tok.special_tokens == {"<|endoftext|>": 299}

    ids = [int(x) for x in run(["tokenizer", "encode", "--tokenizer", str(out), str(a)]).split()]
    assert ids == tok.encode(TEXT)
    from_stdin = json.loads(run(["tokenizer", "encode", "--tokenizer", str(out), "--json",
                                 "--allowed-special", "all"], stdin="hi<|endoftext|>"))
    assert from_stdin[-1] == 299
    assert run(["tokenizer", "decode", "--tokenizer", str(out)], stdin=" ".join(map(str, ids))) == TEXT
    assert run(["tokenizer", "decode", "--tokenizer", str(out)], stdin=json.dumps(from_stdin)) == "hi<|endoftext|>"


def test_encode_with_bytes_tokenizer():
    assert run(["tokenizer", "encode", "--tokenizer", "bytes"], stdin="hé").split() == ["104", "195", "169"]


def test_encode_refuses_special_token_by_default():
    spec = BPETokenizer.bytes(["<|endoftext|>"])
    with pytest.raises(ValueError, match="special token"):
        spec.encode("a<|endoftext|>")
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        run(["tokenizer", "encode", "--tokenizer", "gpt2:/nonexistent"], stdin="x")


def test_example_runs(capsys):
    example = Path(__file__).resolve().parents[2] / "examples" / "02_tokenizer.py"
    runpy.run_path(str(example), run_name="example")["main"]([])      # [] : not pytest's own sys.argv
    assert "saved and reloaded" in capsys.readouterr().out


def test_standard_input_gives_the_ids_of_the_same_file(tmp_path, monkeypatch, capsys):
    """`minillm tokenizer encode < FILE` and `minillm tokenizer encode FILE` agree, \\r\\n line endings included
    (standard input is read as bytes, as the file is; text-mode stdin would turn \\r\\n into \\n)."""
    from minillm.cli import main

    path = tmp_path / "crlf.txt"
    path.write_bytes(TEXT.encode("utf-8"))                      # TEXT ends its second line with \r\n
    assert main(["tokenizer", "encode", "--tokenizer", "bytes", str(path)]) == 0
    from_file = capsys.readouterr().out
    assert from_file.split() == [str(b) for b in TEXT.encode("utf-8")]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(path.read_bytes()), encoding="utf-8"))
    assert main(["tokenizer", "encode", "--tokenizer", "bytes"]) == 0
    assert capsys.readouterr().out == from_file

"""The ``minillm`` command line: one module per subcommand, each holding its parser and handler.

    train.py      minillm train
    generate.py   minillm generate
    tokenizer.py  minillm tokenizer train|encode|decode
    bench.py      minillm bench tokenizer|train|generate|ops
    plot.py       minillm plot
    argtypes.py   argument types that parse one value or say clearly why not
    common.py     the shared parser formatter, common options and messages

Each command module exposes ``register(subparsers)``, which adds its parser(s)
with ``set_defaults(func=handler)``; a handler takes the parsed namespace,
validates before it starts work, calls into the library and returns an exit
code. Handlers raise ``ValueError`` (bad input) or let ``OSError`` through;
``minillm/cli.py`` registers every module and turns those into one line.
Library packages hold no argparse. To add ``minillm NAME``: write
``commands/NAME.py`` with ``register`` and add it to ``cli.COMMANDS``.
"""

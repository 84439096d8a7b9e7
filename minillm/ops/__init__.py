"""Ops, one file per family. Each op is a ``Function`` subclass with ``forward``
and a hand-written ``backward`` side by side; the module-level function of the
same name (lower case) is the public entry point re-exported by ``functional``."""

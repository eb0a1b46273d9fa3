"""`tune`: the command line. Each command parses its flags, calls one library function, and renders
the result; `common` holds the app, the consoles and the one-line error handling they share.

Importing the command modules registers their commands on `app`, in the order `tune --help` lists
them (commands first, then the `logs` and `rpc` groups)."""

from pipeline.cli import run, zoo, predict, roofline, tracking, logs, nightly, rpc  # noqa: F401,I001
from pipeline.cli.common import app

__all__ = ["app"]

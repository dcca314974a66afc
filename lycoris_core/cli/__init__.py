"""Command line: ``python -m lycoris_core {demo, train, estimate, sample, inspect, convert,
make-tiny} ...`` (``lycoris_core/__main__.py`` is the entry point).

Errors of this library are printed as one line (type and message, which carries the fix)
and exit with status 2; anything else is a bug and keeps its traceback. Output paths are
checked before any model loads or any work starts.

Modules: :mod:`.parser` (every sub-command's arguments), :mod:`.files` (make-tiny, inspect,
convert), :mod:`.sample`, :mod:`.train` (train, demo) and :mod:`.estimate`. Importing this
package does not import torch; building the parser does (the convert layouts and the demo's
defaults come from modules that need it), and each command imports the rest when it runs.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from ..errors import LycorisError
from .parser import build_parser

__all__ = ["build_parser", "main", "one_line"]


def one_line(text: str) -> str:
    """A multi-line message as one line (the CLI prints every error on one line)."""
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: ``sys.argv[1:]``), run the sub-command; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except LycorisError as exc:
        print(f"error: {type(exc).__name__}: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0

"""``python -m lycoris_core ...``: the command line, which lives in :mod:`lycoris_core.cli`.

``main``, ``build_parser`` and ``one_line`` stay importable from here.
"""

from __future__ import annotations

import sys

from .cli import build_parser, main, one_line

__all__ = ["build_parser", "main", "one_line"]

if __name__ == "__main__":
    sys.exit(main())

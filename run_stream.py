#!/usr/bin/env python3
"""spade-stream command line: fit a memory bank, evaluate offline, run the live pipeline, demo.

The commands live in app/cli.py; `python run_stream.py --help` lists them.
"""

from __future__ import annotations

import sys

from app.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())

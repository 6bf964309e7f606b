"""The live pipeline's CLI commands (`run`, `demo`), registered by run_stream.py."""
from __future__ import annotations

LIVE_HANDLERS: dict = {}


def add_live_commands(sub, common) -> None:
    return None

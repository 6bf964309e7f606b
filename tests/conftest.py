import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

AVENUE = ROOT.parent / "shared" / "data" / "avenue_stc"

# Two cores are shared by the decode threads and torch: keep torch from oversubscribing them in tests.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def avenue_root():
    if not (AVENUE / "testing" / "frames").is_dir():
        pytest.skip(f"{AVENUE} is absent (real footage is optional)")
    return AVENUE


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """Footage, clips and a bank fitted with `base_cfg()`, built once per session (tests/helpers.py)."""
    from tests.helpers import shared_env

    return shared_env(tmp_path_factory)


@pytest.fixture(scope="module")
def detector(env):
    from detector.detector import Detector
    from tests.helpers import base_cfg

    return Detector.load(base_cfg(), env / "bank")


def pytest_terminal_summary(terminalreporter):
    """One line when tests skipped because a system service is missing, and how to install them."""
    reasons = []
    for rep in terminalreporter.stats.get("skipped", []):
        if isinstance(rep.longrepr, tuple) and len(rep.longrepr) == 3:
            reasons.append(str(rep.longrepr[2]))
    n = sum(("redis-server" in r or "RTSP" in r) for r in reasons)
    if n:
        terminalreporter.write_line(
            f"{n} test(s) skipped: redis-server and/or GStreamer's RTSP server not installed "
            "(`make system-deps` installs them; needs root)"
        )

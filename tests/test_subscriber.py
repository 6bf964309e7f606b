"""examples/subscriber.py against a real redis-server started by the test: it follows the alert stream
through idle gaps far longer than its XREAD block time and through a Redis restart, prints every
message exactly once (repeats of (alert_id, type, frame_index) are dropped), never prints the password,
and exits 0 on SIGTERM.

Knobs (environment):
  SUBSCRIBER_IDLE_S    idle gap in seconds (default 3; the issue's acceptance run uses 60)
  SUBSCRIBER_BLOCK_MS  the subscriber's --block-ms (default 200)
  SUBSCRIBER_SCRIPT    another subscriber to run instead of examples/subscriber.py (e.g. an old copy)
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sinks.base import AlertEvent
from sinks.schema import alert_message
from tests.servers import RedisServer, redis_available

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = os.environ.get("SUBSCRIBER_SCRIPT") or str(ROOT / "examples" / "subscriber.py")
IDLE_S = float(os.environ.get("SUBSCRIBER_IDLE_S", "3"))
BLOCK_MS = int(os.environ.get("SUBSCRIBER_BLOCK_MS", "200"))
PASSWORD = "sub-s3cr3t-pw"
KEY = "spade:alerts"

needs_redis = pytest.mark.skipif(not redis_available(), reason="redis-server not installed")
pytestmark = pytest.mark.timeout(60 + 2 * IDLE_S)


def message(alert_id: str, type_: str, frame_index: int) -> dict:
    """An alert message exactly as the sink builds it."""
    ev = AlertEvent(
        type_,
        alert_id,
        "gate",
        1700000000.4,
        None if type_ != "end" else 1700000003.0,
        4.0,
        snapshot=f"runs/x/{alert_id}.jpg",
        reason="recovered" if type_ == "end" else None,
        frame_index=frame_index,
    )
    return alert_message(ev)


def xadd(client, msg: dict) -> str:
    """XADD the way sinks/redis_sink.py does: one field `data` holding the compact JSON."""
    return client.xadd(KEY, {"data": json.dumps(msg, separators=(",", ":"))})


def _strict(const: str):
    raise ValueError(f"not strict JSON: {const}")


class Subscriber:
    """examples/subscriber.py --json as a subprocess; stdout lines are queued, stderr collected."""

    def __init__(self, url: str, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-u", SCRIPT, "--redis", url, "--json", "--block-ms", str(BLOCK_MS), *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue = queue.Queue()
        self.err: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines.put), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.err.append), daemon=True).start()

    @staticmethod
    def _pump(stream, sink) -> None:
        for line in iter(stream.readline, ""):
            sink(line.rstrip("\n"))

    @property
    def stderr(self) -> str:
        return "\n".join(self.err)

    def take(self, n: int, timeout: float = 10.0) -> list[dict]:
        """The next n printed messages (each line must be strict JSON)."""
        out, deadline = [], time.monotonic() + timeout
        while len(out) < n:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"got {len(out)} of {n} messages; alive={self.alive()}\nstderr:\n{self.stderr}")
            out.append(json.loads(line, parse_constant=_strict))
        return out

    def quiet(self, seconds: float) -> None:
        """Nothing is printed for `seconds`."""
        try:
            line = self.lines.get(timeout=seconds)
        except queue.Empty:
            return
        pytest.fail(f"unexpected output: {line}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self, timeout: float = 5.0) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"subscriber ignored SIGTERM\nstderr:\n{self.stderr}")


@pytest.fixture
def subscribers():
    started: list[Subscriber] = []

    def start(url: str, *extra: str) -> Subscriber:
        started.append(Subscriber(url, *extra))
        return started[-1]

    yield start
    for sub in started:
        if sub.alive():
            sub.proc.kill()
            sub.proc.wait()


@needs_redis
def test_follows_through_idle_gap_and_redis_restart(subscribers):
    # AOF with fsync on every write: the stream survives a SIGKILL, as a production Redis would keep it
    with RedisServer(password=PASSWORD, extra_args=["--appendonly", "yes", "--appendfsync", "always"]) as srv:
        c = srv.client(decode_responses=True)
        before = [message("gate-1", "new", 10), message("gate-1", "update", 14), message("gate-1", "end", 30)]
        for m in before:
            xadd(c, m)
        sub = subscribers(srv.url_with_auth())
        assert sub.take(3) == before  # replayed from the start (default --from 0), in order

        live = message("gate-2", "new", 50)
        xadd(c, live)
        assert sub.take(1) == [live]

        sub.quiet(IDLE_S)  # many block periods (and any socket timeout tied to them) with nothing new
        assert sub.alive(), f"subscriber died while idle:\n{sub.stderr}"
        after_idle = message("gate-2", "update", 55)
        last_id = xadd(c, after_idle)
        assert sub.take(1) == [after_idle]

        srv.kill()  # abrupt outage
        time.sleep(1.5)
        assert sub.alive(), f"subscriber died during the outage:\n{sub.stderr}"
        srv.start()  # same port, stream restored from the AOF
        assert c.xlen(KEY) == 5

        xadd(c, before[1])  # the producer redelivers one it had already sent: must not print again
        fresh = [message("gate-2", "end", 70), message("gate-3", "new", 90)]
        for m in fresh:
            xadd(c, m)
        assert sub.take(2, timeout=45) == fresh  # backoff is at most 30 s
        sub.quiet(1.0)  # nothing replayed from before the outage, nothing twice
        assert sub.alive()

        rc = sub.terminate()
        c.close()
    err = sub.stderr
    assert rc == 0, err
    assert "Traceback" not in err
    assert len([l for l in err.splitlines() if "lost Redis" in l]) == 1, err  # one line per outage...
    back = [l for l in err.splitlines() if "is back" in l]
    assert len(back) == 1 and f"resuming after id {last_id}" in back[0], err  # ...and one when back
    assert PASSWORD not in err


@needs_redis
def test_duplicates_are_printed_once_and_from_dollar_skips_history(subscribers):
    with RedisServer() as srv:
        c = srv.client(decode_responses=True)
        old = message("yard-1", "new", 3)
        xadd(c, old)
        replay = subscribers(srv.url)
        only_new = subscribers(srv.url, "--from", "$")
        assert replay.take(1) == [old]
        time.sleep(1.0)  # let `--from $` pin its start before anything new arrives

        a = message("yard-1", "update", 7)
        b = message("yard-1", "update", 8)  # same alert and type, another frame: a different message
        for m in (a, a, b, a, old):
            xadd(c, m)
        assert replay.take(2) == [a, b]
        assert only_new.take(3) == [a, b, old]  # it never saw `old` before: not a repeat for it
        replay.quiet(0.5)
        only_new.quiet(0.1)
        assert replay.terminate() == 0 and only_new.terminate() == 0
        c.close()


def test_bad_url_is_one_error_line_without_the_password():
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--redis", f"http://user:{PASSWORD}@somewhere:6379/0"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert PASSWORD not in proc.stderr + proc.stdout

"""RedisSink against a real redis-server started by the test: pub/sub order, stream replay, frames,
status, auth, and an abrupt outage (SIGKILL + restart) with spooled alerts."""

from __future__ import annotations

import json
import logging
import threading
import time

import numpy as np
import pytest

from configs.errors import UserError
from configs.schema import AlertsConfig, RedisConfig
from detector.result import FrameResult, Region
from sinks import SinkSet
from sinks.alerts import AlertTracker
from sinks.redis_sink import AlertSpool, RedisSink
from stream.frame import Frame
from tests.servers import RedisServer, SilentTcpServer, free_port, redis_available

pytestmark = [pytest.mark.skipif(not redis_available(), reason="redis-server not installed"), pytest.mark.timeout(60)]

BOX = Region(5, 6, 25, 30, 2.5, 1.2, 321)
ALERTS = AlertsConfig(min_duration_s=0.2, exit_duration_s=0.2, update_interval_s=0.2)
IMG = np.zeros((32, 48, 3), np.uint8)


def make(i, score, camera="cam1", fps=10.0, t0=100.0):
    ts = t0 + i / fps
    res = FrameResult(
        camera,
        i,
        ts,
        float(score),
        1.0,
        np.random.rand(256, 256).astype(np.float32),
        [BOX] if score >= 1.0 else [],
        (48, 32),
    )
    return res, Frame(camera, i, ts, IMG)


# new at frame 6, update(s) while the peak climbs, end at the first frame 0.2 s below exit
SCORES = [0.2] * 4 + [1.5, 1.5, 1.5, 2.0, 3.0, 4.0, 4.0, 4.0] + [0.1] * 6


@pytest.fixture(scope="module")
def server():
    with RedisServer() as srv:
        yield srv


@pytest.fixture
def client(server):
    c = server.client(decode_responses=True)
    c.flushall()
    yield c
    c.close()


def sink_for(url, tmp_path, **kw):
    return RedisSink(
        RedisConfig(url=url, spool_dir=str(tmp_path / "spool"), **kw.pop("cfg", {})),
        backoff_min_s=0.05,
        backoff_max_s=0.3,
        **kw,
    )


class Subscriber(threading.Thread):
    """Collects alert messages from pub/sub until an 'end' arrives on every channel (or timeout)."""

    def __init__(self, client, channels, ends=1):
        super().__init__(daemon=True)
        self.ps = client.pubsub()
        self.ps.subscribe(*channels)
        confirmed, deadline = 0, time.monotonic() + 5
        while confirmed < len(channels) and time.monotonic() < deadline:  # server-side confirmation
            m = self.ps.get_message(timeout=0.5)
            confirmed += bool(m and m["type"] == "subscribe")
        assert confirmed == len(channels)
        self.want_ends = ends * len(channels)
        self.messages: list[tuple[str, dict]] = []

    def run(self):
        deadline = time.monotonic() + 10
        ends = 0
        while time.monotonic() < deadline and ends < self.want_ends:
            m = self.ps.get_message(timeout=0.2)
            if m and m["type"] == "message":
                data = json.loads(m["data"])
                self.messages.append((m["channel"], data))
                ends += data["type"] == "end"
        self.ps.close()


def test_alerts_published_in_order_replayable_and_frames_streamed(server, client, tmp_path):
    sub = Subscriber(server.client(decode_responses=True), ["spade:alerts", "spade:cam1:alerts"])
    sub.start()
    sink = sink_for(server.url, tmp_path)
    ss = SinkSet([sink], AlertTracker(ALERTS))
    ss.camera_status("cam1", "online", "connected")
    emitted = []
    for i, s in enumerate(SCORES):
        emitted += ss.publish(*make(i, s))
    assert sink.flush(5.0)
    sub.join(10)
    ss.close()

    kinds = [e.type for e in emitted]
    assert kinds[0] == "new" and kinds[-1] == "end" and "update" in kinds
    expected = [(e.alert_id, e.type) for e in emitted]
    for channel in ("spade:alerts", "spade:cam1:alerts"):
        got = [(d["alert_id"], d["type"]) for ch, d in sub.messages if ch == channel]
        assert got == expected, channel

    new = next(d for _, d in sub.messages)
    assert set(new) == {
        "v",
        "type",
        "alert_id",
        "camera",
        "start_ts",
        "end_ts",
        "start_media_ts",
        "end_media_ts",
        "peak_score",
        "regions",
        "peak_regions",
        "snapshot",
        "reason",
        "frame_index",
    }
    assert new["v"] == 1 and new["camera"] == "cam1" and new["end_ts"] is None
    assert new["start_ts"] == pytest.approx(100.4) and new["regions"] == [[5, 6, 25, 30, 2.5, 321]]
    end = sub.messages[-1][1]
    assert end["type"] == "end" and end["reason"] == "recovered" and end["end_ts"] == pytest.approx(101.2)

    # a consumer that connects after the fact replays the whole lifecycle from the stream
    late = server.client(decode_responses=True)
    replay = [json.loads(f["data"]) for _, f in late.xrange("spade:alerts")]
    assert [(d["alert_id"], d["type"]) for d in replay] == expected

    # one frame entry per written frame, with the documented fields
    entries = late.xrange("spade:cam1:frames")
    assert len(entries) == len(SCORES)
    f = entries[9][1]
    assert f == {
        "v": "1",
        "camera": "cam1",
        "frame_index": "9",
        "ts": repr(100.9),
        "score": "4.0",
        "threshold": "1.0",
        "is_anomalous": "1",
        "regions": "[[5,6,25,30,2.5,321]]",
    }
    assert entries[0][1]["is_anomalous"] == "0" and entries[0][1]["regions"] == "[]"

    status = json.loads(late.get("spade:cam1:status"))
    assert status["state"] == "online" and status["detail"] == "connected" and status["v"] == 1
    assert sink.dropped_frames == 0 and sink.errors == 0 and sink.delivered_alerts == len(expected)
    late.close()


def test_frames_stream_is_capped(server, client, tmp_path):
    sink = sink_for(server.url, tmp_path, cfg={"frames_maxlen": 50, "prefix": "capped"})
    for i in range(1000):
        sink.write(*make(i, 0.1))
    assert sink.flush(5.0)
    sink.close()
    n = client.xlen("capped:cam1:frames")
    assert 50 <= n < 1000  # MAXLEN ~ trims whole macro nodes: approximately 50, never unbounded


def test_outage_spools_alerts_drops_frames_and_never_blocks(tmp_path):
    with RedisServer() as srv:
        sink = sink_for(srv.url, tmp_path)
        ss = SinkSet([sink], AlertTracker(ALERTS))
        emitted, slowest = [], 0.0

        def feed(indices, scores):
            nonlocal slowest
            for i, s in zip(indices, scores):
                t = time.perf_counter()
                emitted.extend(ss.publish(*make(i, s)))
                slowest = max(slowest, time.perf_counter() - t)

        feed(range(0, 8), [0.2, 0.2, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0])  # alert A opens (new) while up
        assert [e.type for e in emitted] == ["new"]
        assert sink.flush(5.0)

        srv.kill()  # SIGKILL: no goodbye, all data gone
        before_outage = len(emitted)
        feed(range(8, 40), [3.0, 5.0, 5.0, 5.0] + [0.1] * 6 + [2.0] * 10 + [0.1] * 12)  # A ends, B opens+ends
        outage_events = emitted[before_outage:]
        assert [e.type for e in outage_events][-1] == "end" and len(outage_events) >= 4
        ss.camera_status("cam1", "offline", "timeout")
        time.sleep(0.3)
        feed(range(40, 45), [0.1] * 5)
        assert sink.dropped_frames == 37  # every frame written while Redis was down, counted
        assert not sink.connected and sink.errors >= 1

        srv.restart()
        assert sink.flush(10.0), "spooled alerts not delivered after restart"
        c = srv.client(decode_responses=True)
        replay = [json.loads(f["data"]) for _, f in c.xrange("spade:alerts")]
        # everything raised during the outage, in order, once (the server lost the pre-kill "new")
        assert [(d["alert_id"], d["type"]) for d in replay] == [(e.alert_id, e.type) for e in outage_events]
        assert json.loads(c.get("spade:cam1:status"))["state"] == "offline"  # re-sent after restart

        feed(range(45, 50), [0.1] * 5)  # frames flow again
        assert sink.flush(5.0)
        assert c.xlen("spade:cam1:frames") == 5
        ss.close()
        c.close()
        assert slowest < 0.5, f"a publish() call blocked for {slowest:.2f} s while Redis was down"
        assert sink.spool.pending_bytes == 0


def test_spool_survives_a_dead_redis_and_redelivery_is_idempotent(server, client, tmp_path):
    # 1) Redis unreachable for this whole sink's life: alerts stay in the spool, close() is bounded
    dead = sink_for(f"redis://127.0.0.1:{free_port()}/0", tmp_path, close_timeout_s=1.0)
    ss = SinkSet([dead], AlertTracker(ALERTS))
    for i, s in enumerate(SCORES):
        ss.publish(*make(i, s))
    t = time.perf_counter()
    ss.close()
    assert time.perf_counter() - t < 4.0
    assert dead.spool.pending_bytes > 0 and dead.dropped_frames == len(SCORES)
    spooled = [json.loads(l) for l in (tmp_path / "spool" / "alerts.jsonl").read_text().splitlines()]

    # 2) the next run on the same spool delivers them, in order
    sink = sink_for(server.url, tmp_path)
    assert sink.flush(5.0)
    replay = [json.loads(f["data"]) for _, f in client.xrange("spade:alerts")]
    assert replay == spooled

    # 3) a crash between delivery and the offset write means a replay of the spool: nothing doubles
    sink.close()
    (tmp_path / "spool" / "alerts.jsonl").write_text("".join(json.dumps(m) + "\n" for m in spooled))
    (tmp_path / "spool" / "alerts.offset").write_text("0")
    again = sink_for(server.url, tmp_path)
    assert again.flush(5.0)
    again.close()
    assert again.duplicate_alerts == len(spooled) and again.delivered_alerts == 0
    assert client.xlen("spade:alerts") == len(spooled)


def test_password_from_env_and_acl_user_in_url(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    secret = "s3cr3t-p@ss"
    with RedisServer(password=secret, acl_user=("spade", "acl-pw")) as srv:
        monkeypatch.setenv("SPADE_TEST_REDIS_PW", secret)
        sink = sink_for(srv.url, tmp_path / "a", cfg={"password_env": "SPADE_TEST_REDIS_PW"})
        sink.write(*make(0, 0.1))
        assert sink.flush(5.0)
        sink.close()

        acl = sink_for(srv.url_with_auth(), tmp_path / "b", cfg={"prefix": "acl"})
        acl.write(*make(0, 0.1))
        assert acl.flush(5.0)
        acl.close()

        wrong = sink_for(srv.url_with_auth("spade", "wrong"), tmp_path / "c", cfg={"prefix": "no"})
        wrong.write(*make(0, 0.1))
        time.sleep(0.3)
        assert wrong.dropped_frames == 1 and not wrong.connected
        wrong.close()

        c = srv.client(decode_responses=True)
        assert c.xlen("spade:cam1:frames") == 1 and c.xlen("acl:cam1:frames") == 1
        assert c.xlen("no:cam1:frames") == 0 and wrong.errors >= 1
        c.close()
    assert "WRONGPASS" in caplog.text or "invalid username-password" in caplog.text
    assert any(r.levelno == logging.ERROR for r in caplog.records)  # auth failure is loud
    assert secret not in caplog.text and "acl-pw" not in caplog.text
    # one redactor for every URL (stream.avio.redact): the user name goes too, as for camera URLs
    assert acl.url_display == "redis://***@" + srv.url_with_auth().rsplit("@", 1)[1]

    with pytest.raises(UserError, match="NOT_SET_ANYWHERE"):
        RedisSink(RedisConfig(url="redis://127.0.0.1:1/0", password_env="NOT_SET_ANYWHERE"))
    with pytest.raises(UserError):
        RedisSink(RedisConfig(url="http://nope"))


def test_default_spool_dir_is_named_as_before():
    """The default spool directory is keyed by the URL without its password, as in earlier versions, so
    alerts spooled before an upgrade are found; the shown form hides more (stream.avio.redact)."""
    import hashlib

    for url, key in [
        ("rediss://spade:acl-pw@h:6380/0", "rediss://spade:***@h:6380/0"),
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://h:6379/0", "redis://h:6379/0"),
    ]:
        cfg = RedisConfig(url=url)
        tag = hashlib.sha1(key.encode()).hexdigest()[:8]
        assert RedisSink._default_spool_dir(cfg).name == f"spade-spool-{cfg.prefix}-{tag}"
    assert RedisSink._default_spool_dir(RedisConfig(url="redis://u:a@h/0")) == RedisSink._default_spool_dir(
        RedisConfig(url="redis://u:b@h/0")
    )  # a rotated password keeps its spool


def test_rediss_tls_url(tmp_path):
    import shutil
    import subprocess
    from urllib.parse import quote

    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    tls_port = free_port()
    tls = [
        "--tls-port",
        str(tls_port),
        "--tls-cert-file",
        str(cert),
        "--tls-key-file",
        str(key),
        "--tls-ca-cert-file",
        str(cert),
        "--tls-auth-clients",
        "no",
    ]
    try:
        srv = RedisServer(extra_args=tls).start()
    except Exception as err:  # a redis-server built without TLS
        pytest.skip(f"redis-server cannot serve TLS here: {err}")
    with srv:
        url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={quote(str(cert))}"
        sink = sink_for(url, tmp_path)
        sink.write(*make(0, 0.1))
        sink.alert(AlertTracker(AlertsConfig(min_duration_s=0)).update(*make(1, 2.0))[0])
        assert sink.flush(5.0) and sink.connected
        sink.close()
        c = srv.client(decode_responses=True)  # plain port, same server
        assert c.xlen("spade:cam1:frames") == 1 and c.xlen("spade:alerts") == 1
        c.close()


def test_black_holed_redis_never_blocks_the_caller(tmp_path):
    """A server that accepts TCP and never answers: only the worker waits, on short timeouts."""
    with SilentTcpServer() as hole:
        sink = sink_for(
            f"redis://127.0.0.1:{hole.port}/0", tmp_path, close_timeout_s=0.5, cfg={"socket_timeout_s": 0.3}
        )
        ss = SinkSet([sink], AlertTracker(ALERTS))
        slowest = 0.0
        for i, s in enumerate(SCORES):
            t = time.perf_counter()
            ss.publish(*make(i, s))
            slowest = max(slowest, time.perf_counter() - t)
            time.sleep(0.01)
        t = time.perf_counter()
        ss.close()
        closing = time.perf_counter() - t
    assert slowest < 0.2 and closing < 3.0
    assert sink.dropped_frames == len(SCORES) and sink.spool.pending_bytes > 0


def test_full_spool_refuses_new_alerts_loudly(tmp_path, caplog):
    sink = sink_for(
        f"redis://127.0.0.1:{free_port()}/0", tmp_path, close_timeout_s=0.2, cfg={"spool_max_mb": 0.001}
    )  # ~1 KB: room for a few alert messages
    tr = AlertTracker(AlertsConfig(min_duration_s=0, exit_duration_s=0))
    events = []
    for k in range(10):
        events += tr.update(*make(2 * k, 2.0)) + tr.update(*make(2 * k + 1, 0.1))
    for ev in events:
        sink.alert(ev)
    sink.close()
    kept = (tmp_path / "spool" / "alerts.jsonl").read_text().splitlines()
    assert 0 < len(kept) < len(events) and sink.spool_overflows == len(events) - len(kept)
    assert [json.loads(l)["alert_id"] for l in kept] == [e.alert_id for e in events[: len(kept)]]  # oldest kept
    assert "ALERT LOST" in caplog.text


def test_spool_compaction_and_torn_tail(tmp_path):
    sp = AlertSpool(tmp_path, max_bytes=1 << 20)
    lines = [(json.dumps({"n": n, "pad": "x" * 1000}) + "\n").encode() for n in range(200)]
    for line in lines:
        assert sp.append(line)
    sp.ack(sp.peek(150)[-1][0])  # delivered head (150 KB) >= undelivered tail: compacted
    assert (tmp_path / "alerts.offset").read_text() == "0"
    assert (tmp_path / "alerts.jsonl").stat().st_size == sp.pending_bytes == sum(map(len, lines[150:]))
    assert [json.loads(l)["n"] for _, l in sp.peek(3)] == [150, 151, 152]
    sp.close()

    with open(tmp_path / "alerts.jsonl", "ab") as f:
        f.write(b'{"n": 200, "pa')  # crash mid-append
    sp = AlertSpool(tmp_path, max_bytes=1 << 20)
    assert [json.loads(l)["n"] for _, l in sp.peek(1000)] == list(range(150, 200))
    sp.ack(sp.peek(1000)[-1][0])  # drained: file starts afresh
    assert sp.pending_bytes == 0 and (tmp_path / "alerts.jsonl").stat().st_size == 0
    sp.close()

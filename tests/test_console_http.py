"""The operator console's HTTP API (app/console.py) against a real redis-server, filled by the real sinks
(RedisSink + PreviewSink behind a SinkSet) with synthetic frame results: every endpoint, auth, CSRF,
pagination, bad parameters, path rules, security headers and Server-Sent Events."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from urllib.parse import quote

import numpy as np
import pytest

pytest.importorskip("starlette", reason="starlette not installed (pip install -e '.[console]')")
pytest.importorskip("uvicorn", reason="uvicorn not installed (pip install -e '.[console]')")

from configs.schema import AlertsConfig, PreviewConfig, RedisConfig  # noqa: E402
from detector.result import FrameResult, Region  # noqa: E402
from sinks import SinkSet  # noqa: E402
from sinks.alerts import AlertTracker  # noqa: E402
from sinks.preview import PreviewSink, encode_preview  # noqa: E402
from sinks.redis_sink import RedisSink  # noqa: E402
from sinks.snapshots import SnapshotWriter  # noqa: E402
from stream.frame import Frame  # noqa: E402
from tests.servers import RedisServer, free_port, redis_available  # noqa: E402

pytestmark = [pytest.mark.skipif(not redis_available(), reason="redis-server not installed"), pytest.mark.timeout(120)]

W, H = 320, 200
BOX = Region(60, 40, 140, 120, 2.5, 1.2, 3000)
ALERTS = AlertsConfig(min_duration_s=0.2, exit_duration_s=0.2, update_interval_s=0.2)
TOKEN = "correct-horse-battery-staple-42"


def make(i, score, camera="cam1", fps=10.0, t0=None):
    t0 = time.time() - 30 if t0 is None else t0
    ts = t0 + i / fps
    rng = np.random.default_rng(i)
    img = (rng.random((H, W, 3)) * 80 + 60).astype(np.uint8)
    amap = np.zeros((64, 64), np.float32)
    if score >= 1.0:
        amap[14:38, 12:44] = 3.0
    res = FrameResult(
        camera, i, ts, float(score), 1.0, amap, [BOX] if score >= 1.0 else [], (W, H), pixel_threshold=1.0
    )
    return res, Frame(camera, i, ts, img)


ONE_ALERT = [0.2] * 4 + [1.5, 1.5, 2.0, 3.0, 4.0, 4.0] + [0.1] * 6


class ConsoleServer:
    """app.console in a uvicorn thread on a free port."""

    def __init__(self, redis_url, **kw):
        import uvicorn

        from app.console import ConsoleSettings, create_app

        self.port = free_port()
        self.settings = ConsoleSettings(redis_url=redis_url, port=self.port, **kw)
        self.app = create_app(self.settings)
        self.server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                host="127.0.0.1",
                port=self.port,
                log_level="warning",
                access_log=False,
                timeout_graceful_shutdown=1,
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "console did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.app.state.console.closing = True
        self.server.should_exit = True
        self.thread.join(10)

    def request(self, method, path, body=None, headers=None, host=None):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        hs = {"Host": host or f"127.0.0.1:{self.port}", **(headers or {})}
        c.request(method, path, body=body, headers=hs)
        r = c.getresponse()
        data = r.read()
        c.close()
        return r, data

    def json(self, path, status=200, **kw):
        r, data = self.request("GET", path, **kw)
        assert r.status == status, (path, r.status, data[:300])
        return json.loads(data)

    def csrf(self):
        r, _ = self.request("GET", "/")
        cookie = r.getheader("set-cookie")
        assert cookie and cookie.startswith("spade_csrf=") and "SameSite=Strict" in cookie
        return cookie.split(";")[0].split("=", 1)[1]

    def post(self, path, csrf=None, extra=None, body=b""):
        hs = dict(extra or {})
        if csrf:
            hs["Cookie"] = "; ".join(x for x in (hs.get("Cookie"), f"spade_csrf={csrf}") if x)
            hs["X-CSRF-Token"] = csrf
        return self.request("POST", path, body=body, headers=hs)


@pytest.fixture(scope="module")
def redis_srv():
    with RedisServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def filled(redis_srv, tmp_path_factory):
    """Two cameras through the real sinks: cam1 with one alert (snapshot on disk), cam2 normal."""
    tmp = tmp_path_factory.mktemp("console")
    c = redis_srv.client(decode_responses=True)
    c.flushall()
    sink = RedisSink(RedisConfig(url=redis_srv.url, spool_dir=str(tmp / "spool")), backoff_min_s=0.05)
    preview = PreviewSink(PreviewConfig(fps=30.0), RedisConfig(url=redis_srv.url))
    snaps = tmp / "snapshots"
    ss = SinkSet([sink, preview], AlertTracker(ALERTS), SnapshotWriter(snaps))
    ss.camera_status("cam1", "online", "connected")
    ss.camera_status("cam2", "online", "connected")
    events = []
    for i, s in enumerate(ONE_ALERT):
        events += ss.publish(*make(i, s))
        ss.publish(*make(i, 0.3, camera="cam2"))
    assert sink.flush(5.0) and preview.flush(5.0)
    ss.close()
    c.close()
    return {"tmp": tmp, "snaps": snaps, "events": events, "alert_id": events[0].alert_id}


@pytest.fixture
def console(redis_srv, filled):
    with ConsoleServer(redis_srv.url, snapshots_root=str(filled["snaps"])) as srv:
        yield srv


def test_cameras_preview_scores(console, filled, redis_srv):
    body = console.json("/api/cameras")
    cams = {c["name"]: c for c in body["cameras"]}
    assert set(cams) == {"cam1", "cam2"}
    assert cams["cam1"]["state"] == "online" and cams["cam1"]["detail"] == "connected"
    assert cams["cam1"]["since"] is not None and cams["cam1"]["preview"] is True
    latest = cams["cam1"]["latest"]
    assert latest["frame_index"] == len(ONE_ALERT) - 1 and latest["threshold"] == 1.0
    assert latest["score"] == pytest.approx(0.1)

    r, data = console.request("GET", "/api/cameras/cam1/preview.jpg")
    assert r.status == 200 and r.getheader("content-type") == "image/jpeg" and data[:2] == b"\xff\xd8"
    assert len(data) <= 30 * 1024
    assert "no-store" in r.getheader("cache-control")
    missing = console.json("/api/cameras/nocam/preview.jpg", status=404)
    assert "preview" in missing["error"]

    sc = console.json("/api/cameras/cam1/scores?seconds=600&points=50")
    assert sc["camera"] == "cam1" and 1 <= len(sc["points"]) <= 50
    assert max(p[1] for p in sc["points"]) == pytest.approx(4.0) and sc["threshold"] == 1.0


def test_alerts_grouped_by_id_with_detail_and_snapshot(console, filled):
    aid = filled["alert_id"]
    body = console.json("/api/alerts")
    assert [a["alert_id"] for a in body["alerts"]] == [aid]  # every lifecycle message of one alert: one entry
    a = body["alerts"][0]
    assert a["camera"] == "cam1" and a["state"] == "ended" and a["peak_score"] == 4.0
    assert a["end_ts"] is not None and a["has_snapshot"] and a["peak_regions"] == [[60, 40, 140, 120, 2.5, 3000]]
    assert a["messages"] == len(filled["events"])

    d = console.json(f"/api/alerts/{aid}")
    assert [h["type"] for h in d["history"]] == [e.type for e in filled["events"]]
    assert d["snapshot_url"] == f"/api/alerts/{aid}/snapshot.jpg" and d["clip_url"] is None
    assert len(d["timeline"]) >= len(ONE_ALERT) - 1 and max(p[1] for p in d["timeline"]) == 4.0
    r, data = console.request("GET", d["snapshot_url"])
    assert r.status == 200 and data[:2] == b"\xff\xd8"

    assert console.json("/api/alerts?camera=cam2")["alerts"] == []
    assert console.json("/api/alerts?state=open")["alerts"] == []
    assert len(console.json("/api/alerts?state=ended&camera=cam1")["alerts"]) == 1


def test_bad_parameters_are_4xx_with_a_message(console):
    for path in (
        "/api/alerts?limit=0",
        "/api/alerts?limit=abc",
        "/api/alerts?limit=100000",
        "/api/alerts?state=burning",
        "/api/alerts?before=yesterday",
        "/api/alerts?camera=a%2Fb",
        "/api/alerts?bogus=1",
        "/api/cameras/cam1/scores?seconds=-5",
        "/api/cameras/cam1/scores?seconds=1e9",
        "/api/cameras/cam1/scores?points=x",
        "/api/cameras/..%2f..%2fetc/preview.jpg",
        "/api/alerts/no%20such/ack",
    ):
        r, data = console.request("GET", path)
        assert 400 <= r.status < 500, (path, r.status)
        assert json.loads(data)["error"], path
    assert console.json("/api/alerts/cam9-1-abcdef", status=404)["error"].startswith("no alert")
    assert console.json("/api/nothing-here", status=404)["error"]


def test_security_headers_and_loopback_host_check(console):
    r, page = console.request("GET", "/")
    assert r.status == 200 and b"/static/app.js" in page and b"<script>" not in page
    csp = r.getheader("content-security-policy")
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert r.getheader("x-content-type-options") == "nosniff" and r.getheader("x-frame-options") == "DENY"
    r, _ = console.request("GET", "/api/cameras")
    assert "default-src 'self'" in r.getheader("content-security-policy")
    r, _ = console.request("GET", "/static/app.js")
    assert r.status == 200 and r.getheader("content-security-policy")
    # a DNS-rebinding page reaches 127.0.0.1 under a foreign name: refused
    r, data = console.request("GET", "/api/cameras", host="evil.example:80")
    assert r.status == 421 and json.loads(data)["error"]


def test_actions_need_csrf_publish_feedback_and_record_verdicts(console, filled, redis_srv):
    aid = filled["alert_id"]
    c = redis_srv.client(decode_responses=True)
    c.delete("spade:verdicts")
    ps = c.pubsub()
    ps.subscribe("spade:feedback")
    assert ps.get_message(timeout=2)["type"] == "subscribe"

    r, data = console.post(f"/api/alerts/{aid}/false-alarm")  # no CSRF token
    assert r.status == 403 and "CSRF" in json.loads(data)["error"]
    tok = console.csrf()
    r, _ = console.request(
        "POST", f"/api/alerts/{aid}/ack", headers={"Cookie": f"spade_csrf={tok}", "X-CSRF-Token": "x" * 32}
    )
    assert r.status == 403  # header and cookie differ
    r, _ = console.post(f"/api/alerts/{aid}/ack", tok, {"Origin": "http://evil.example"})
    assert r.status == 403  # cross-origin
    assert ps.get_message(timeout=0.3) is None and c.hget("spade:verdicts", aid) is None

    r, data = console.post(f"/api/alerts/{aid}/ack", tok, {"Origin": f"http://127.0.0.1:{console.port}"})
    assert r.status == 200 and json.loads(data)["verdict"]["type"] == "ack"
    m = ps.get_message(timeout=2)
    ack = json.loads(m["data"])
    assert list(ack) == ["v", "type", "alert_id", "camera", "start_ts", "end_ts", "by", "ts"]
    assert ack["v"] == 1 and ack["type"] == "ack" and ack["alert_id"] == aid and ack["by"] == "console"

    r, data = console.post(f"/api/alerts/{aid}/false-alarm", tok)
    assert r.status == 200
    fa = json.loads(ps.get_message(timeout=2)["data"])
    assert fa["type"] == "false_alarm" and fa["camera"] == "cam1" and fa["end_ts"] is not None
    assert fa["start_ts"] == pytest.approx(filled["events"][0].start_ts)
    assert json.loads(c.hget("spade:verdicts", aid))["type"] == "false_alarm"
    console.post(f"/api/alerts/{aid}/ack", tok)  # an ack never downgrades a false alarm
    assert json.loads(c.hget("spade:verdicts", aid))["type"] == "false_alarm"
    assert console.json("/api/alerts")["alerts"][0]["verdict"]["type"] == "false_alarm"
    r, _ = console.post("/api/alerts/cam1-0-000000/ack", tok)
    assert r.status == 404
    r, _ = console.request("GET", f"/api/alerts/{aid}/ack")
    assert r.status == 405
    ps.close()
    c.close()


def _publish_alert(client, aid, camera, typ="new", start=None, snapshot=None, frame_index=1):
    start = time.time() if start is None else start
    msg = {
        "v": 1,
        "type": typ,
        "alert_id": aid,
        "camera": camera,
        "start_ts": start,
        "end_ts": start + 1 if typ == "end" else None,
        "start_media_ts": None,
        "end_media_ts": None,
        "peak_score": 2.0,
        "regions": [],
        "peak_regions": [[1, 2, 30, 40, 2.0, 100]],
        "snapshot": snapshot,
        "reason": "recovered" if typ == "end" else None,
        "frame_index": frame_index,
    }
    data = json.dumps(msg)
    client.xadd("spade:alerts", {"data": data})
    client.publish("spade:alerts", data)


def test_pagination_with_cursors(redis_srv, filled, tmp_path):
    c = redis_srv.client(decode_responses=True)
    for k in range(25):
        _publish_alert(c, f"pg{k % 2}-{k:04d}-aaaaaa", f"pg{k % 2}", start=1000.0 + k)
        if k % 3 == 0:
            _publish_alert(c, f"pg{k % 2}-{k:04d}-aaaaaa", f"pg{k % 2}", "end", start=1000.0 + k, frame_index=5)
    with ConsoleServer(redis_srv.url) as console:
        seen, before, pages = [], None, 0
        while True:
            q = "/api/alerts?limit=7&camera=pg1" + (f"&before={before}" if before else "")
            body = console.json(q)
            seen += [a["alert_id"] for a in body["alerts"]]
            pages += 1
            before = body["next_before"]
            if not before:
                break
        assert seen == [f"pg1-{k:04d}-aaaaaa" for k in range(23, -1, -2)] and pages == 2
        ended = console.json("/api/alerts?state=ended&camera=pg0&limit=200")["alerts"]
        assert [a["alert_id"] for a in ended] == [f"pg0-{k:04d}-aaaaaa" for k in (24, 18, 12, 6, 0)]
        assert console.json("/api/alerts?state=open&camera=pg0")["alerts"][0]["alert_id"] == "pg0-0022-aaaaaa"
    c.close()


def test_snapshot_paths_outside_the_root_and_no_root_are_refused(redis_srv, filled, tmp_path):
    c = redis_srv.client(decode_responses=True)
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"\xff\xd8 not yours")
    root = filled["snaps"]
    inside = next(root.rglob("*.jpg"))
    _publish_alert(c, "trav-1-aaaaaa", "trav", snapshot=str(root / ".." / ".." / secret.parent.name / "secret.jpg"))
    _publish_alert(c, "trav-2-aaaaaa", "trav", snapshot="/etc/passwd")
    _publish_alert(c, "trav-3-aaaaaa", "trav", snapshot=str(secret))
    (root / "link.jpg").symlink_to(secret)
    _publish_alert(c, "trav-4-aaaaaa", "trav", snapshot=str(root / "link.jpg"))
    _publish_alert(c, "trav-5-aaaaaa", "trav", snapshot=str(inside))
    with ConsoleServer(redis_srv.url, snapshots_root=str(root)) as console:
        for k in (1, 2, 3, 4):
            r, data = console.request("GET", f"/api/alerts/trav-{k}-aaaaaa/snapshot.jpg")
            assert r.status == 403 and b"not yours" not in data and b"root:" not in data, k
            assert console.json(f"/api/alerts/trav-{k}-aaaaaa")["snapshot_url"] is None
        r, data = console.request("GET", "/api/alerts/trav-5-aaaaaa/snapshot.jpg")
        assert r.status == 200 and data == inside.read_bytes()
        r, _ = console.request("GET", "/static/../../../../etc/passwd")
        assert r.status == 404
        r, _ = console.request("GET", "/static/%2e%2e/console.py")
        assert r.status == 404
    with ConsoleServer(redis_srv.url) as console:  # no --snapshots-root: nothing is served
        body = console.json("/api/alerts/trav-5-aaaaaa/snapshot.jpg", status=404)
        assert "--snapshots-root" in body["error"]
        assert console.json("/api/alerts/trav-5-aaaaaa/clip.mp4", status=404)["error"]
    (root / "link.jpg").unlink()
    c.close()


def test_clip_link_only_under_the_video_root(redis_srv, filled, tmp_path):
    c = redis_srv.client(decode_responses=True)
    vids = tmp_path / "video"
    vids.mkdir()
    _publish_alert(c, "vcam-1-aaaaaa", "vcam", start=time.time() - 5)
    (vids / "vcam_0.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom fake")
    (vids / "other.mp4").write_bytes(b"nope")
    with ConsoleServer(redis_srv.url, video_root=str(vids)) as console:
        d = console.json("/api/alerts/vcam-1-aaaaaa")
        assert d["clip_url"] == "/api/alerts/vcam-1-aaaaaa/clip.mp4"
        r, data = console.request("GET", d["clip_url"])
        assert r.status == 200 and data.endswith(b"fake") and r.getheader("content-type") == "video/mp4"
        assert console.json("/api/alerts/trav-2-aaaaaa")["clip_url"] is None
    c.close()


def test_token_auth_login_cookie_and_refusals(redis_srv, filled):
    with ConsoleServer(redis_srv.url, token=TOKEN) as console:
        r, data = console.request("GET", "/api/cameras")
        assert r.status == 401 and "authentication" in json.loads(data)["error"]
        r, _ = console.request("GET", "/")
        assert r.status == 303 and r.getheader("location") == "/login"
        r, _ = console.request("GET", "/api/cameras", headers={"Authorization": "Bearer wrong-token-123456789"})
        assert r.status == 401
        r, _ = console.request("GET", "/api/cameras", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status == 200

        r, page = console.request("GET", "/login")
        assert r.status == 200 and b'name="token"' in page and TOKEN.encode() not in page
        csrf = r.getheader("set-cookie").split(";")[0].split("=", 1)[1]
        assert csrf.encode() in page  # the form's hidden field: the double-submit value
        form = {"Content-Type": "application/x-www-form-urlencoded", "Cookie": f"spade_csrf={csrf}"}
        r, page = console.request("POST", "/login", body=f"token=wrong-{TOKEN}&csrf={csrf}", headers=form)
        assert r.status == 401 and b"Wrong token" in page and r.getheader("set-cookie") is None
        r, _ = console.request("POST", "/login", body=f"token={TOKEN}&csrf=forged-value-0000000000", headers=form)
        assert r.status == 403
        r, _ = console.request("POST", "/login", body=f"token={quote(TOKEN)}&csrf={csrf}", headers=form)
        assert r.status == 303 and r.getheader("location") == "/"
        session = r.getheader("set-cookie")
        assert "HttpOnly" in session and "SameSite=strict" in session.replace("Strict", "strict")
        assert TOKEN not in session
        cookie = session.split(";")[0]
        r, _ = console.request("GET", "/api/cameras", headers={"Cookie": cookie})
        assert r.status == 200
        r, page = console.request("GET", "/", headers={"Cookie": cookie})
        assert r.status == 200 and TOKEN.encode() not in page
        # with a session, actions still need the CSRF token
        aid = filled["alert_id"]
        r, _ = console.request("POST", f"/api/alerts/{aid}/ack", headers={"Cookie": cookie})
        assert r.status == 403
        r, _ = console.request(
            "POST", f"/api/alerts/{aid}/ack", headers={"Cookie": f"{cookie}; spade_csrf={csrf}", "X-CSRF-Token": csrf}
        )
        assert r.status == 200
        r, _ = console.request("GET", "/api/cameras", headers={"Cookie": "spade_session=" + "0" * 64})
        assert r.status == 401
        # with a token the console answers to any Host name (it may be bound beyond the loopback)
        r, _ = console.request("GET", "/api/cameras", host="console.example", headers={"Cookie": cookie})
        assert r.status == 200


def test_settings_refuse_a_public_bind_without_a_token(monkeypatch, tmp_path):
    import argparse

    from app.console import settings_from_args
    from configs.errors import UserError

    def args(**kw):
        base = dict(
            redis="redis://127.0.0.1:1/0",
            prefix="spade",
            bind="127.0.0.1",
            port=8080,
            token_env=None,
            secrets_file=None,
            redis_password_env=None,
            snapshots_root=None,
            video_root=None,
        )
        return argparse.Namespace(**(base | kw))

    assert settings_from_args(args()).token is None
    with pytest.raises(UserError, match="needs a token"):
        settings_from_args(args(bind="0.0.0.0"))
    with pytest.raises(UserError, match="CONSOLE_TOKEN_UNSET"):
        settings_from_args(args(bind="0.0.0.0", token_env="CONSOLE_TOKEN_UNSET"))
    monkeypatch.setenv("CONSOLE_SHORT", "abc")
    with pytest.raises(UserError, match="shorter") as err:
        settings_from_args(args(token_env="CONSOLE_SHORT"))
    assert "abc" not in str(err.value)
    secrets = tmp_path / "secrets.env"
    secrets.write_text(f"CONSOLE_FROM_FILE={TOKEN}\n")
    secrets.chmod(0o600)
    s = settings_from_args(args(bind="0.0.0.0", token_env="CONSOLE_FROM_FILE", secrets_file=str(secrets)))
    assert s.token == TOKEN and s.bind == "0.0.0.0"
    with pytest.raises(UserError, match="not a directory"):
        settings_from_args(args(snapshots_root=str(tmp_path / "nope")))


def test_sse_delivers_a_new_alert_within_2s(console, redis_srv):
    s = socket.create_connection(("127.0.0.1", console.port), timeout=5)
    s.sendall(
        f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{console.port}\r\nAccept: text/event-stream\r\n\r\n".encode()
    )
    buf = b""
    while b": connected" not in buf:
        buf += s.recv(4096)
    assert b"200 OK" in buf and b"text/event-stream" in buf
    time.sleep(0.3)  # the hub's subscription is confirmed before the publish
    c = redis_srv.client(decode_responses=True)
    t0 = time.monotonic()
    _publish_alert(c, "sse-1-abcdef", "ssecam")
    s.settimeout(2.0)
    while b"sse-1-abcdef" not in buf:
        buf += s.recv(4096)
    took = time.monotonic() - t0
    assert took < 2.0
    frame = buf[buf.index(b"event: alert") :]
    data = json.loads(frame.split(b"data: ", 1)[1].split(b"\n", 1)[0])
    assert data["alert_id"] == "sse-1-abcdef" and data["state"] == "open" and data["camera"] == "ssecam"
    s.close()
    c.close()


def test_redis_down_is_503_not_500(filled):
    with ConsoleServer(f"redis://127.0.0.1:{free_port()}/0") as console:
        body = console.json("/api/cameras", status=503)
        assert "redis unavailable" in body["error"]


def test_preview_encoder_respects_max_kb():
    res, frame = make(0, 3.0)
    big = (np.random.default_rng(0).random((720, 1280, 3)) * 255).astype(np.uint8)  # noise: hard to compress
    res.frame_size = (1280, 720)
    data = encode_preview(big, res, 12 * 1024, max_width=480)
    assert data[:2] == b"\xff\xd8" and len(data) <= 12 * 1024


def test_build_sinks_adds_the_preview_sink_with_a_redis_url(redis_srv, tmp_path):
    from configs.errors import UserError
    from configs.schema import SinksConfig
    from sinks import build_sinks

    cfg = SinksConfig.model_validate({"redis": {"url": redis_srv.url, "spool_dir": str(tmp_path / "sp")}})
    ss = build_sinks(cfg, ALERTS, tmp_path)
    assert any(isinstance(s, PreviewSink) for s in ss.sinks)
    ss.close()
    cfg = SinksConfig.model_validate(
        {"redis": {"url": redis_srv.url, "spool_dir": str(tmp_path / "sp")}, "preview": {"enabled": False}}
    )
    ss = build_sinks(cfg, ALERTS, tmp_path)
    assert not any(isinstance(s, PreviewSink) for s in ss.sinks)
    ss.close()
    ss = build_sinks(SinksConfig(), ALERTS, tmp_path)
    assert not any(isinstance(s, PreviewSink) for s in ss.sinks)
    ss.close()
    with pytest.raises(UserError, match="sinks.preview"):
        build_sinks(SinksConfig.model_validate({"preview": {"enabled": True}}), ALERTS, tmp_path)
    with pytest.raises(Exception):
        SinksConfig.model_validate({"preview": {"fps": 0}})
    with pytest.raises(Exception):
        SinksConfig.model_validate({"preview": {"colour": "red"}})


def test_preview_key_expires_and_rate_is_limited(redis_srv, tmp_path):
    c = redis_srv.client()
    sink = PreviewSink(PreviewConfig(fps=2.0, ttl_s=1), RedisConfig(url=redis_srv.url, prefix="pv"))
    t0 = time.time()
    for i in range(20):  # 20 frames within ~0.2 s: one preview at most at 2 fps
        sink.write(*make(i, 2.0, camera="rate", t0=t0))
        time.sleep(0.01)
    assert sink.flush(5.0)
    assert sink.published == 1
    assert 0 < c.pttl("pv:rate:preview") <= 1000
    time.sleep(1.3)
    assert c.get("pv:rate:preview") is None
    sink.close()
    c.close()

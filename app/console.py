"""Operator console: a small web server that shows cameras, live previews, scores and alerts, read from
Redis only (one pipeline process or a cluster of them alike), and records operators' verdicts.

It never touches a camera. What it reads, all written by the sinks (sinks/schema.py, docs/operations.md):

    <prefix>:<camera>:status    camera status (GET; pub/sub channel of the same name)
    <prefix>:<camera>:frames    frame scores (XREVRANGE / XRANGE)
    <prefix>:<camera>:preview   the newest annotated JPEG (sinks/preview.py; expires by its TTL)
    <prefix>:alerts             alert lifecycle messages (stream, field `data`; pub/sub channel)

What it writes: a verdict per alert in the hash `<prefix>:verdicts` (alert_id -> JSON) and, for every
action, one strict-JSON message on the channel `<prefix>:feedback`:
    {"v":1,"type":"false_alarm"|"ack","alert_id","camera","start_ts","end_ts","by":"console","ts"}

The alert inbox is an index of the alerts stream held in memory, built from the stream at start and
tailed incrementally (XRANGE from the last id read), so it survives restarts of the console and of the
pipeline; an alert's lifecycle messages are grouped by alert_id, its state is "ended" once an "end" was
seen. Pages are ordered newest first by the stream id of an alert's first message; `before` (the
`next_before` of the previous page) is that id.

Security: binds 127.0.0.1 by default (then, without a token, only Host headers naming the loopback are
accepted: no DNS rebinding). Binding any other address needs a token (`--token-env`); with a token every
request needs it, from the login form's HttpOnly SameSite=Strict session cookie (an HMAC of the token,
never the token) or an `Authorization: Bearer` header. Every action is a POST that needs the CSRF token
(double submit: the `spade_csrf` cookie echoed in the `X-CSRF-Token` header) and, when the browser sends
one, a same-origin Origin header. Every response carries a Content-Security-Policy without inline
script. Snapshots and clips are served only from the paths alert messages name (clips: the video sink's
files of the alert's camera) and only under `--snapshots-root` / `--video-root`; without a root, none.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import hmac
import html
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

import redis
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("console_static")
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")  # sources[].name
ALERT_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,256}$")
STREAM_ID_RE = re.compile(r"^(\d{1,20})-(\d{1,20})$")
SESSION_COOKIE = "spade_session"
CSRF_COOKIE = "spade_csrf"
CSRF_HEADER = "x-csrf-token"
MIN_TOKEN_LEN = 16
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "media-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),  # no-referrer would make Chromium send "Origin: null"
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]
SCORE_WINDOW_S = 3600  # the longest sparkline / timeline the console keeps per camera
MAX_INDEXED_ALERTS = 200_000


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class ConsoleSettings:
    redis_url: str
    prefix: str = "spade"
    token: str | None = None
    bind: str = "127.0.0.1"
    port: int = 8080
    snapshots_root: str | None = None
    video_root: str | None = None
    redis_password: str | None = None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _sid(s: str) -> tuple[int, int]:
    a, b = s.split("-")
    return int(a), int(b)


def _num(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


# -- alerts index ------------------------------------------------------------------------------------
class AlertIndex:
    """Every alert of `<prefix>:alerts`, grouped by alert_id, tailed incrementally (see module doc)."""

    BATCH = 2000

    def __init__(self, r: aioredis.Redis, prefix: str) -> None:
        self.r = r
        self.key = f"{prefix}:alerts"
        self.alerts: dict[str, dict] = {}
        self._order: list[tuple[tuple[int, int], str]] = []  # (first stream id, alert_id), ascending
        self.last_id: str | None = None
        self._lock = asyncio.Lock()
        self._refreshed = 0.0

    def _reset(self) -> None:
        self.alerts.clear()
        self._order.clear()
        self.last_id = None

    async def refresh(self, max_age_s: float = 0.5) -> set[str]:
        """Read what was added since the last read; the ids of the alerts that changed."""
        if time.monotonic() - self._refreshed < max_age_s:
            return set()
        async with self._lock:
            if time.monotonic() - self._refreshed < max_age_s:
                return set()
            changed: set[str] = set()
            if self.last_id is not None:
                newest = await self.r.xrevrange(self.key, "+", "-", count=1)
                if not newest or _sid(newest[0][0]) < _sid(self.last_id):
                    log.warning(
                        "%s was emptied or replaced (Redis restarted without its data?): re-reading it", self.key
                    )
                    self._reset()
            while True:
                lo = "-" if self.last_id is None else "(" + self.last_id
                entries = await self.r.xrange(self.key, lo, "+", count=self.BATCH)
                for sid, fields in entries:
                    aid = self._apply(sid, fields)
                    if aid:
                        changed.add(aid)
                if entries:
                    self.last_id = entries[-1][0]
                if len(entries) < self.BATCH:
                    break
            self._refreshed = time.monotonic()
            return changed

    def _apply(self, sid: str, fields: dict) -> str | None:
        try:
            msg = json.loads(fields.get("data", ""))
            aid, typ = msg["alert_id"], msg["type"]
            if not isinstance(aid, str) or not ALERT_ID_RE.match(aid) or typ not in ("new", "update", "end"):
                return None
            key = (typ, msg.get("frame_index"))
        except (ValueError, KeyError, TypeError):
            log.debug("skipping unreadable alert entry %s", sid)
            return None
        a = self.alerts.get(aid)
        if a is None:
            if len(self.alerts) >= MAX_INDEXED_ALERTS:  # drop the oldest (the stream is capped anyway)
                _, old = self._order.pop(0)
                self.alerts.pop(old, None)
            a = self.alerts[aid] = {"first_id": sid, "seen": set(), "history": [], "msg": msg, "ended": False}
            self._order.append((_sid(sid), aid))
        if key in a["seen"]:  # at-least-once delivery: a duplicate
            return None
        a["seen"].add(key)
        a["history"].append(
            {
                "id": sid,
                "type": typ,
                "frame_index": msg.get("frame_index"),
                "peak_score": msg.get("peak_score"),
                "reason": msg.get("reason"),
            }
        )
        if not a["ended"]:
            a["msg"] = msg
            a["ended"] = typ == "end"
        a["last_id"] = sid
        return aid

    def summary(self, aid: str, verdict: dict | None = None, detail: bool = False) -> dict:
        a = self.alerts[aid]
        m = a["msg"]
        out = {
            "alert_id": aid,
            "camera": m.get("camera"),
            "state": "ended" if a["ended"] else "open",
            "start_ts": _num(m.get("start_ts")),
            "end_ts": _num(m.get("end_ts")),
            "start_media_ts": _num(m.get("start_media_ts")),
            "end_media_ts": _num(m.get("end_media_ts")),
            "peak_score": _num(m.get("peak_score")),
            "reason": m.get("reason"),
            "peak_regions": m.get("peak_regions") or [],
            "has_snapshot": bool(m.get("snapshot")),
            "cursor": a["first_id"],
            "updated_id": a["last_id"],
            "messages": len(a["history"]),
            "verdict": verdict,
        }
        if detail:
            out["regions"] = m.get("regions") or []
            out["history"] = list(a["history"])
        return out

    def page(self, camera: str, state: str, before: str | None, limit: int) -> tuple[list[str], str | None]:
        hi = len(self._order) if before is None else bisect.bisect_left(self._order, (_sid(before), ""))
        out: list[str] = []
        i = hi - 1
        while i >= 0 and len(out) < limit:
            aid = self._order[i][1]
            a = self.alerts[aid]
            if (not camera or a["msg"].get("camera") == camera) and (not state or (state == "ended") == a["ended"]):
                out.append(aid)
            i -= 1
        more = i >= 0 and len(out) == limit
        return out, (self.alerts[out[-1]]["first_id"] if out and more else None)


# -- frame scores ------------------------------------------------------------------------------------
class ScoreCache:
    """One camera's recent frame scores, read incrementally from its frames stream."""

    def __init__(self) -> None:
        self.points: deque = deque()  # (id_ms, ts, score, threshold)
        self.last_id: str | None = None
        self.lock = asyncio.Lock()
        self.refreshed = 0.0

    async def refresh(self, r: aioredis.Redis, key: str, now_ms: int) -> None:
        async with self.lock:
            if time.monotonic() - self.refreshed < 0.5:
                return
            newest = await r.xrevrange(key, "+", "-", count=1)
            if not newest:
                self.points.clear()
                self.last_id = None
            else:
                if self.last_id is not None and _sid(newest[0][0]) < _sid(self.last_id):
                    self.points.clear()
                    self.last_id = None
                if self.last_id is None:  # first read: the window, newest first, capped
                    entries = await r.xrevrange(key, "+", str(now_ms - SCORE_WINDOW_S * 1000), count=20000)
                    entries.reverse()
                else:
                    entries = []
                    lo = "(" + self.last_id
                    while True:
                        batch = await r.xrange(key, lo, "+", count=5000)
                        entries += batch
                        if len(batch) < 5000:
                            break
                        lo = "(" + batch[-1][0]
                for sid, f in entries:
                    self.points.append(
                        (_sid(sid)[0], _num(f.get("ts")), _num(f.get("score")), _num(f.get("threshold")))
                    )
                if entries:
                    self.last_id = entries[-1][0]
            cut = now_ms - SCORE_WINDOW_S * 1000
            while self.points and self.points[0][0] < cut:
                self.points.popleft()
            self.refreshed = time.monotonic()

    def downsample(self, since_ms: int, until_ms: int, n: int) -> list[list]:
        """Up to n points [t, max score, its threshold] over [since, until], t the bucket's end (s)."""
        span = max(1, until_ms - since_ms)
        buckets: dict[int, tuple] = {}
        for id_ms, _ts, score, thr in self.points:
            if id_ms < since_ms or id_ms > until_ms or score is None:
                continue
            b = min(n - 1, (id_ms - since_ms) * n // span)
            cur = buckets.get(b)
            if cur is None or score > cur[1]:
                buckets[b] = (id_ms, score, thr)
        return [[round(v[0] / 1000, 3), v[1], v[2]] for _, v in sorted(buckets.items())]


def frame_record(fields: dict) -> dict:
    try:
        regions = json.loads(fields.get("regions", "[]"))
    except ValueError:
        regions = []
    return {
        "frame_index": int(fields.get("frame_index", -1)),
        "ts": _num(fields.get("ts")),
        "score": _num(fields.get("score")),
        "threshold": _num(fields.get("threshold")),
        "is_anomalous": fields.get("is_anomalous") == "1",
        "regions": regions,
    }


# -- live events -------------------------------------------------------------------------------------
class EventHub:
    """One pub/sub connection for every SSE client: alerts, camera status and verdicts, fanned out."""

    def __init__(self, console: Console) -> None:
        self.c = console
        self.clients: set[asyncio.Queue] = set()
        self.task: asyncio.Task | None = None

    def join(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(maxsize=256)
        self.clients.add(q)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run())
        return q

    def leave(self, q: asyncio.Queue) -> None:
        self.clients.discard(q)

    def broadcast(self, event: str, data: dict) -> None:
        for q in list(self.clients):
            try:
                q.put_nowait((event, data))
            except asyncio.QueueFull:  # a stalled client: drop it, its browser reconnects and reloads
                self.clients.discard(q)
                try:
                    q.get_nowait()
                    q.put_nowait(None)
                except (asyncio.QueueEmpty, asyncio.QueueFull):
                    pass

    async def _alerts_changed(self) -> None:
        changed = await self.c.index.refresh(max_age_s=0)
        if changed:
            verdicts = await self.c.verdicts(sorted(changed))
            for aid in sorted(changed, key=lambda a: self.c.index.alerts[a]["last_id"]):
                self.broadcast("alert", self.c.index.summary(aid, verdicts.get(aid)))

    async def _run(self) -> None:
        p = self.c.prefix
        while self.clients:
            ps = self.c.r.pubsub()
            try:
                await ps.subscribe(f"{p}:alerts", f"{p}:feedback")
                await ps.psubscribe(f"{p}:*:status")
                self.broadcast("redis", {"up": True})
                await self._alerts_changed()  # whatever came while we were not listening
                while self.clients:
                    m = await ps.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if m is None:
                        await self._alerts_changed()  # belt and braces: pub/sub is fire and forget
                        continue
                    ch = m.get("channel")
                    if ch == f"{p}:alerts":
                        await self._alerts_changed()
                        continue
                    try:
                        data = json.loads(m["data"])
                    except (ValueError, TypeError):
                        continue
                    if ch == f"{p}:feedback":
                        self.broadcast("verdict", data)
                    elif isinstance(data, dict):
                        self.broadcast("status", data)
            except asyncio.CancelledError:
                raise
            except (redis.RedisError, OSError) as err:
                log.warning("console: redis pub/sub lost (%s); retrying", type(err).__name__)
                self.broadcast("redis", {"up": False})
                await asyncio.sleep(1.0)
            finally:
                try:
                    await ps.aclose()
                except Exception:
                    pass


# -- the application ---------------------------------------------------------------------------------
class Console:
    def __init__(self, s: ConsoleSettings) -> None:
        self.s = s
        self.prefix = s.prefix
        kw = {"password": s.redis_password} if s.redis_password else {}
        self.r = aioredis.Redis.from_url(
            s.redis_url,
            decode_responses=True,
            socket_connect_timeout=2,
            socket_timeout=10,
            health_check_interval=30,
            **kw,
        )
        self.rb = aioredis.Redis.from_url(
            s.redis_url, decode_responses=False, socket_connect_timeout=2, socket_timeout=10, **kw
        )  # binary: previews
        self.index = AlertIndex(self.r, s.prefix)
        self.hub = EventHub(self)
        self.scores: dict[str, ScoreCache] = {}
        self._cameras: tuple[float, list[str]] = (0.0, [])
        self.snap_root = Path(s.snapshots_root).resolve() if s.snapshots_root else None
        self.video_root = Path(s.video_root).resolve() if s.video_root else None
        self.closing = False  # set on shutdown: event streams end so the server stops promptly
        self.session_value = (
            hmac.new(s.token.encode(), b"spade-console-session-v1", hashlib.sha256).hexdigest() if s.token else None
        )

    # -- helpers ----------------------------------------------------------------------------------
    async def now_ms(self) -> int:
        sec, usec = await self.r.time()
        return int(sec) * 1000 + int(usec) // 1000

    async def camera_names(self) -> list[str]:
        t, names = self._cameras
        if time.monotonic() - t < 3.0:
            return names
        found: set[str] = set()
        async for key in self.r.scan_iter(match=f"{self.prefix}:*", count=1000):  # one pass over the keys
            mid, _, suffix = key[len(self.prefix) + 1 :].rpartition(":")
            if suffix in ("status", "frames", "preview") and NAME_RE.match(mid):
                found.add(mid)
        names = sorted(found)
        self._cameras = (time.monotonic(), names)
        return names

    async def verdicts(self, ids: list[str]) -> dict[str, dict]:
        if not ids:
            return {}
        vals = await self.r.hmget(f"{self.prefix}:verdicts", ids)
        out = {}
        for aid, v in zip(ids, vals):
            if v:
                try:
                    out[aid] = json.loads(v)
                except ValueError:
                    pass
        return out

    def within(self, root: Path | None, named: str | None, suffixes: tuple[str, ...]) -> Path | None:
        """`named` resolved (symlinks too), if it is a regular file under `root` with one of the suffixes."""
        if root is None or not named or not isinstance(named, str) or "\x00" in named:
            return None
        try:
            p = Path(named).resolve()
        except (OSError, RuntimeError, ValueError):
            return None
        if p.suffix.lower() not in suffixes or not p.is_relative_to(root) or not p.is_file():
            return None
        return p

    def clip_for(self, a: dict) -> Path | None:
        """The video sink's recording of the alert's camera that covers its start: among
        `<camera>.mp4` / `<camera>_<n>.mp4` under --video-root, the one last written soonest after it."""
        if self.video_root is None:
            return None
        cam, start = a["msg"].get("camera"), _num(a["msg"].get("start_ts"))
        if not isinstance(cam, str) or not NAME_RE.match(cam) or start is None:
            return None
        pat = re.compile(rf"^{re.escape(cam)}(_\d+)?\.mp4$")
        try:
            files = [p for p in self.video_root.iterdir() if pat.match(p.name)]
        except OSError:
            return None
        best = None
        for p in files:
            q = self.within(self.video_root, str(p), (".mp4",))
            if q is None:
                continue
            mtime = q.stat().st_mtime
            if mtime >= start and (best is None or mtime < best[0]):
                best = (mtime, q)
        return best[1] if best else None

    # -- endpoints --------------------------------------------------------------------------------
    async def index_page(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def api_cameras(self, request: Request) -> Response:
        names = await self.camera_names()
        pipe = self.r.pipeline(transaction=False)
        for n in names:
            pipe.get(f"{self.prefix}:{n}:status")
            pipe.xrevrange(f"{self.prefix}:{n}:frames", "+", "-", count=1)
            pipe.pttl(f"{self.prefix}:{n}:preview")
        res = await pipe.execute() if names else []
        now_ms = await self.now_ms()
        out = []
        for i, n in enumerate(names):
            status_raw, frames, pttl = res[3 * i : 3 * i + 3]
            try:
                st = json.loads(status_raw) if status_raw else {}
            except ValueError:
                st = {}
            latest = None
            if frames:
                sid, f = frames[0]
                latest = frame_record(f) | {"age_s": round((now_ms - _sid(sid)[0]) / 1000, 3)}
            out.append(
                {
                    "name": n,
                    "state": st.get("state", "unknown"),
                    "since": _num(st.get("ts")),
                    "detail": st.get("detail", ""),
                    "latest": latest,
                    "preview": pttl is not None and pttl > 0,
                }
            )
        return JSONResponse({"cameras": out, "now": now_ms / 1000})

    def _camera(self, request: Request) -> str:
        name = request.path_params["name"]
        if not NAME_RE.match(name):
            raise ApiError(400, "camera: expected a camera name ([A-Za-z0-9_.-], at most 128 characters)")
        return name

    async def api_preview(self, request: Request) -> Response:
        name = self._camera(request)
        data = await self.rb.get(f"{self.prefix}:{name}:preview".encode())
        if data is None:
            raise ApiError(404, f"no live preview of camera {name} (offline, or the preview sink is off)")
        return Response(data, media_type="image/jpeg")

    async def api_scores(self, request: Request) -> Response:
        name = self._camera(request)
        seconds = _int_param(request, "seconds", 300, 1, SCORE_WINDOW_S)
        points = _int_param(request, "points", 120, 2, 2000)
        now_ms = await self.now_ms()
        cache = self.scores.setdefault(name, ScoreCache())
        await cache.refresh(self.r, f"{self.prefix}:{name}:frames", now_ms)
        pts = cache.downsample(now_ms - seconds * 1000, now_ms, points)
        last = cache.points[-1] if cache.points else None
        return JSONResponse(
            {
                "camera": name,
                "seconds": seconds,
                "now": now_ms / 1000,
                "points": pts,
                "threshold": last[3] if last else None,
            }
        )

    async def api_alerts(self, request: Request) -> Response:
        q = request.query_params
        for k in q.keys():
            if k not in ("camera", "state", "before", "limit"):
                raise ApiError(400, f"unknown parameter {k!r} (camera, state, before, limit)")
        camera = q.get("camera", "")
        if camera and not NAME_RE.match(camera):
            raise ApiError(400, "camera: expected a camera name ([A-Za-z0-9_.-])")
        state = q.get("state", "")
        if state not in ("", "open", "ended"):
            raise ApiError(400, "state: expected 'open' or 'ended'")
        before = q.get("before") or None
        if before is not None and not STREAM_ID_RE.match(before):
            raise ApiError(400, "before: expected a cursor (a stream id like 1718000000000-0) from next_before")
        limit = _int_param(request, "limit", 50, 1, 200)
        await self.index.refresh()
        ids, nxt = self.index.page(camera, state, before, limit)
        verdicts = await self.verdicts(ids)
        return JSONResponse(
            {
                "alerts": [self.index.summary(a, verdicts.get(a)) for a in ids],
                "next_before": nxt,
                "total": len(self.index.alerts),
            }
        )

    async def _alert(self, request: Request) -> tuple[str, dict]:
        aid = request.path_params["alert_id"]
        if not ALERT_ID_RE.match(aid):
            raise ApiError(400, "alert id: expected [A-Za-z0-9_.-]")
        await self.index.refresh()
        a = self.index.alerts.get(aid)
        if a is None:
            raise ApiError(404, f"no alert {aid} in {self.prefix}:alerts")
        return aid, a

    async def api_alert(self, request: Request) -> Response:
        aid, a = await self._alert(request)
        verdict = (await self.verdicts([aid])).get(aid)
        out = self.index.summary(aid, verdict, detail=True)
        out["snapshot_url"] = (
            f"/api/alerts/{aid}/snapshot.jpg"
            if self.within(self.snap_root, a["msg"].get("snapshot"), (".jpg", ".jpeg", ".png"))
            else None
        )
        out["clip_url"] = f"/api/alerts/{aid}/clip.mp4" if self.clip_for(a) else None
        # the score timeline around the alert, while the frames stream still holds it
        cam = out["camera"]
        timeline: list = []
        if isinstance(cam, str) and NAME_RE.match(cam) and out["start_ts"] is not None:
            t0 = out["start_ts"] - 30
            t1 = (out["end_ts"] or time.time()) + 30
            entries = await self.r.xrange(
                f"{self.prefix}:{cam}:frames", str(int(t0 * 1000)), str(int(t1 * 1000)), count=20000
            )
            step = max(1, len(entries) // 600)
            for sid, f in entries[::step]:
                rec = frame_record(f)
                if rec["score"] is not None:
                    timeline.append(
                        [rec["ts"] if rec["ts"] is not None else _sid(sid)[0] / 1000, rec["score"], rec["threshold"]]
                    )
        out["timeline"] = timeline
        return JSONResponse(out)

    async def api_snapshot(self, request: Request) -> Response:
        aid, a = await self._alert(request)
        if self.snap_root is None:
            raise ApiError(404, "snapshots are not served: start the console with --snapshots-root DIR")
        p = self.within(self.snap_root, a["msg"].get("snapshot"), (".jpg", ".jpeg", ".png"))
        if p is None:
            raise ApiError(
                403 if a["msg"].get("snapshot") else 404,
                "the alert's snapshot is not an image file under --snapshots-root",
            )
        return FileResponse(p)

    async def api_clip(self, request: Request) -> Response:
        aid, a = await self._alert(request)
        if self.video_root is None:
            raise ApiError(404, "clips are not served: start the console with --video-root DIR")
        p = self.clip_for(a)
        if p is None:
            raise ApiError(404, "no recording of this alert's camera under --video-root")
        return FileResponse(p, media_type="video/mp4")

    async def _action(self, request: Request, kind: str) -> Response:
        aid, a = await self._alert(request)
        m = a["msg"]
        now = time.time()
        msg = {
            "v": 1,
            "type": kind,
            "alert_id": aid,
            "camera": m.get("camera"),
            "start_ts": _num(m.get("start_ts")),
            "end_ts": _num(m.get("end_ts")),
            "by": "console",
            "ts": round(now, 3),
        }
        data = json.dumps(msg, separators=(",", ":"), allow_nan=False)
        key = f"{self.prefix}:verdicts"
        if kind == "ack":
            stored = await self.r.hsetnx(key, aid, data)  # an ack never overrides a false alarm
        else:
            await self.r.hset(key, aid, data)
            stored = True
        await self.r.publish(f"{self.prefix}:feedback", data)
        current = (await self.verdicts([aid])).get(aid)
        return JSONResponse({"ok": True, "recorded": bool(stored), "verdict": current})

    async def api_ack(self, request: Request) -> Response:
        return await self._action(request, "ack")

    async def api_false_alarm(self, request: Request) -> Response:
        return await self._action(request, "false_alarm")

    async def api_events(self, request: Request) -> Response:
        q = self.hub.join()

        async def stream():
            try:
                yield "retry: 2000\n: connected\n\n"
                quiet = 0
                while not self.closing:
                    try:
                        item = await asyncio.wait_for(q.get(), 1.0)
                    except asyncio.TimeoutError:
                        quiet += 1
                        if quiet >= 15:
                            quiet = 0
                            yield ": keep-alive\n\n"
                        continue
                    quiet = 0
                    if item is None:
                        return
                    event, data = item
                    yield f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
            finally:
                self.hub.leave(q)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})

    async def api_health(self, request: Request) -> Response:
        await self.r.ping()
        return JSONResponse({"ok": True})

    # -- login ------------------------------------------------------------------------------------
    def _login_page(self, csrf: str, error: str = "", status: int = 200) -> Response:
        page = (STATIC / "login.html").read_text()
        page = page.replace("{{csrf}}", html.escape(csrf)).replace(
            "{{error}}", f'<p class="error">{html.escape(error)}</p>' if error else ""
        )
        return HTMLResponse(page, status_code=status)

    async def login_page(self, request: Request) -> Response:
        if not self.s.token:
            return RedirectResponse("/", status_code=303)
        return self._login_page(request.scope["spade.csrf"])

    async def login(self, request: Request) -> Response:
        if not self.s.token:
            return RedirectResponse("/", status_code=303)
        body = await request.body()
        if len(body) > 4096:
            raise ApiError(413, "request too large")
        form = parse_qs(body.decode("utf-8", "replace"))
        token = (form.get("token") or [""])[0]
        csrf = (form.get("csrf") or [""])[0]
        cookie_csrf = request.cookies.get(CSRF_COOKIE, "")
        if not cookie_csrf or not hmac.compare_digest(csrf.encode(), cookie_csrf.encode()):
            return self._login_page(request.scope["spade.csrf"], "Session expired: please try again.", 403)
        if not hmac.compare_digest(token.encode(), self.s.token.encode()):
            await asyncio.sleep(0.5)  # slows guessing
            log.warning(
                "console: refused a login from %s (wrong token)", request.client.host if request.client else "?"
            )
            return self._login_page(request.scope["spade.csrf"], "Wrong token.", 401)
        resp = RedirectResponse("/", status_code=303)
        resp.set_cookie(
            SESSION_COOKIE, self.session_value, httponly=True, samesite="strict", path="/", max_age=12 * 3600
        )
        return resp

    async def logout(self, request: Request) -> Response:
        resp = JSONResponse({"ok": True})
        resp.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return resp


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = int(raw)
    except ValueError:
        raise ApiError(400, f"{name}: expected an integer from {lo} to {hi}") from None
    if not lo <= v <= hi:
        raise ApiError(400, f"{name}: expected an integer from {lo} to {hi}, got {v}")
    return v


class Guard:
    """ASGI middleware: security headers on every response, Host check, authentication, CSRF."""

    PUBLIC = ("/login", "/static/style.css", "/static/login.css", "/favicon.ico")

    def __init__(self, app, console: Console) -> None:
        self.app = app
        self.c = console
        self.loopback_only = console.s.token is None
        port = console.s.port
        self.allowed_hosts = {h for name in ("127.0.0.1", "localhost", "[::1]") for h in (name, f"{name}:{port}")}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        cookies = _cookies(headers.get("cookie", ""))
        csrf = cookies.get(CSRF_COOKIE)
        new_csrf = None
        if not csrf or not re.fullmatch(r"[A-Za-z0-9_-]{20,64}", csrf):
            csrf = new_csrf = secrets.token_urlsafe(24)
        scope["spade.csrf"] = csrf

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                hs = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if k.lower() != b"cache-control" or not scope["path"].startswith("/api/")
                ]
                present = {k.lower() for k, _ in hs}
                hs += [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                if new_csrf:
                    hs.append((b"set-cookie", f"{CSRF_COOKIE}={new_csrf}; Path=/; SameSite=Strict".encode()))
                message = {**message, "headers": hs}
            await send(message)

        async def refuse(status: int, message: str, extra: dict | None = None):
            resp = JSONResponse({"error": message}, status_code=status, headers=extra)
            await resp(scope, receive, send_wrapped)

        path, method = scope["path"], scope["method"]
        if self.loopback_only and headers.get("host", "") not in self.allowed_hosts:
            return await refuse(
                421, "this console answers only to 127.0.0.1 / localhost (start it with a token to serve other names)"
            )
        if self.c.s.token and path not in self.PUBLIC:
            authed = False
            sess = cookies.get(SESSION_COOKIE)
            if sess and hmac.compare_digest(sess.encode(), self.c.session_value.encode()):
                authed = True
            auth = headers.get("authorization", "")
            if auth.startswith("Bearer ") and hmac.compare_digest(auth[7:].strip().encode(), self.c.s.token.encode()):
                authed = True
            if not authed:
                if path.startswith("/api/") or method != "GET":
                    return await refuse(
                        401, "authentication required: log in at /login (or send Authorization: Bearer <token>)"
                    )
                resp = RedirectResponse("/login", status_code=303)
                return await resp(scope, receive, send_wrapped)
        if method not in ("GET", "HEAD", "OPTIONS"):
            origin = headers.get("origin")
            if origin is not None and origin.split("://", 1)[-1] != headers.get("host", ""):
                return await refuse(403, "cross-origin request refused")
            if path != "/login":  # the login form carries its CSRF token as a field
                sent = headers.get(CSRF_HEADER, "")
                if new_csrf or not sent or not hmac.compare_digest(sent.encode(), csrf.encode()):
                    return await refuse(
                        403, "CSRF token missing or wrong (send the spade_csrf cookie's value in X-CSRF-Token)"
                    )
        await self.app(scope, receive, send_wrapped)


def _cookies(raw: str) -> dict[str, str]:
    out = {}
    for part in raw.split(";"):
        k, sep, v = part.strip().partition("=")
        if sep:
            out.setdefault(k, v)
    return out


def create_app(settings: ConsoleSettings) -> Starlette:
    c = Console(settings)

    async def api_error(request: Request, exc: ApiError) -> Response:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    async def redis_error(request: Request, exc: Exception) -> Response:
        log.warning("console: redis error on %s: %s", request.url.path, type(exc).__name__)
        return JSONResponse({"error": f"redis unavailable ({type(exc).__name__})"}, status_code=503)

    async def not_found(request: Request, exc: Exception) -> Response:
        code = getattr(exc, "status_code", 404)
        return JSONResponse({"error": getattr(exc, "detail", None) or "not found"}, status_code=code)

    async def server_error(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": "internal error (see the console's log)"}, status_code=500)

    routes = [
        Route("/", c.index_page),
        Route("/login", c.login_page, methods=["GET"]),
        Route("/login", c.login, methods=["POST"]),
        Route("/logout", c.logout, methods=["POST"]),
        Route("/api/health", c.api_health),
        Route("/api/cameras", c.api_cameras),
        Route("/api/cameras/{name}/preview.jpg", c.api_preview),
        Route("/api/cameras/{name}/scores", c.api_scores),
        Route("/api/alerts", c.api_alerts),
        Route("/api/alerts/{alert_id}", c.api_alert),
        Route("/api/alerts/{alert_id}/snapshot.jpg", c.api_snapshot),
        Route("/api/alerts/{alert_id}/clip.mp4", c.api_clip),
        Route("/api/alerts/{alert_id}/ack", c.api_ack, methods=["POST"]),
        Route("/api/alerts/{alert_id}/false-alarm", c.api_false_alarm, methods=["POST"]),
        Route("/api/events", c.api_events),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        try:
            await c.r.ping()
            await c.index.refresh(max_age_s=0)
            log.info("console: %d alert(s) in %s:alerts", len(c.index.alerts), c.prefix)
        except (redis.RedisError, OSError) as err:
            log.warning("console: redis not reachable yet (%s); the pages say so until it is", type(err).__name__)
        yield
        if c.hub.task is not None:
            c.hub.task.cancel()
        for q in list(c.hub.clients):
            q.put_nowait(None)
        await c.r.aclose()
        await c.rb.aclose()

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            ApiError: api_error,
            redis.RedisError: redis_error,
            ConnectionError: redis_error,
            404: not_found,
            405: not_found,
            500: server_error,
        },
    )
    app.state.console = c
    app.add_middleware(Guard, console=c)
    return app


def serve(settings: ConsoleSettings, log_level: str = "info") -> None:
    """Run the console until interrupted (blocking)."""
    import uvicorn

    app = create_app(settings)
    host = settings.bind
    log.info(
        "console: http://%s:%d/ (redis prefix %s%s)",
        host if ":" not in host else f"[{host}]",
        settings.port,
        settings.prefix,
        ", token required" if settings.token else "",
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.console.closing = True
            super().handle_exit(sig, frame)

    Server(
        uvicorn.Config(
            app,
            host=host,
            port=settings.port,
            log_level=log_level,
            access_log=False,
            timeout_graceful_shutdown=3,
            proxy_headers=False,
            server_header=False,
        )
    ).run()


def settings_from_args(args) -> ConsoleSettings:
    """Validate the `console` command's arguments (UserError on a problem; never echoes a secret)."""
    from configs.errors import UserError

    if args.secrets_file:
        import configs

        configs.load_secrets(args.secrets_file)
    token = None
    if args.token_env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", args.token_env):
            raise UserError(f"--token-env {args.token_env!r}: expected an environment variable name")
        token = os.environ.get(args.token_env)
        if token is None:
            raise UserError(f"--token-env: environment variable {args.token_env} is not set (nor in --secrets-file)")
        token = token.strip()
        if len(token) < MIN_TOKEN_LEN:
            raise UserError(f"--token-env: the token in {args.token_env} is shorter than {MIN_TOKEN_LEN} characters")
    if not is_loopback(args.bind) and token is None:
        raise UserError(f"--bind {args.bind}: serving beyond this machine needs a token (--token-env NAME)")
    if not args.redis.startswith(("redis://", "rediss://", "unix://")):
        raise UserError("--redis: expected a redis://, rediss:// or unix:// URL")
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: expected 1-65535")
    password = None
    if args.redis_password_env:
        password = os.environ.get(args.redis_password_env)
        if password is None:
            raise UserError(f"--redis-password-env: environment variable {args.redis_password_env} is not set")
    for opt in ("snapshots_root", "video_root"):
        v = getattr(args, opt)
        if v and not Path(v).is_dir():
            raise UserError(f"--{opt.replace('_', '-')} {v}: not a directory")
    if args.prefix and not re.fullmatch(r"[A-Za-z0-9_.-]+", args.prefix):
        raise UserError(f"--prefix {args.prefix!r}: expected [A-Za-z0-9_.-]")
    return ConsoleSettings(
        redis_url=args.redis,
        prefix=args.prefix,
        token=token,
        bind=args.bind,
        port=args.port,
        snapshots_root=args.snapshots_root,
        video_root=args.video_root,
        redis_password=password,
    )

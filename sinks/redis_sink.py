"""Redis sink: frame scores to per-camera streams, alerts to pub/sub + a replayable stream, camera status.

Design: the caller's thread never talks to Redis. `write` / `alert` / `camera_status` only hand data to
one background worker thread that owns the connection, so a slow, dead or black-holed Redis can never
stall the pipeline (the worst a call does is an fsync of one spooled alert line).

- Frames are live telemetry: queued in memory (bounded) while Redis is up, dropped and counted in
  `dropped_frames` while it is down. Replaying minutes of stale scores after an outage helps no one.
- Alerts must not be lost: every alert message is first appended to an on-disk spool (JSON lines,
  fsynced, bounded by `spool_max_mb`) and the worker delivers the spool strictly in order, advancing a
  persisted offset after each delivery. An outage, or a crash of this process, only delays delivery;
  a later RedisSink on the same spool dir picks up where this one stopped.
- Delivery is idempotent per message, keyed by (alert_id, type, frame_index) -- not (alert_id, type):
  one alert has many "update"s, each on its own frame. One Lua script sets a marker key
  `<prefix>:delivered:<alert_id>:<type>:<frame_index>` (7-day TTL) with NX and only then XADDs and
  PUBLISHes, atomically,
  so a retry after an ambiguous failure (reply lost with the connection) or a spool replay after a crash
  publishes nothing twice. If the ACL user may not run scripts, plain XADD + PUBLISH is used and
  delivery is at-least-once; consumers that replay should dedupe on (alert_id, type, frame_index).
"""

from __future__ import annotations

import collections
import errno
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from configs.errors import UserError
from configs.schema import RedisConfig
from detector.result import FrameResult
from sinks.base import AlertEvent
from sinks.schema import alert_message, frame_fields, frame_message, status_message
from stream.avio import redact
from stream.frame import Frame

log = logging.getLogger(__name__)

DELIVERED_TTL_S = 7 * 24 * 3600

# KEYS: marker, alerts stream. ARGV: message JSON, stream maxlen, marker ttl, channel all, channel camera.
_DELIVER_LUA = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[3]) then
  return false
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'data', ARGV[1])
redis.call('PUBLISH', ARGV[4], ARGV[1])
redis.call('PUBLISH', ARGV[5], ARGV[1])
return id
"""

_DOWN_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)


def _spool_key(url: str) -> str:
    """What names a URL's default spool directory: the URL without its password, so a rotated password
    keeps its spool; the same string earlier versions derived, so alerts spooled before an upgrade are
    still found. An identity key, not a display form: what is shown goes through `redact`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable redis url>"
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


class AlertSpool:
    """Durable FIFO of alert lines: `alerts.jsonl` (append only) + `alerts.offset` (bytes delivered).

    Crash safety: lines are fsynced before `append` returns; a torn last line (crash mid-write) is cut
    off at open; the offset file is replaced atomically. Compaction writes offset 0 *before* swapping in
    the compacted data, so a crash in between replays delivered lines (harmless, deduped) instead of
    skipping undelivered ones.
    """

    def __init__(self, dir: Path, max_bytes: int) -> None:
        self.dir = dir
        self.max_bytes = int(max_bytes)
        self.data_path = dir / "alerts.jsonl"
        self.offset_path = dir / "alerts.offset"
        self._lock = threading.Lock()
        dir.mkdir(parents=True, exist_ok=True)
        self._append_f = open(self.data_path, "ab")
        self._size = self._repair_tail()
        self._offset = min(self._read_offset(), self._size)

    def _repair_tail(self) -> int:
        size = self.data_path.stat().st_size
        if size == 0:
            return 0
        with open(self.data_path, "rb") as f:
            f.seek(max(0, size - 65536))
            tail = f.read()
        if tail.endswith(b"\n"):
            return size
        cut = tail.rfind(b"\n")
        keep = size - len(tail) + cut + 1 if cut >= 0 else max(0, size - len(tail))
        log.warning("alert spool %s: dropping a torn last line (%d bytes)", self.data_path, size - keep)
        os.truncate(self.data_path, keep)
        return keep

    def _read_offset(self) -> int:
        try:
            return max(0, int(self.offset_path.read_text().strip() or 0))
        except (OSError, ValueError):
            return 0

    def _write_offset(self, value: int) -> None:
        tmp = self.offset_path.with_suffix(".tmp")
        tmp.write_text(str(value))
        os.replace(tmp, self.offset_path)

    @property
    def pending_bytes(self) -> int:
        return self._size - self._offset

    def append(self, line: bytes) -> bool:
        """Append one line; False (nothing written) when it would exceed the bound."""
        with self._lock:
            if self.pending_bytes + len(line) > self.max_bytes:
                return False
            self._append_f.write(line)
            self._append_f.flush()
            os.fsync(self._append_f.fileno())
            self._size += len(line)
            return True

    def peek(self, max_lines: int) -> list[tuple[int, bytes]]:
        """Up to max_lines undelivered lines, each with the offset just past it (for `ack`)."""
        with self._lock:
            start, end = self._offset, self._size
        if start >= end:
            return []
        out: list[tuple[int, bytes]] = []
        with open(self.data_path, "rb") as f:
            f.seek(start)
            pos = start
            while len(out) < max_lines and pos < end:
                line = f.readline()
                if not line.endswith(b"\n"):
                    break
                pos += len(line)
                out.append((pos, line))
        return out

    def ack(self, offset: int) -> None:
        with self._lock:
            self._offset = offset
            if self._offset >= self._size:
                # Drained: start the file afresh. Truncate first; an offset left past the end is
                # clamped to the size at the next open.
                self._append_f.truncate(0)
                self._append_f.seek(0)
                self._size = self._offset = 0
            elif self._offset >= max(self._size - self._offset, 1 << 16):
                # Delivered head at least as big as the undelivered tail: copying the tail is cheap
                # relative to what it frees, and the file never exceeds ~2x the bound.
                self._compact()
            self._write_offset(self._offset)

    def _compact(self) -> None:
        with open(self.data_path, "rb") as f:
            f.seek(self._offset)
            rest = f.read(self._size - self._offset)
        tmp = self.data_path.with_suffix(".compact")
        with open(tmp, "wb") as f:
            f.write(rest)
            f.flush()
            os.fsync(f.fileno())
        self._write_offset(0)
        os.replace(tmp, self.data_path)
        self._append_f.close()
        self._append_f = open(self.data_path, "ab")
        self._size, self._offset = len(rest), 0

    def close(self) -> None:
        with self._lock:
            self._append_f.close()


def _lock_dir(base: Path) -> tuple[Path, int | None]:
    """Take an exclusive lock on `base` (two writers interleaving one spool would break its order).
    When another live process holds it, fall back to a per-process subdirectory."""
    import fcntl

    base.mkdir(parents=True, exist_ok=True)
    fd = os.open(base / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return base, fd
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
    own = base / f"pid-{os.getpid()}"
    log.warning("alert spool %s is in use by another process; using %s", base, own)
    return _lock_dir(own)


class RedisSink:
    """See the module docstring. Counters: `dropped_frames`, `errors` (failed Redis operations),
    `delivered_alerts`, `duplicate_alerts` (already delivered, skipped), `spool_overflows` (alerts
    that found the spool full and were lost), `failed_alerts` (refused by Redis repeatedly, skipped)."""

    FRAME_QUEUE = 4096  # frames buffered while Redis is up but slower than the pipeline
    FRAME_BATCH = 512
    ALERT_ATTEMPTS = 10  # consecutive refusals (not outages) before a poison alert is skipped

    def __init__(
        self,
        cfg: RedisConfig,
        spool_dir: str | os.PathLike | None = None,
        backoff_min_s: float = 0.1,
        backoff_max_s: float = 2.0,
        close_timeout_s: float = 3.0,
    ) -> None:
        if not cfg.url:
            raise ValueError("RedisConfig.url is required")
        self.cfg = cfg
        self.prefix = cfg.prefix
        self.url_display = redact(cfg.url)
        self.backoff_min_s, self.backoff_max_s = backoff_min_s, backoff_max_s
        self.close_timeout_s = close_timeout_s

        self.client = self._make_client(cfg)
        self._script = self.client.register_script(_DELIVER_LUA)
        self._use_script = True

        base = Path(spool_dir or cfg.spool_dir or self._default_spool_dir(cfg))
        spool_path, self._lock_fd = _lock_dir(base)
        self.spool = AlertSpool(spool_path, int(cfg.spool_max_mb * 1024 * 1024))

        self.dropped_frames = 0
        self.errors = 0
        self.delivered_alerts = 0
        self.duplicate_alerts = 0
        self.spool_overflows = 0
        self.failed_alerts = 0

        self._lock = threading.Lock()
        self._frames: collections.deque = collections.deque()
        self._in_flight = 0  # batches taken off the queues but not yet acknowledged by Redis
        self._status_pending: dict[str, str] = {}
        self._status_last: dict[str, str] = {}
        # message keys delivered by this process: skips spool replays without a round trip.
        self._delivered: collections.OrderedDict = collections.OrderedDict()
        self._accepting = True  # False while Redis is known down: frames are dropped at once
        self._down_since: float | None = None
        self._dropped_at_down = 0
        self._alert_failures = 0
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._closed = False
        if self.spool.pending_bytes:
            log.info(
                "alert spool %s holds %d undelivered bytes from an earlier run", spool_path, self.spool.pending_bytes
            )
        self._thread = threading.Thread(target=self._run, name="redis-sink", daemon=True)
        self._thread.start()

    # -- setup ---------------------------------------------------------------------------------------
    @staticmethod
    def _make_client(cfg: RedisConfig) -> redis.Redis:
        if not cfg.url:
            raise UserError("sinks.redis.url: not set (a Redis sink needs a redis:// or rediss:// URL)")
        t = cfg.socket_timeout_s
        try:
            client = redis.Redis.from_url(
                cfg.url,
                socket_connect_timeout=t,
                socket_timeout=t,
                # One immediate retry replaces a pooled connection that died with a restarted server;
                # anything more is the worker's job, with backoff.
                retry=Retry(NoBackoff(), 1),
                client_name="spade-stream",
            )
        except ValueError as err:
            raise UserError(f"sinks.redis.url: {redact(cfg.url)}: {redact(str(err))}") from None
        if cfg.password_env:
            password = os.environ.get(cfg.password_env)
            if password is None:
                raise UserError(f"sinks.redis.password_env: environment variable {cfg.password_env} is not set")
            # Set on the pool (not passed to from_url, where a password in the URL would win): the
            # explicitly configured secret takes precedence.
            client.connection_pool.connection_kwargs["password"] = password
        if cfg.username_env:
            username = os.environ.get(cfg.username_env)
            if username is None:
                raise UserError(f"sinks.redis.username_env: environment variable {cfg.username_env} is not set")
            client.connection_pool.connection_kwargs["username"] = username
        return client

    @staticmethod
    def _default_spool_dir(cfg: RedisConfig) -> Path:
        tag = hashlib.sha1(_spool_key(cfg.url or "").encode()).hexdigest()[:8]
        return Path(tempfile.gettempdir()) / f"spade-spool-{cfg.prefix}-{tag}"

    # -- Sink protocol (caller's thread: never blocks on Redis) ----------------------------------------
    def write(self, result: FrameResult, frame: Frame) -> None:
        if self._closed:
            return
        with self._lock:
            if not self._accepting:
                self.dropped_frames += 1
                return
            if len(self._frames) >= self.FRAME_QUEUE:
                self._frames.popleft()  # Redis is slower than the camera: keep the newest
                self.dropped_frames += 1
            self._frames.append(frame_message(result))
        self._wake.set()

    def alert(self, event: AlertEvent) -> None:
        if self._closed:
            log.error("alert %s/%s after close: not delivered", event.alert_id, event.type)
            return
        line = (json.dumps(alert_message(event), separators=(",", ":")) + "\n").encode()
        if not self.spool.append(line):
            self.spool_overflows += 1
            log.error(
                "ALERT LOST: spool %s is full (%.0f MB undelivered, Redis %s unreachable?); alert %s/%s dropped",
                self.spool.dir,
                self.spool.pending_bytes / 2**20,
                self.url_display,
                event.alert_id,
                event.type,
            )
            return
        self._wake.set()

    def camera_status(self, camera: str, state: str, detail: str = "") -> None:
        if self._closed:
            return
        msg = json.dumps(status_message(camera, state, time.time(), detail), separators=(",", ":"))
        with self._lock:
            # Status is state, not history: only the latest per camera matters, and it is re-sent
            # after every reconnect (a restarted Redis may have lost the key).
            self._status_pending[camera] = msg
            self._status_last[camera] = msg
        self._wake.set()

    @property
    def connected(self) -> bool:
        return self._accepting and self._down_since is None

    def flush(self, timeout_s: float = 2.0) -> bool:
        """Wait until queued frames, statuses and spooled alerts are delivered. True when all were."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                idle = not self._frames and not self._status_pending and not self._in_flight
            if idle and not self.spool.pending_bytes:
                return True
            self._wake.set()
            time.sleep(0.01)
        return False

    def close(self) -> None:
        """Deliver what is pending if Redis is reachable within `close_timeout_s`, then stop.
        Undelivered alerts stay in the spool for the next run. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._close_deadline = time.monotonic() + self.close_timeout_s
        self._closing.set()
        self._wake.set()
        self._thread.join(self.close_timeout_s + 2 * self.cfg.socket_timeout_s + 1.0)
        if self.spool.pending_bytes:
            log.warning(
                "redis sink closed with %d bytes of alerts undelivered; they stay in %s",
                self.spool.pending_bytes,
                self.spool.dir,
            )
        try:
            self.client.close()
        except Exception:
            pass
        self.spool.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # -- worker thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        up = False
        backoff = self.backoff_min_s
        next_try = 0.0
        while True:
            closing = self._closing.is_set()
            now = time.monotonic()
            if closing and now >= self._close_deadline:
                break
            if not up:
                if closing and not self.spool.pending_bytes:
                    break  # nothing durable left to deliver; frames and statuses die with a dead Redis
                if now >= next_try or closing:  # closing: no backoff, try until the deadline
                    up = self._connect()
                    if up:
                        backoff = self.backoff_min_s
                    else:
                        next_try = time.monotonic() + backoff
                        backoff = min(backoff * 2, self.backoff_max_s)
                if not up:
                    wait = max(0.0, next_try - time.monotonic())
                    self._wake.wait(min(wait, 0.1) if closing else wait)
                    self._wake.clear()
                    continue
            self._wake.clear()
            try:
                busy = self._send_statuses() | self._deliver_spool() | self._send_frames()
            except _DOWN_ERRORS as err:
                up = False
                self._mark_down(err)
                next_try = time.monotonic() + backoff
                continue
            except Exception:  # a bug or an unexpected reply must not kill the only delivery thread
                self.errors += 1
                log.exception("redis sink worker error")
                self._wake.wait(self.backoff_max_s)
                continue
            if closing and not busy:
                break
            if not busy:
                self._wake.wait(0.5)

    def _connect(self) -> bool:
        try:
            self.client.ping()
        except (redis.AuthenticationError, redis.exceptions.AuthorizationError, redis.ResponseError) as err:
            # Wrong password / ACL: a configuration problem, not an outage. Logged as an error, and
            # retried all the same (the password may be rotated while we run).
            self.errors += 1
            self._mark_down(err, level=logging.ERROR)
            return False
        except _DOWN_ERRORS as err:
            self.errors += 1
            self._mark_down(err)
            return False
        except redis.RedisError as err:
            self.errors += 1
            self._mark_down(err, level=logging.ERROR)
            return False
        with self._lock:
            self._accepting = True
            self._status_pending.update(self._status_last)
        if self._down_since is not None:
            log.warning(
                "redis %s reachable again after %.1f s (%d frames dropped meanwhile); "
                "delivering %d bytes of spooled alerts",
                self.url_display,
                time.monotonic() - self._down_since,
                self.dropped_frames - self._dropped_at_down,
                self.spool.pending_bytes,
            )
        self._down_since = None
        return True

    def _mark_down(self, err: Exception, level: int = logging.WARNING) -> None:
        with self._lock:
            self._accepting = False
            lost = len(self._frames)
            self._frames.clear()
            self.dropped_frames += lost
        if self._down_since is None:
            self._down_since = time.monotonic()
            self._dropped_at_down = self.dropped_frames - lost
            # redis-py's messages name host:port at most, never credentials.
            log.log(
                level,
                "redis %s unavailable (%s: %s): dropping frames, spooling alerts to %s",
                self.url_display,
                type(err).__name__,
                str(err)[:200],
                self.spool.dir,
            )

    def _send_statuses(self) -> bool:
        with self._lock:
            pending, self._status_pending = self._status_pending, {}
            if not pending:
                return False
            self._in_flight += 1
        try:
            pipe = self.client.pipeline(transaction=False)
            for camera, msg in pending.items():
                key = f"{self.prefix}:{camera}:status"
                pipe.set(key, msg)
                pipe.publish(key, msg)
            pipe.execute()
        except _DOWN_ERRORS:
            self.errors += 1
            with self._lock:
                for camera, msg in pending.items():
                    self._status_pending.setdefault(camera, msg)  # unless a newer one arrived
            raise
        except redis.RedisError as err:  # refused (ACL, wrong key type): retrying would not help
            self.errors += 1
            log.error("redis refused camera status: %s", err)
        finally:
            with self._lock:
                self._in_flight -= 1
        return True

    def _send_frames(self) -> bool:
        with self._lock:
            n = min(len(self._frames), self.FRAME_BATCH)
            batch = [self._frames.popleft() for _ in range(n)]
            if not batch:
                return False
            self._in_flight += 1
        try:
            pipe = self.client.pipeline(transaction=False)
            for rec in batch:
                pipe.xadd(
                    f"{self.prefix}:{rec['camera']}:frames",
                    dict(frame_fields(rec)),  # type: ignore[arg-type]
                    maxlen=self.cfg.frames_maxlen,
                    approximate=True,
                )
            pipe.execute()
        except Exception as err:
            self.errors += 1
            with self._lock:
                self.dropped_frames += len(batch)
            if isinstance(err, _DOWN_ERRORS):
                raise
            log.error("redis refused frame records: %s", err)
        finally:
            with self._lock:
                self._in_flight -= 1
        return True

    def _deliver_spool(self) -> bool:
        entries = self.spool.peek(64)
        if not entries:
            return False
        for end, line in entries:
            try:
                msg = json.loads(line)
                key = (msg["alert_id"], msg["type"], int(msg["frame_index"]))
            except (ValueError, KeyError, TypeError):
                log.error("alert spool: skipping an unreadable line: %r", line[:200])
                self.spool.ack(end)
                continue
            if key in self._delivered:
                self.duplicate_alerts += 1
            else:
                try:
                    fresh = self._publish_alert(msg, line.rstrip(b"\n").decode())
                except _DOWN_ERRORS:
                    self.errors += 1
                    raise
                except redis.RedisError as err:
                    self.errors += 1
                    self._alert_failures += 1
                    if self._alert_failures < self.ALERT_ATTEMPTS:
                        log.warning("redis refused alert %s/%s@%s (attempt %d): %s", *key, self._alert_failures, err)
                        time.sleep(min(0.05 * 2**self._alert_failures, self.backoff_max_s))
                        return True
                    log.error("ALERT LOST: redis refused alert %s/%s@%s %d times: %s", *key, self._alert_failures, err)
                    self.failed_alerts += 1
                    fresh = None
                self._alert_failures = 0
                if fresh is not None:
                    self._delivered[key] = True
                    if len(self._delivered) > 10000:
                        self._delivered.popitem(last=False)
                    if fresh:
                        self.delivered_alerts += 1
                    else:
                        self.duplicate_alerts += 1
            self.spool.ack(end)
        return True

    def _publish_alert(self, msg: dict, data: str) -> bool:
        """Deliver one alert; True if it went out now, False if Redis had it already."""
        stream = f"{self.prefix}:alerts"
        channels = (f"{self.prefix}:alerts", f"{self.prefix}:{msg['camera']}:alerts")
        if self._use_script:
            marker = f"{self.prefix}:delivered:{msg['alert_id']}:{msg['type']}:{msg['frame_index']}"
            try:
                res = self._script(
                    keys=[marker, stream], args=[data, self.cfg.alerts_maxlen, DELIVERED_TTL_S, *channels]
                )
                return res is not None
            except redis.ResponseError as err:
                text = str(err).lower()
                if "noperm" not in text and "unknown command" not in text and "script" not in text:
                    raise
                log.warning("redis user may not run scripts (%s): alert delivery falls back to at-least-once", err)
                self._use_script = False
        pipe = self.client.pipeline(transaction=False)
        pipe.xadd(stream, {"data": data}, maxlen=self.cfg.alerts_maxlen, approximate=True)
        for ch in channels:
            pipe.publish(ch, data)
        pipe.execute()
        return True

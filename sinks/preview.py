"""Live preview for the operator console: one small annotated JPEG per camera in Redis.

At most `fps` times a second per camera, the frame is downscaled to `max_width`, drawn with
`sinks.annotate.annotate_frame` (heat map, region boxes, status bar), JPEG-encoded, re-encoded at lower
quality (then smaller) until it is at most `max_kb`, and SET to `<prefix>:<camera>:preview` with
`EX ttl_s`: a camera that stops publishing loses its preview after `ttl_s`, so a stale picture is never
shown as live.

Like the Redis sink, the caller's thread never waits on Redis nor on drawing: `write` only checks the
rate and hands the frame to one worker thread, which keeps just the newest frame per camera (previews
are live state, not history: one dropped while Redis is slow or down is simply replaced by the next).
"""

from __future__ import annotations

import logging
import threading
import time

import cv2
import numpy as np

from configs.schema import PreviewConfig, RedisConfig
from detector.result import FrameResult
from sinks.annotate import annotate_frame
from sinks.base import AlertEvent
from stream.frame import Frame

log = logging.getLogger(__name__)

QUALITIES = (80, 65, 50, 38, 28, 20)


def encode_preview(
    image: np.ndarray, result: FrameResult, max_bytes: int, max_width: int = 480, normal_regions: str = "faint"
) -> bytes:
    """The annotated JPEG of one frame, at most `max_bytes` (best effort below ~2 KB): lower quality
    first, then halve the size, until it fits."""
    h, w = image.shape[:2]
    if w > max_width:
        image = cv2.resize(image, (max_width, max(1, round(h * max_width / w))), interpolation=cv2.INTER_AREA)
    rgb = annotate_frame(image, result, normal_regions=normal_regions)  # boxes scale by frame_size
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    buf = b""
    while True:
        for q in QUALITIES:
            ok, enc = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, q])
            if not ok:
                raise RuntimeError("JPEG encoding failed")
            buf = enc.tobytes()
            if len(buf) <= max_bytes:
                return buf
        if bgr.shape[1] <= 64:
            return buf  # as small as it gets
        bgr = cv2.resize(bgr, (bgr.shape[1] // 2, max(1, bgr.shape[0] // 2)), interpolation=cv2.INTER_AREA)


class PreviewSink:
    """See the module docstring. Counters: `published`, `skipped` (replaced by a newer frame before the
    worker got to them), `errors`."""

    def __init__(self, cfg: PreviewConfig, redis_cfg: RedisConfig, client=None, normal_regions: str = "faint") -> None:
        if client is None:
            if not redis_cfg.url:
                raise ValueError("the preview sink needs sinks.redis.url")
            from sinks.redis_sink import RedisSink

            client = RedisSink._make_client(redis_cfg)  # same URL, credentials and timeouts as the Redis sink
        self.client = client
        self.cfg = cfg
        self.prefix = redis_cfg.prefix
        self.normal_regions = normal_regions
        self.interval = 1.0 / cfg.fps
        self.published = self.skipped = self.errors = 0
        self._next_due: dict[str, float] = {}
        self._pending: dict[str, tuple[FrameResult, Frame]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._retry_at = 0.0
        self._thread = threading.Thread(target=self._run, name="preview-sink", daemon=True)
        self._thread.start()

    def key(self, camera: str) -> str:
        return f"{self.prefix}:{camera}:preview"

    # -- Sink protocol (caller's thread) -------------------------------------------------------------
    def write(self, result: FrameResult, frame: Frame) -> None:
        if self._closed:
            return
        now = time.monotonic()
        cam = result.camera_id
        due = self._next_due.get(cam, 0.0)
        if now < due:
            return
        # keep the cadence, but never let a long gap cause a burst
        self._next_due[cam] = max(due + self.interval, now) if now - due < self.interval else now + self.interval
        with self._lock:
            if cam in self._pending:
                self.skipped += 1
            self._pending[cam] = (result, frame)
        self._wake.set()

    def alert(self, event: AlertEvent) -> None:
        pass

    def camera_status(self, camera: str, state: str, detail: str = "") -> None:
        pass  # an offline camera's preview expires by its TTL

    def flush(self, timeout_s: float = 2.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending and not self._busy:
                    return True
            self._wake.set()
            time.sleep(0.01)
        return False

    _busy = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._thread.join(5.0)
        try:
            self.client.close()
        except Exception:
            pass

    # -- worker ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        max_bytes = int(self.cfg.max_kb * 1024)
        while not self._closed:
            self._wake.wait(0.5)
            self._wake.clear()
            with self._lock:
                batch, self._pending = self._pending, {}
                self._busy = bool(batch)
            try:
                if not batch or time.monotonic() < self._retry_at:
                    continue  # Redis was down a moment ago: drop, the next previews replace these
                encoded = {}
                for cam, (result, frame) in batch.items():
                    try:
                        encoded[cam] = encode_preview(
                            frame.image, result, max_bytes, self.cfg.max_width, self.normal_regions
                        )
                    except Exception:
                        self._error("preview of %s failed", cam)
                if encoded:
                    try:
                        pipe = self.client.pipeline(transaction=False)
                        for cam, data in encoded.items():
                            pipe.set(self.key(cam), data, ex=self.cfg.ttl_s)
                        pipe.execute()
                        self.published += len(encoded)
                    except Exception:
                        self._retry_at = time.monotonic() + 1.0
                        self._error("publishing %d preview(s) to redis failed", len(encoded))
            finally:
                with self._lock:
                    self._busy = False

    def _error(self, msg: str, *args) -> None:
        self.errors += 1
        if self.errors <= 3 or self.errors % 100 == 0:
            log.warning(msg + " (%d errors so far)", *args, self.errors, exc_info=self.errors <= 3)

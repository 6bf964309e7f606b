"""One `Source` per camera: a daemon thread decodes its input into a bounded buffer of `Frame`s.

States (each change is reported as a `StatusEvent` to `on_status`):

    CONNECTING -> STREAMING -> STOPPED                 file / image folder (end of input, or stop())
    CONNECTING -> FAILED                               file that cannot be opened or decoded
    CONNECTING -> STREAMING -> RECONNECTING -> ... -> STREAMING -> ... -> STOPPED (stop())
                                                       live: rtsp / http / webcam, retried forever

Buffering depends on what the input is (see `FrameBuffer`):
  * live inputs, and files paced at `cfg.fps` (live simulation): keep the newest `queue_size`
    frames and drop the oldest, so a slow consumer sees fresh frames, never a growing delay;
  * files and image folders read as fast as possible: lossless, the decode thread waits while the
    buffer is full (backpressure), so offline evaluation sees every frame.

How inputs are opened (FFmpeg options, timeouts, error wording, credential redaction) lives in
`stream.avio`; this module only decides when to open, retry, pace and buffer.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import numpy as np

from configs.errors import UserError
from configs.schema import SourceConfig
from stream import avio
from stream.frame import Frame
from stream.picture import Picture

log = logging.getLogger(__name__)

# Media-time step for inputs that carry no timing at all (image folders without cfg.fps).
DEFAULT_FPS = 25.0


class SourceState(str, Enum):
    CONNECTING = "connecting"
    STREAMING = "streaming"
    RECONNECTING = "reconnecting"
    STOPPED = "stopped"
    FAILED = "failed"


TERMINAL_STATES = frozenset({SourceState.STOPPED, SourceState.FAILED})


@dataclass(frozen=True)
class StatusEvent:
    camera: str
    state: SourceState
    detail: str  # human-readable, credentials redacted
    ts: float  # clock() when the state was entered
    retry_in: float | None = None  # RECONNECTING only: seconds until the next attempt


class Backoff:
    """Jittered exponential backoff: attempt n waits around min(cap, base * 2**n).

    "equal" jitter waits in [d/2, d] (never hammers, still spreads cameras that failed together);
    "full" jitter waits in [0, d] (spreads best, but may retry at once).
    """

    def __init__(self, base: float, cap: float, jitter: str = "equal", rng: random.Random | None = None):
        if jitter not in ("equal", "full"):
            raise ValueError(f"jitter must be 'equal' or 'full', got {jitter!r}")
        self.base, self.cap, self.jitter = base, max(cap, 0.0), jitter
        self.rng = rng or random.Random()
        self.attempt = 0

    def ceiling(self) -> float:
        """The un-jittered delay of the next attempt."""
        # min() before the power would overflow after ~1000 attempts of a camera that is gone for days.
        return min(self.cap, self.base * 2.0 ** min(self.attempt, 64))

    def next(self) -> float:
        d = self.ceiling()
        self.attempt += 1
        if self.jitter == "full":
            return self.rng.uniform(0.0, d)
        return d / 2 + self.rng.uniform(0.0, d / 2)

    def reset(self) -> None:
        self.attempt = 0


class FrameBuffer:
    """Bounded frame queue between the decode thread and the consumer.

    drop_oldest=True: `put` never blocks; when full the oldest frame is discarded and counted.
    drop_oldest=False: `put` blocks while full until a `get`, or until `close()`.
    """

    def __init__(self, size: int, drop_oldest: bool):
        self.size, self.drop_oldest = size, drop_oldest
        self._q: deque[Frame] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0

    def put(self, frame: Frame) -> bool:
        """False when the buffer was closed (the source is stopping): the frame is not kept."""
        with self._cond:
            if self.drop_oldest:
                while len(self._q) >= self.size and not self._closed:
                    self._q.popleft()
                    self.dropped += 1
            else:
                while len(self._q) >= self.size and not self._closed:
                    self._cond.wait()
            if self._closed:
                return False
            self._q.append(frame)
            self._cond.notify_all()
            return True

    def get(self, timeout: float) -> Frame | None:
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._cond:
            while not self._q:
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    return None
                self._cond.wait(remaining)
            frame = self._q.popleft()
            self._cond.notify_all()  # wakes a producer waiting for room
            return frame

    def close(self, discard: bool = False) -> None:
        """No more frames will be put. discard=True also empties it (stop(): nothing more is read)."""
        with self._cond:
            self._closed = True
            if discard:
                self._q.clear()
            self._cond.notify_all()

    @property
    def depth(self) -> int:
        return len(self._q)

    @property
    def drained(self) -> bool:
        with self._cond:
            return self._closed and not self._q


class _Stopped(Exception):
    """Unwinds the decode thread when stop() was requested."""


class Source:
    """One camera or file. `start()` launches the decode thread; `read()` returns its frames.

    on_status is called on the decode thread (and from stop()) for every state change; keep it
    quick, exceptions it raises are logged and ignored. `clock` gives frame timestamps of live
    and paced sources and event times (tests inject a fake one).
    """

    def __init__(
        self,
        cfg: SourceConfig,
        on_status: Callable[[StatusEvent], None] | None = None,
        clock: Callable[[], float] = time.time,
        prepare: Callable[[Picture], np.ndarray | None] | None = None,
        decode_threads: int = 0,
        flow=None,
    ):
        self.cfg = cfg
        # Turns each decoded picture into the model input on this source's thread (Detector.prepare).
        self._prepare = prepare
        # Optical flow of each prepared frame against the previous one, also on this thread
        # (detector.motion.FlowTracker: callable on the model input, reset() at every new connection or pass).
        self._flow = flow if prepare is not None else None
        self.hwaccel = avio.resolve_hwaccel(cfg.hwaccel)
        self.decode_threads = decode_threads  # FFmpeg decoder threads; 0: one per core
        self.name = cfg.name
        self.url = avio.redact(cfg.url)  # the only form of the URL this class ever shows
        self.kind: avio.Kind = cfg.kind if cfg.kind != "auto" else avio.classify(cfg.url)
        self.live = self.kind in avio.LIVE_KINDS
        # cfg.fps only paces recorded inputs; a live camera already runs in real time.
        self.paced = not self.live and cfg.fps is not None
        self._on_status = on_status
        self._clock = clock
        self._buffer = FrameBuffer(cfg.queue_size, drop_oldest=self.live or self.paced)
        self._stop = threading.Event()
        self._state_lock = threading.RLock()
        self._state = SourceState.CONNECTING
        self._detail = f"not started ({self.url})"
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # a UserError for bad input; set with FAILED
        self.decoded = 0
        self.sequence = -1  # Frame.sequence: incremented at every new connection or pass
        self.reconnects = 0
        self.last_frame_time: float | None = None  # clock() when the latest frame was decoded
        self.backoff = Backoff(cfg.reconnect_base_s, cfg.reconnect_max_s, cfg.reconnect_jitter)
        self.started_at: float | None = None  # clock() at start()
        self._credentials()  # a missing secret is a configuration error: refuse now, not at first open

    def _credentials(self) -> tuple[str | None, str | None]:
        """(user name, password) from the environment variables the config names (read at every
        open, so a rotated password is picked up at the next reconnect)."""
        import os

        values = []
        for field in ("username_env", "password_env"):
            var = getattr(self.cfg, field)
            if var is None:
                values.append(None)
                continue
            value = os.environ.get(var)
            if value is None:
                raise UserError(
                    f"sources.{self.name}.{field}: environment variable {var} is not set "
                    "(export it, or put it in pipeline.secrets_file)"
                )
            values.append(value)
        return values[0], values[1]

    # -- public ---------------------------------------------------------------------------------

    @property
    def state(self) -> SourceState:
        return self._state

    @property
    def detail(self) -> str:
        return self._detail

    @property
    def finished(self) -> bool:
        """True once read() will never return a frame again: the input ended (file EOF, FAILED,
        stop()) and the buffer is empty. A live source only finishes when stopped."""
        return self._buffer.drained

    @property
    def dropped(self) -> int:
        return self._buffer.dropped

    @property
    def queue_depth(self) -> int:
        return self._buffer.depth

    def start(self) -> Source:
        if self._thread is not None or self._stop.is_set():
            raise RuntimeError(f"source {self.name} already started or stopped; create a new Source")
        self.started_at = self._clock()
        self._set_state(SourceState.CONNECTING, f"opening {self.url}")
        self._thread = threading.Thread(target=self._run, name=f"source-{self.name}", daemon=True)
        self._thread.start()
        return self

    def read(self, timeout: float = 1.0) -> Frame | None:
        """The next frame, or None after `timeout` seconds without one (or when finished)."""
        return self._buffer.get(timeout)

    def health_timeout(self) -> float:
        """Seconds without a frame after which /healthz calls this camera unhealthy."""
        if self.cfg.health_timeout_s is not None:
            return self.cfg.health_timeout_s
        return self.cfg.open_timeout_s + self.cfg.read_timeout_s + self.backoff.ceiling()

    def health(self, now: float | None = None) -> dict:
        """{"healthy", "state", "last_frame_age_s", "timeout_s", "reason"}: no URL, no credentials.

        A file that ended normally is healthy ("ended"); FAILED is not; anything else is unhealthy
        once no frame arrived for `health_timeout()` seconds (since start if none ever did)."""
        now = self._clock() if now is None else now
        state = self._state
        ref = self.last_frame_time if self.last_frame_time is not None else self.started_at
        age = None if ref is None else max(0.0, now - ref)
        timeout = self.health_timeout()
        out = {
            "state": state.value,
            "last_frame_age_s": None
            if self.last_frame_time is None
            else round(max(0.0, now - self.last_frame_time), 3),
            "timeout_s": round(timeout, 3),
        }
        if state == SourceState.FAILED:
            return {**out, "healthy": False, "reason": "failed"}
        if state == SourceState.STOPPED:
            return {**out, "healthy": True, "reason": "ended"}
        if age is not None and age > timeout:
            return {**out, "healthy": False, "reason": f"no frame for {age:.1f} s (timeout {timeout:.1f} s)"}
        return {**out, "healthy": True, "reason": "ok"}

    def request_stop(self) -> None:
        """Ask the decode thread to stop without waiting for it (see `stop`)."""
        self._stop.set()
        self._buffer.close(discard=True)

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop decoding, discard buffered frames, join the thread. True if it ended in time.

        A thread blocked inside a network read cannot be interrupted from outside FFmpeg; it ends
        by itself within read_timeout_s (and closes its container then)."""
        self._stop.set()
        self._buffer.close(discard=True)
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
            if t.is_alive():
                log.warning(
                    "%s: decode thread still blocked on %s after %.1f s; it exits at its read timeout",
                    self.name,
                    self.url,
                    timeout,
                )
                self._set_state(SourceState.STOPPED, "stopped (decode thread still finishing)")
                return False
        self._set_state(SourceState.STOPPED, "stopped")
        return True

    def __enter__(self) -> Source:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- state ----------------------------------------------------------------------------------

    def _set_state(self, state: SourceState, detail: str, retry_in: float | None = None) -> None:
        with self._state_lock:
            if self._state in TERMINAL_STATES:
                return  # STOPPED / FAILED are final; a late stop() or thread exit changes nothing
            detail = avio.redact(detail)
            if state == self._state and detail == self._detail and retry_in is None:
                return
            self._state, self._detail = state, detail
            event = StatusEvent(self.name, state, detail, self._clock(), retry_in)
            if self._on_status is not None:
                try:
                    self._on_status(event)
                except Exception:  # a broken listener must not kill the camera
                    log.exception("%s: on_status callback failed", self.name)

    def _fail(self, err: BaseException, logged: bool = False) -> None:
        self.error = err
        if not logged:  # one line, no traceback: bad input is not a bug
            log.error("%s: %s", self.name, avio.redact(str(err)))
        self._set_state(SourceState.FAILED, str(err))

    # -- decode thread --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self.live:
                self._run_live()
            else:
                self._run_recorded()
        except _Stopped:
            pass
        except UserError as err:
            self._fail(err)
        except Exception as err:  # a bug, not bad input: keep the traceback, minus credentials
            log.error(
                "%s: decode thread crashed:\n%s", self.name, avio.redact("".join(traceback.format_exception(err)))
            )
            self._fail(err, logged=True)
        finally:
            # state before closing the buffer: whoever sees `finished` also sees the final state
            if self._stop.is_set():
                self._set_state(SourceState.STOPPED, "stopped")
            self._buffer.close()

    def _deliver(self, picture: Picture, timestamp: float, wall_ts: float | None = None) -> None:
        if self._state != SourceState.STREAMING:
            w, h = picture.size
            self._set_state(SourceState.STREAMING, f"{w}x{h} from {self.url}")
        small = self._prepare(picture) if self._prepare is not None else None
        flow = self._flow(small) if self._flow is not None else None
        frame = Frame(self.name, self.decoded, timestamp, picture, small, flow, self.sequence, wall_ts)
        self.decoded += 1
        self.last_frame_time = self._clock()
        if not self._buffer.put(frame):
            raise _Stopped()

    def _open(self):
        cfg = self.cfg
        if self.kind == "images":
            return avio.ImageFolder(cfg.url)
        user, password = self._credentials()
        url = avio.with_credentials(cfg.url, user, password)  # never stored: only FFmpeg sees it
        return avio.VideoInput(
            url,
            self.kind,
            open_timeout=cfg.open_timeout_s,
            read_timeout=cfg.read_timeout_s,
            rtsp_transport=cfg.rtsp_transport,
            hwaccel=self.hwaccel,
            threads=self.decode_threads,
        )

    def _run_recorded(self) -> None:
        """File or image folder: once (or forever with cfg.loop), paced or as fast as consumed."""
        period = 1.0 / self.cfg.fps if self.paced else None
        due = None  # monotonic time the next paced frame is due
        offset = 0.0  # media time where the current pass starts (loop keeps timestamps increasing)
        last_ts = None
        while True:
            n = 0
            first_t = None
            with self._open() as src:
                self._new_sequence()
                fps = src.fps or self.cfg.fps or DEFAULT_FPS
                for picture, t in src.pictures():
                    if self._stop.is_set():
                        raise _Stopped()
                    if period is not None:
                        due = self._pace(due, period)
                        ts, wall = self._clock(), None  # paced: the stream's clock is epoch time
                    else:
                        wall = self._clock()
                        if t is None:
                            t = (first_t or 0.0) + n / fps
                        if first_t is None:
                            first_t = t
                        ts = offset + (t - first_t)  # media time from 0 at the first frame
                    self._deliver(picture, ts, wall)
                    last_ts, n = ts, n + 1
                damage = src.damage
            if damage:
                # Frames that decoded were delivered (a cut-off recording is still worth scoring),
                # but nobody should mistake this for the whole file.
                log.warning("%s: %s: %s", self.name, self.url, damage)
            if not self.cfg.loop:
                end = f"end of {self.url} after {self.decoded} frames" + (f" ({damage})" if damage else "")
                self._set_state(SourceState.STOPPED, end)
                return
            if period is None:
                offset = last_ts + 1.0 / fps
            log.debug("%s: looping %s", self.name, self.url)

    def _new_sequence(self) -> None:
        """A new connection or a new pass over a file: its first frame does not follow the last one."""
        self.sequence += 1
        if self._flow is not None:
            self._flow.reset()

    def _pace(self, due: float | None, period: float) -> float:
        """Wait until the frame is due; returns when the next one is due."""
        now = time.monotonic()
        if due is None or now - due > period:
            # first frame, or decoding fell behind: restart the schedule from now instead of
            # bursting through the backlog
            return now + period
        if due > now and self._stop.wait(due - now):
            raise _Stopped()
        return due + period

    def _run_live(self) -> None:
        """Camera/stream: reconnect forever with jittered exponential backoff until stop()."""
        while not self._stop.is_set():
            try:
                with self._open() as src:
                    self._new_sequence()
                    for picture, _t in src.pictures():
                        self.backoff.reset()  # a frame came through: the next failure retries fast
                        self._deliver(picture, self._clock())
                problem = avio.InputError(self.cfg.url, "stream ended", "end of stream")
            except avio.InputError as err:
                if err.permanent:
                    raise
                problem = err
            if self._stop.is_set():
                return
            delay = self.backoff.next()
            self.reconnects += 1
            first = self._state != SourceState.RECONNECTING
            (log.warning if first else log.info)("%s: %s; retrying in %.2f s", self.name, problem, delay)
            self._set_state(SourceState.RECONNECTING, f"{problem}; retrying in {delay:.2f} s", retry_in=delay)
            if self._stop.wait(delay):
                return


def check_recorded(cfgs: list[SourceConfig]) -> None:
    """Open every recorded source (file, image folder) and decode its first frame, before anything
    slow starts: a missing or undecodable file is bad input, reported at once (UserError, one line per
    source) rather than after the model has loaded. Live sources are not opened here: a camera that is
    down at start is not an error, it is reconnected to."""
    problems = []
    for cfg in cfgs:
        try:
            kind = cfg.kind if cfg.kind != "auto" else avio.classify(cfg.url)
            if kind in avio.LIVE_KINDS:
                continue
            if kind == "images":
                src = avio.ImageFolder(cfg.url)
            else:
                src = avio.VideoInput(cfg.url, kind, open_timeout=cfg.open_timeout_s, read_timeout=cfg.read_timeout_s)
            with src:
                next(iter(src.pictures()), None)
        except UserError as err:
            problems.append(f"sources.{cfg.name}: {avio.redact(str(err))}")
    if problems:
        raise UserError("\n".join(problems))

"""The live pipeline: decode threads -> batcher -> detector -> sink thread.

Sources decode in their own threads (stream.sources); the calling thread batches frames from every
camera and runs the detector; one sink thread publishes results so that encoding video or talking to
Redis overlaps the next batch's inference. The sink queue is bounded: for files that is backpressure
(lossless), for live cameras the source buffers drop their oldest frames instead of growing latency.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from app.stats import PipelineStats
from configs.schema import AppConfig
from detector.contract import LiveDetector, ScoredFrames
from sinks import SinkSet
from stream.batcher import Arrival, Batcher
from stream.sources import Source, SourceState, StatusEvent

log = logging.getLogger(__name__)

ONLINE_STATES = {SourceState.STREAMING}
OFFLINE_STATES = {SourceState.RECONNECTING}
TERMINAL_STATES = {SourceState.FAILED, SourceState.STOPPED}


@dataclass
class RunSummary:
    elapsed_s: float
    frames: int
    cameras: dict[str, dict] = field(default_factory=dict)
    reason: str = "finished"
    stage_ms: dict[str, float] = field(default_factory=dict)
    sink_errors: dict[str, int] = field(default_factory=dict)

    @property
    def fps(self) -> float:
        return self.frames / self.elapsed_s if self.elapsed_s > 0 else 0.0


# What the detector thread hands the sink thread, in order (None ends the sink thread).
@dataclass
class ScoredItem:
    """A scored batch: its results are built and published on the sink thread."""

    scored: ScoredFrames
    arrivals: list[Arrival]


@dataclass
class StatusItem:
    """A camera went "online" / "offline"."""

    camera: str
    state: str
    detail: str


@dataclass
class EndCameraItem:
    """A camera's last frame was queued: its open alert ends with `reason`."""

    camera: str
    reason: str


SinkItem = ScoredItem | StatusItem | EndCameraItem


class Pipeline:
    def __init__(
        self,
        cfg: AppConfig,
        detector: LiveDetector,
        sinks: SinkSet,
        sources: Sequence[Source] | None = None,
        stats: PipelineStats | None = None,
        source_factory: Callable | None = None,
    ):
        self.cfg = cfg
        self.detector = detector
        self.sinks = sinks
        self.stats = stats or PipelineStats()
        # Cores shared out among the cameras' decoders (each would otherwise start one thread per core).
        threads = max(1, (os.cpu_count() or 1) // max(1, len(cfg.sources))) if len(cfg.sources) > 1 else 0
        # Model inputs and optical flow are made on each source's decode thread: a flow tracker per source,
        # as each keeps its source's last frame.
        factory = source_factory or (
            lambda sc, cb: Source(
                sc, on_status=cb, prepare=detector.prepare, decode_threads=threads, flow=detector.flow_tracker()
            )
        )
        self.sources = list(sources) if sources is not None else [factory(sc, self._on_status) for sc in cfg.sources]
        self._stop = threading.Event()
        self._sink_q: queue.Queue[SinkItem | None] = queue.Queue(maxsize=4)
        self._online: dict[str, str] = {}  # camera -> "online" / "offline", as last published
        self._final_status: dict[str, str] = {}  # camera -> detail of its final state, held back
        self._status_lock = threading.RLock()
        self._ended: set[str] = set()
        self._reason = "finished"
        self.detector_errors = 0
        # Called on the sink thread for every published frame: fn(camera, latency_s, events).
        # app.prometheus uses it for the latency histogram; an observer that raises is logged and skipped.
        self.observers: list[Callable] = []

    def add_observer(self, fn: Callable) -> None:
        self.observers.append(fn)

    @property
    def sink_queue_depth(self) -> int:
        return self._sink_q.qsize()

    # --- control --------------------------------------------------------------------------------
    def stop(self, reason: str = "shutdown") -> None:
        if not self._stop.is_set():
            self._reason = reason
            self._stop.set()

    def _on_status(self, ev: StatusEvent) -> None:
        """Called on source threads: forwarded to the sink thread so sinks see one ordered stream.

        A source's final state (stopped / failed) is held back until the pipeline has published its
        last frame and ended its open alert (`_finish_camera`): a camera's "offline" for good always
        comes after its alert's "end". A live camera's outage (reconnecting) goes out at once."""
        st = self.stats.camera(ev.camera)
        st.status = ev.state.value if hasattr(ev.state, "value") else str(ev.state)
        with self._status_lock:
            if ev.state in TERMINAL_STATES:
                self._final_status[ev.camera] = ev.detail
                return
            if ev.state in ONLINE_STATES:
                state = "online"
            elif ev.state in OFFLINE_STATES:
                state = "offline"
            else:
                return
            if self._online.get(ev.camera) == state or ev.camera in self._ended:
                return
            self._online[ev.camera] = state
            self._put(StatusItem(ev.camera, state, ev.detail))

    def _finish_camera(self, name: str, reason: str) -> None:
        """The camera's last frame is queued: end its open alert with `reason`, then say it is offline."""
        with self._status_lock:
            self._ended.add(name)
            self._put(EndCameraItem(name, reason))
            detail = self._final_status.pop(name, None) or "stopped"
            if self._online.get(name) != "offline":
                self._online[name] = "offline"
                self._put(StatusItem(name, "offline", detail))

    def _put(self, item: SinkItem | None) -> None:
        while True:
            try:
                self._sink_q.put(item, timeout=0.5)
                return
            except queue.Full:
                if self._sink_thread_dead():
                    return

    def _sink_thread_dead(self) -> bool:
        t = getattr(self, "_sink_thread", None)
        return t is not None and not t.is_alive()

    # --- sink thread ----------------------------------------------------------------------------
    def _sink_loop(self) -> None:
        while True:
            item = self._sink_q.get()
            if item is None:
                return
            try:
                if isinstance(item, ScoredItem):
                    self._publish(item)
                elif isinstance(item, StatusItem):
                    self.sinks.camera_status(item.camera, item.state, item.detail)
                elif isinstance(item, EndCameraItem):
                    self.sinks.end_camera(item.camera, item.reason)
            except Exception:
                log.exception("sink thread: %s failed", type(item).__name__)

    def _publish(self, item: ScoredItem) -> None:
        """A scored batch's results (regions are found here), each published and timed."""
        t0 = time.perf_counter()
        results = item.scored.results()
        t1 = time.perf_counter()
        self.stats.add_stage("regions", t1 - t0)
        for res, arr in zip(results, item.arrivals):
            events = self.sinks.publish(res, arr.frame)
            now = time.time()
            src = arr.source
            captured = (
                arr.frame.timestamp if (getattr(src, "live", False) or getattr(src, "paced", False)) else arr.received
            )
            st = self.stats.camera(res.camera_id)
            latency = max(0.0, now - captured)
            st.record(latency, time.monotonic())
            st.alerts_opened += sum(1 for e in events if e.type == "new")
            for fn in self.observers:
                try:
                    fn(res.camera_id, latency, events)
                except Exception:
                    log.exception("pipeline observer %r failed", fn)
        self.stats.add_stage("sinks", time.perf_counter() - t1)

    # --- main loop ------------------------------------------------------------------------------
    def _check_finished_sources(self) -> None:
        """Announce sources whose input ended: their open alert ends with reason "source_ended"."""
        for s in self.sources:
            if s.name not in self._ended and s.finished:
                if s.error is not None:
                    log.error("%s: %s", s.name, s.error)
                self._finish_camera(s.name, "source_ended")

    def run(self, duration_s: float | None = None, progress: bool | None = None) -> RunSummary:
        """Start the sink thread and the sources, batch and score until the deadline, a stop or the end of
        every input, then shut down in order: sources, their final alerts and statuses, sinks."""
        progress = self.cfg.pipeline.progress if progress is None else progress
        restore = stop_on_signals(lambda: self.stop("shutdown"))
        self._start_threads()
        display = ProgressDisplay(self, enabled=progress)
        display.start()
        t_start = time.monotonic()
        all_done = False
        try:
            all_done = self._main_loop(t_start + duration_s if duration_s else None)
        finally:
            self._shut_down(all_done)
            display.stop()
            restore()
        return self._summary(time.monotonic() - t_start, all_done)

    def _start_threads(self) -> None:
        self._sink_thread = threading.Thread(target=self._sink_loop, name="sinks", daemon=True)
        self._sink_thread.start()
        for s in self.sources:
            self.stats.camera(s.name)
            s.start()

    def _main_loop(self, deadline: float | None) -> bool:
        """Batch and score until stopped or past `deadline`; True when every source's input ended."""
        batcher = Batcher(self.sources, self.cfg.pipeline.max_batch, self.cfg.pipeline.max_wait_ms / 1000.0)
        # Silent cameras must not keep the loop from its deadline or from noticing finished sources.
        idle_s = max(0.5, 4 * self.cfg.pipeline.max_wait_ms / 1000.0)
        while not self._stop.is_set():
            if deadline and time.monotonic() >= deadline:
                self.stop("duration")
                return False
            batch = batcher.next_batch(self._stop, idle_s)
            if batch:
                self._process(batch)
            # only after its last frame was queued for the sinks may a source's end be announced
            self._check_finished_sources()
            if batch is None and batcher.all_finished():
                return True
        return False

    def _shut_down(self, all_done: bool) -> None:
        """Stop the sources, end every camera's alert and status, drain the sink thread, close the sinks."""
        # Ask every source to stop first, then join them against one deadline: a camera stuck
        # in a network read (it ends at its read timeout) must not delay the others' shutdown.
        for s in self.sources:
            s.request_stop()
        stop_deadline = time.monotonic() + 2.0
        stopped = self._stop.is_set()
        for s in self.sources:
            s.stop(timeout=max(0.05, stop_deadline - time.monotonic()))
        reason = (
            "source_ended"
            if all_done and self._reason == "finished"
            else ("shutdown" if self._reason in ("shutdown", "duration", "finished") else self._reason)
        )
        if not stopped:
            self._check_finished_sources()
        for s in self.sources:  # stopped by us (or stuck): their alerts end with the run's reason
            if s.name not in self._ended:
                self._finish_camera(s.name, reason)
        self._put(None)
        self._sink_thread.join()
        self.sinks.close(reason=reason)

    def _summary(self, elapsed: float, all_done: bool) -> RunSummary:
        return RunSummary(
            elapsed_s=elapsed,
            frames=self.stats.frames,
            cameras={
                s.name: {
                    "processed": self.stats.camera(s.name).processed,
                    "decoded": s.decoded,
                    "dropped": s.dropped,
                    "reconnects": s.reconnects,
                    "state": s.state.value,
                    "alerts": self.stats.camera(s.name).alerts_opened,
                    "latency_p50_ms": self.stats.camera(s.name).latency_ms(0.5),
                    "latency_p99_ms": self.stats.camera(s.name).latency_ms(0.99),
                    "error": str(s.error) if s.error else None,
                }
                for s in self.sources
            },
            reason="all sources ended" if all_done else self._reason,
            stage_ms=self.stats.stage_ms_per_frame(),
            sink_errors=dict(self.sinks.errors),
        )

    def _process(self, batch: list[Arrival]) -> None:
        frames = [a.frame for a in batch]
        t0 = time.perf_counter()
        try:
            scored = self.detector.score_batch(frames)
        except Exception:
            self.detector_errors += 1
            log.exception(
                "detector failed on a batch of %d frames (%d failures so far)", len(frames), self.detector_errors
            )
            if self.detector_errors >= 3:
                self.stop("detector_error")
            return
        self.stats.add_stage("detector", time.perf_counter() - t0)
        self.stats.frames += len(frames)
        self.stats.batches += 1
        self._put(ScoredItem(scored, batch))


def stop_on_signals(stop: Callable[[], None]) -> Callable[[], None]:
    """Call `stop` on SIGINT / SIGTERM (main thread only; elsewhere nothing is installed); returns the
    function that puts the previous handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        old[sig] = signal.getsignal(sig)
        signal.signal(sig, lambda _signum, _frame: stop())

    def restore() -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)

    return restore


class ProgressDisplay:
    """A live per-camera table on a terminal; periodic log lines otherwise."""

    def __init__(self, pipeline: Pipeline, enabled: bool, period_s: float | None = None):
        self.p = pipeline
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.period = period_s or (1.0 if self.tty else 10.0)
        self._stop = threading.Event()
        self._lines = 0
        self._t: threading.Thread | None = None

    def start(self) -> None:
        if self.enabled:
            self._t = threading.Thread(target=self._loop, name="progress", daemon=True)
            self._t.start()

    def stop(self) -> None:
        self._stop.set()
        if self._t is not None:
            self._t.join(timeout=2)
            self._render()

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self._render()

    COLUMNS = ("camera", "state", "fps", "lat_p50", "lat_p99", "frames", "dropped", "reconnects", "alerts")

    def values(self) -> list[dict[str, str]]:
        """One dict per camera: column -> text. A latency is "-" until the camera's first frame."""
        now = time.monotonic()
        out = []
        for s in self.p.sources:
            st = self.p.stats.camera(s.name)
            p50, p99 = st.latency_ms(0.5), st.latency_ms(0.99)
            out.append(
                {
                    "camera": s.name,
                    "state": s.state.value,
                    "fps": f"{st.fps(now):.1f}",
                    "lat_p50": "-" if p50 is None else f"{p50:.0f}ms",
                    "lat_p99": "-" if p99 is None else f"{p99:.0f}ms",
                    "frames": str(st.processed),
                    "dropped": str(s.dropped),
                    "reconnects": str(s.reconnects),
                    "alerts": str(st.alerts_opened),
                }
            )
        return out

    def rows(self) -> list[str]:
        """The terminal table: a header, then a row per camera."""
        widths = (16, 12, 6, 8, 8, 8, 8, 10, 6)
        header = ["camera", "state", "fps", "lat p50", "lat p99", "frames", "dropped", "reconnects", "alerts"]

        def line(cells):
            first = [f"{cells[0][:16]:<16}", f"{cells[1][:12]:<12}"]
            return " ".join(first + [f"{c:>{w}}" for c, w in zip(cells[2:], widths[2:])])

        return [line(header)] + [line([v[c] for c in self.COLUMNS]) for v in self.values()]

    def _render(self) -> None:
        if self.tty:
            rows = self.rows()
            up = f"\x1b[{self._lines}F" if self._lines else ""
            sys.stderr.write(up + "".join(f"\x1b[2K{r}\n" for r in rows))
            sys.stderr.flush()
            self._lines = len(rows)
        else:  # a log line per camera, every column named: "camera=gate state=streaming fps=25.0 ..."
            for v in self.values():
                log.info("%s", " ".join(f"{c}={v[c]}" for c in self.COLUMNS))

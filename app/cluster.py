"""Many machines: the live pipeline spread over Ray workers (`run --cluster ADDRESS`), and the offline
`eval` spread over Ray tasks. Optional: `pip install -e '.[cluster]'` (Ray Core only).

Live (`ClusterRunner`)
    The driver (the `run` process) plans which cameras go to which `CameraWorker` actor, starts the actors
    and watches them. Each worker runs the ordinary pipeline (`app.cli.run_pipeline`) on its shard of
    cfg.sources in a thread, with its own sinks writing to the shared Redis (the same keys and messages as
    one process); the actor itself answers `status()` and `stop()`.

    Workers: one per GPU where the cluster has GPUs (`num_gpus=1`), else one per `cpus_per_worker` CPUs;
    never more than there are cameras. Placement (`plan`): a camera costs width x height x fps (probed
    from a file, `sources[].fps` when set; `DEFAULT_COST`, 1280x720 at 25 fps, where unknown). Cameras
    are grouped by bank first (sources[].bank, else the run's --bank) so that a bank is loaded only by
    the workers of its group: with at least as many groups as workers, whole groups are spread by greedy
    longest-processing-time (LPT); with fewer, each group gets workers in proportion to its cost (at least
    one) and its cameras are spread over them by LPT.

    Watching: every `poll_s` the driver asks each worker for `status()`; a `RayActorError`
    (`ActorDiedError`, ...) or no answer within `deadline_s` counts as death. The driver then kills the
    actor (so a stalled one cannot publish beside its replacement), publishes "offline" (detail "worker
    W lost") for each of its cameras, delivers the dead worker's alert spool if the driver can see it
    (shared storage), and runs the cameras again: on a new actor where capacity is free, else (no
    capacity within `place_timeout_s`) on the survivors, restarting the least-loaded ones with the
    bigger shard. Every status a worker's pipeline publishes names the worker in its `detail`
    ("... (worker w2)"), so a moved camera's status key goes offline ("worker w1 lost") -> online
    ("... (worker w2)").

    Rebalance: on demand, by publishing `rebalance` on the Redis channel `<prefix>:cluster:commands`
    (e.g. after a node joined): the driver plans again for the capacity it now sees and restarts only the
    workers whose shard changed. (Not automatic on node join: a restart costs each moved camera a few
    seconds, so an operator decides when.)

    Alerts: ids (`<camera>-<start_ms>-<6 random hex>`) stay unique across workers. A moved camera's
    tracker starts fresh on its new worker: an alert open on a worker that died gets no `end` (nothing
    is left to send one); the camera's "offline" status ("worker W lost") is what consumers see instead,
    and if the anomaly is still there the new worker opens a *new* alert (new id) after
    `alerts.min_duration_s`. No message is duplicated by a move: each (alert_id, type, frame_index) is
    delivered at most once (the Redis sink's marker keys), and a dead worker's alerts are never re-sent
    by another. A worker stopped by the driver (shutdown, rebalance, restart with a bigger shard) ends its
    alerts with reason "shutdown" as a single process does.

    Spools: each worker spools alerts to `<sinks.redis.spool_dir>/<worker>` (or `<out>/<worker>/redis-spool`
    on its own node). What a node loss can lose: only the alerts that node had spooled but not yet delivered
    (Redis unreachable from it, or the last ~ms before its death); frame records are never spooled.
    Put `sinks.redis.spool_dir` on storage every node and the driver mount (NFS, ...): the driver then
    delivers a dead worker's spool itself, idempotently, and nothing is lost.

    Stop: SIGINT/SIGTERM (or `stop()`, or `duration`) stops every worker's pipeline gracefully (sinks
    flushed, alert spools closed), and `run` prints a strict-JSON summary: cameras per worker, restarts,
    frames per camera.

    Observability: with a metrics port (`--metrics-port`), each worker serves its own Prometheus
    `/metrics` and `/healthz` on a free port (on `pipeline.metrics_host`; set it to 0.0.0.0 to scrape from
    other machines) and reports host:port; the driver serves `/healthz` (every camera of every worker;
    503 when any camera is unhealthy or a worker is down) and `/workers` (JSON: each worker's metrics
    endpoint, node and cameras) and `/targets` (the same endpoints for Prometheus' `http_sd_configs`)
    on the given port.

Offline (`evaluate_cluster`, `eval --cluster ADDRESS`): test videos spread over Ray tasks, metrics.json the
single-process one. Banks are read from a shared path by every task (not shipped through Ray's object
store, which would copy gigabytes per task). `fit` has no --cluster: a per-scene fit selects its frames
over all scenes together (detector/scenes.py), so it does not split into independent tasks as it is.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from app.pipeline import stop_on_signals
from configs.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_COST = 1280 * 720 * 25.0  # pixels per second of a camera whose size and rate are unknown
DEFAULT_BANK = "<run bank>"


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--cluster needs Ray: pip install -e '.[cluster]'") from None
    return ray


# --- placement ---------------------------------------------------------------------------------------
@dataclass
class CameraCost:
    name: str
    bank: str
    cost: float


def camera_cost(src) -> float:
    """width x height x fps of a source: probed from a local file (sources[].fps wins when set);
    `DEFAULT_COST` where unknown (live cameras, unreadable files)."""
    url = src.url
    if "://" not in url and Path(url).is_file():
        try:
            import av

            with av.open(url) as c:
                v = c.streams.video[0]
                w, h = v.codec_context.width, v.codec_context.height
                fps = float(src.fps or v.average_rate or 25.0)
                if w and h:
                    return float(w * h * fps)
        except Exception:  # unreadable here (a path only the workers see): the default weight
            pass
    return DEFAULT_COST if not src.fps else DEFAULT_COST / 25.0 * float(src.fps)


def _lpt(items: list, n: int, cost) -> list[list]:
    """Greedy longest-processing-time: largest first onto the least-loaded bin."""
    bins: list[list] = [[] for _ in range(n)]
    loads = [0.0] * n
    for it in sorted(items, key=lambda x: (-cost(x), str(x))):
        k = min(range(n), key=lambda i: (loads[i], i))
        bins[k].append(it)
        loads[k] += cost(it)
    return bins


def plan(cameras: list[CameraCost], n_workers: int) -> list[list[str]]:
    """Shards of camera names, one per worker (no empty one), balanced by cost, grouped by bank."""
    n = max(1, min(n_workers, len(cameras)))
    groups: dict[str, list[CameraCost]] = {}
    for c in cameras:
        groups.setdefault(c.bank, []).append(c)
    if len(groups) >= n:  # whole groups onto workers: every bank is loaded by one worker
        bins = _lpt(list(groups.values()), n, lambda g: sum(c.cost for c in g))
        shards = [[c.name for g in b for c in g] for b in bins]
    else:  # workers shared out among the groups in proportion to their cost, at least one each
        total = sum(c.cost for c in cameras) or 1.0
        keys = sorted(groups, key=lambda k: -sum(c.cost for c in groups[k]))
        want = {k: sum(c.cost for c in groups[k]) / total * n for k in keys}
        alloc = {k: max(1, min(len(groups[k]), int(want[k]))) for k in keys}
        while sum(alloc.values()) < n:
            free = [k for k in keys if alloc[k] < len(groups[k])]
            if not free:
                break
            k = max(free, key=lambda k: want[k] - alloc[k])
            alloc[k] += 1
        shards = []
        for k in keys:
            shards += [[c.name for c in b] for b in _lpt(groups[k], alloc[k], lambda c: c.cost)]
    return [s for s in shards if s]


def camera_costs(cfg, bank) -> list[CameraCost]:
    return [CameraCost(s.name, s.bank or (str(bank) if bank else DEFAULT_BANK), camera_cost(s)) for s in cfg.sources]


# --- the worker actor ----------------------------------------------------------------------------------
class CameraWorker:
    """A Ray actor (created with `ray.remote(CameraWorker)`; threaded, so `status()` answers while `stop()`
    waits): runs `app.cli.run_pipeline` on a shard of the cameras in a thread."""

    def __init__(self, worker_id: str, cfg, bank: str | None, out_dir: str, metrics: bool = False) -> None:
        self.worker_id = worker_id
        self.cfg = cfg
        self.bank = bank
        self.out_dir = out_dir
        self.metrics = metrics
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pipe = None
        self._server = None
        self._stop_requested = False
        self._state = "idle"
        self._error: str | None = None
        self._summary: dict | None = None
        self._cameras: list[str] = []
        self._runs = 0
        self._done_frames: dict[str, int] = {}  # frames of earlier runs of this actor

    def ready(self) -> dict:
        import ray

        return {
            "worker": self.worker_id,
            "node_id": ray.get_runtime_context().get_node_id(),
            "host": _node_ip(),
            "pid": os.getpid(),
        }

    def start(self, cameras: list[str]) -> bool:
        """Run the pipeline on `cameras` (a previous run must have ended: see `stop`)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                raise RuntimeError(f"worker {self.worker_id} is still running {self._cameras}")
            self._cameras = list(cameras)
            self._stop_requested = False
            self._pipe = None
            self._state, self._error, self._summary = "starting", None, None
            self._runs += 1
            self._thread = threading.Thread(
                target=self._run, args=(list(cameras), self._runs), name=f"pipeline-{self.worker_id}", daemon=True
            )
            self._thread.start()
        return True

    def _run(self, cameras: list[str], run_no: int) -> None:
        from app.cli import run_pipeline

        cfg = self.cfg.model_copy(deep=True)
        cfg.sources = [s for s in cfg.sources if s.name in set(cameras)]
        out = Path(self.out_dir) / self.worker_id
        if cfg.sinks.redis.spool_dir:
            cfg.sinks.redis.spool_dir = str(Path(cfg.sinks.redis.spool_dir) / self.worker_id)
        if cfg.sinks.video.dir:
            cfg.sinks.video.dir = str(Path(cfg.sinks.video.dir) / self.worker_id)
        cfg.pipeline.metrics_port = None  # this actor serves the metrics itself, on a free port
        cfg.pipeline.progress = False
        cpu0 = time.process_time()
        try:
            summary = run_pipeline(
                cfg, Path(self.bank) if self.bank else None, out, None, progress=False, on_pipeline=self._attach
            )
            with self._lock:
                self._summary = {
                    "reason": summary.reason,
                    "frames": summary.frames,
                    "cameras": summary.cameras,
                    "elapsed_s": summary.elapsed_s,
                    "cpu_s": time.process_time() - cpu0,
                }
                self._state = "finished"
        except BaseException as err:  # noqa: BLE001 (reported to the driver)
            log.exception("worker %s: pipeline failed", self.worker_id)
            with self._lock:
                self._error = f"{type(err).__name__}: {err}"
                self._state = "failed"
        finally:
            server, self._server = self._server, None
            if server is not None:
                server.stop()

    def _attach(self, pipe) -> None:
        """Called by run_pipeline before the run: keep the pipeline, name this worker in every camera
        status the pipeline publishes, serve its metrics."""
        sinks = pipe.sinks
        publish_status = sinks.camera_status
        wid = self.worker_id

        def camera_status(camera, state, detail=""):
            return publish_status(camera, state, f"{detail} (worker {wid})" if detail else f"worker {wid}")

        sinks.camera_status = camera_status
        if self.metrics:
            from app.prometheus import MetricsServer

            self._server = MetricsServer(pipe, 0, host=self.cfg.pipeline.metrics_host).start()
        with self._lock:
            self._pipe = pipe
            self._state = "running"
            if self._stop_requested:
                pipe.stop("shutdown")

    def status(self) -> dict:
        from app.prometheus import camera_health

        with self._lock:
            pipe, state = self._pipe, self._state
            cams: dict[str, dict] = {}
            if pipe is not None:
                health = camera_health(pipe)
                for s in pipe.sources:
                    cams[s.name] = {
                        "state": s.state.value,
                        "processed": pipe.stats.camera(s.name).processed,
                        "healthy": bool(health.get(s.name, {}).get("healthy", True)),
                    }
            for name in self._cameras:
                cams.setdefault(name, {"state": state, "processed": 0, "healthy": state == "starting"})
            metrics = None
            if self._server is not None:
                host = self._server.host
                if host in ("0.0.0.0", "", "::"):
                    host = _node_ip()
                metrics = f"{host}:{self._server.port}"
            return {
                "worker": self.worker_id,
                "state": state,
                "cameras": cams,
                "metrics": metrics,
                "error": self._error,
                "host": _node_ip(),
                "pid": os.getpid(),
            }

    def stop(self, timeout_s: float = 30.0) -> dict:
        """Stop the run gracefully (sources, open alerts end with "shutdown", sinks flushed and closed) and
        wait for it; returns the run's summary."""
        with self._lock:
            self._stop_requested = True
            pipe, t = self._pipe, self._thread
        if pipe is not None:
            pipe.stop("shutdown")
        if t is not None:
            t.join(timeout_s)
        st = self.status()
        with self._lock:
            st["summary"] = self._summary
        return st


_REMOTE: dict = {}


def _remote_worker_class(ray):
    if "worker" not in _REMOTE:
        _REMOTE["worker"] = ray.remote(CameraWorker)
    return _REMOTE["worker"]


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        return socket.gethostname()


# --- the driver ----------------------------------------------------------------------------------------
@dataclass
class _Worker:
    id: str
    handle: object
    cameras: list[str]
    started: float
    node_id: str | None = None
    host: str | None = None
    status: dict = field(default_factory=dict)
    pending: object = None  # outstanding status() ref
    pending_since: float = 0.0
    last_ok: float = 0.0
    alive: bool = True


class ClusterRunner:
    """Runs cfg.sources over Ray `CameraWorker` actors and keeps them running (see the module docstring).

    `address`: a Ray address (`auto`, `ray://host:10001`, `host:6379`), `local` (Ray started in this
    process), or None to use the Ray this process is already connected to."""

    def __init__(
        self,
        cfg,
        bank: Path | None,
        out_dir: Path,
        address: str | None = "local",
        cpus_per_worker: float = 1.0,
        duration: float | None = None,
        metrics_port: int | None = None,
        poll_s: float = 1.0,
        deadline_s: float = 10.0,
        place_timeout_s: float = 5.0,
        max_workers: int | None = None,
        local_cpus: int | None = None,
    ) -> None:
        from app.cli import check_sources

        check_sources(cfg)
        if not cfg.sinks.redis.url:
            raise UserError(
                "--cluster needs a Redis URL (--redis or sinks.redis.url): every worker publishes to the shared Redis"
            )
        if cpus_per_worker <= 0:
            raise UserError(f"--cpus-per-worker: expected a positive number, got {cpus_per_worker}")
        self.cfg = cfg
        self.bank = str(bank) if bank else None
        self.out_dir = Path(out_dir).resolve()
        self.address = address
        self.cpus_per_worker = cpus_per_worker
        self.duration = duration
        self.metrics_port = metrics_port
        self.poll_s, self.deadline_s, self.place_timeout_s = poll_s, deadline_s, place_timeout_s
        self.max_workers = max_workers
        self.local_cpus = local_cpus
        self.costs = {c.name: c for c in camera_costs(cfg, bank)}
        self.workers: dict[str, _Worker] = {}
        self.restarts: list[dict] = []
        self.rebalances = 0
        self.finished: dict[str, dict] = {}  # worker id -> final status (stopped or dead)
        self.frames_before: dict[str, int] = {s.name: 0 for s in cfg.sources}  # frames of camera runs that ended
        self._n = 0
        self._stop = threading.Event()
        self._reason = "finished"
        self._ray = None
        self._started_ray = False
        self._redis = None
        self._http = None
        self._lock = threading.RLock()
        self.moved: dict[str, float] = {}  # camera -> when its worker's death was detected (last time)

    # -- control --------------------------------------------------------------------------------------
    def stop(self, reason: str = "shutdown") -> None:
        if not self._stop.is_set():
            self._reason = reason
            self._stop.set()

    # -- resources --------------------------------------------------------------------------------------
    def _connect(self) -> None:
        ray = self._ray = _import_ray()
        if ray.is_initialized():
            return
        kw = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        if self.address in (None, "local"):
            n = self.local_cpus or max(1, int(math.ceil(self.cpus_per_worker)) * len(self.cfg.sources))
            ray.init(
                address="local",  # a new Ray of its own, even where RAY_ADDRESS names a running one
                num_cpus=min(n, os.cpu_count() or 1) if not self.local_cpus else n,
                object_store_memory=100 * 1024 * 1024,
                **kw,
            )
        else:
            try:
                ray.init(address=self.address, **kw)
            except Exception as err:
                raise UserError(f"--cluster {self.address}: cannot connect to Ray ({err})") from None
        self._started_ray = True

    def _gpus(self) -> float:
        return float(self._ray.cluster_resources().get("GPU", 0))

    def _options(self) -> dict:
        if self._gpus() >= 1:
            return {"num_gpus": 1, "num_cpus": 0}
        return {"num_cpus": self.cpus_per_worker}

    def capacity(self) -> int:
        """How many workers the cluster's alive nodes hold: one per GPU, else one per cpus_per_worker CPUs."""
        gpus, cpus = 0.0, 0.0
        for node in self._ray.nodes():
            if node.get("Alive"):
                res = node.get("Resources", {})
                gpus += res.get("GPU", 0.0)
                cpus += res.get("CPU", 0.0)
        n = int(gpus) if gpus >= 1 else int(cpus // self.cpus_per_worker + 1e-9)
        if self.max_workers:
            n = min(n, self.max_workers)
        return max(1, n)

    def _free_slots(self) -> int:
        avail = self._ray.available_resources()
        if self._gpus() >= 1:
            return int(avail.get("GPU", 0))
        return int(avail.get("CPU", 0) // self.cpus_per_worker + 1e-9)

    # -- workers ------------------------------------------------------------------------------------------
    def _new_worker(self, cameras: list[str]) -> _Worker:
        ray = self._ray
        wid = f"w{self._n}"
        self._n += 1
        opts = dict(max_concurrency=4, max_restarts=0, **self._options())
        handle = (
            _remote_worker_class(ray)
            .options(**opts)
            .remote(wid, self._worker_cfg(), self.bank, str(self.out_dir), self.metrics_port is not None)
        )
        w = _Worker(wid, handle, list(cameras), time.monotonic())
        w.last_ok = w.started
        with self._lock:
            self.workers[wid] = w
        return w

    def _worker_cfg(self):
        cfg = self.cfg.model_copy(deep=True)
        if cfg.detector.threads is None and self._gpus() < 1:
            cfg.detector.threads = max(1, int(self.cpus_per_worker))
        return cfg

    def _launch(self, w: _Worker) -> None:
        w.handle.start.remote(w.cameras)

    def _await_ready(self, workers: list[_Worker], timeout: float) -> list[_Worker]:
        """Workers whose actor was placed and answered within `timeout`; records their node."""
        ray = self._ray
        refs = {w.handle.ready.remote(): w for w in workers}
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        ok = []
        for r in done:
            w = refs[r]
            try:
                info = ray.get(r)
            except Exception:
                continue
            w.node_id, w.host = info["node_id"], info["host"]
            ok.append(w)
        return ok

    def _kill(self, w: _Worker) -> None:
        w.alive = False
        try:
            self._ray.kill(w.handle, no_restart=True)
        except Exception:
            pass

    def _stop_workers(self, workers: list[_Worker], timeout_s: float = 30.0) -> None:
        ray = self._ray
        refs = {w.handle.stop.remote(timeout_s): w for w in workers}
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s + 10)
        for r in refs:
            w = refs[r]
            st = None
            if r in done:
                try:
                    st = ray.get(r)
                except Exception:
                    st = None
            self._retire(w, st or w.status, stopped=st is not None)

    def _retire(self, w: _Worker, st: dict, stopped: bool) -> None:
        """Account a worker's frames and remove it from the running set."""
        with self._lock:
            self.workers.pop(w.id, None)
            cams = (st or {}).get("cameras", {})
            summary = (st or {}).get("summary") or {}
            for name in w.cameras:
                n = (summary.get("cameras", {}).get(name, {}) or {}).get("processed")
                if n is None:
                    n = (cams.get(name) or {}).get("processed", 0)
                self.frames_before[name] = self.frames_before.get(name, 0) + int(n or 0)
            self.finished[w.id] = {
                "cameras": list(w.cameras),
                "node": w.host,
                "state": "stopped" if stopped else "lost",
                "metrics": w.status.get("metrics") or (st or {}).get("metrics"),
                "error": (st or {}).get("error"),
                "run_s": summary.get("elapsed_s"),
                "frames": summary.get("frames"),
                "cpu_s": summary.get("cpu_s"),
            }
        if stopped:
            self._kill(w)

    # -- status publishing (driver side) ----------------------------------------------------------------
    def _redis_client(self):
        if self._redis is None:
            from sinks.redis_sink import RedisSink

            self._redis = RedisSink._make_client(self.cfg.sinks.redis)
        return self._redis

    def _publish_offline(self, cameras: list[str], detail: str) -> None:
        from configs import jsonsafe
        from sinks.schema import status_message

        prefix = self.cfg.sinks.redis.prefix
        try:
            r = self._redis_client()
            for cam in cameras:
                data = jsonsafe.dumps(status_message(cam, "offline", time.time(), detail))
                key = f"{prefix}:{cam}:status"
                r.set(key, data)
                r.publish(key, data)
        except Exception as err:
            log.warning("could not publish offline status of %s: %s", cameras, err)

    def _drain_spool(self, w: _Worker) -> None:
        """A dead worker's undelivered alerts, delivered from here when the driver can see its spool
        (shared storage, or one machine): idempotent, so nothing is sent twice."""
        base = self.cfg.sinks.redis.spool_dir
        spool = Path(base) / w.id if base else self.out_dir / w.id / "redis-spool"
        if not (spool / "alerts.jsonl").is_file():
            return
        try:
            from sinks.redis_sink import RedisSink

            sink = RedisSink(self.cfg.sinks.redis, spool_dir=spool, close_timeout_s=5.0)
            pending = sink.spool.pending_bytes
            sink.close()
            if pending:
                log.info("delivered %d bytes of worker %s's spooled alerts", pending, w.id)
        except Exception as err:
            log.warning("could not deliver the spool of worker %s (%s): %s", w.id, spool, err)

    # -- the loop ------------------------------------------------------------------------------------------
    def run(self) -> dict:
        self._connect()
        restore = stop_on_signals(lambda: self.stop("shutdown"))
        t0 = time.monotonic()
        try:
            self._start_http()
            shards = plan(list(self.costs.values()), min(self.capacity(), len(self.costs)))
            ws = [self._new_worker(s) for s in shards]
            for w in ws:
                self._launch(w)
            self._await_ready(ws, 60.0)
            deadline = t0 + self.duration if self.duration else None
            self._subscribe()
            while not self._stop.is_set():
                if deadline and time.monotonic() >= deadline:
                    self.stop("duration")
                    break
                self._poll()
                self._commands()
                with self._lock:
                    running = [w for w in self.workers.values() if w.status.get("state") not in ("finished", "failed")]
                    if not running and self.workers:
                        self._reason = "all sources ended"
                        break
                self._stop.wait(self.poll_s)
        finally:
            try:
                self._stop_workers(list(self.workers.values()))
            finally:
                restore()
                self._stop_http()
                if self._redis is not None:
                    self._redis.close()
                if self._started_ray:
                    self._ray.shutdown()
        return self.summary(time.monotonic() - t0)

    def _poll(self) -> None:
        ray = self._ray
        now = time.monotonic()
        with self._lock:
            ws = list(self.workers.values())
        for w in ws:
            if w.pending is None:
                w.pending, w.pending_since = w.handle.status.remote(), now
        refs = [w.pending for w in ws]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=min(self.poll_s, 1.0))
        done = set(done)
        dead = []
        for w in ws:
            if w.pending in done:
                try:
                    w.status = ray.get(w.pending)
                    w.last_ok = time.monotonic()
                except Exception as err:  # RayActorError / ActorDiedError / ActorUnavailableError
                    log.warning("worker %s died: %s", w.id, type(err).__name__)
                    dead.append(w)
                w.pending = None
            elif time.monotonic() - w.pending_since > self.deadline_s:
                log.warning("worker %s missed its status deadline (%.0f s)", w.id, self.deadline_s)
                dead.append(w)
        if dead:
            self._recover(dead)

    def _recover(self, dead: list[_Worker]) -> None:
        """Run the dead workers' cameras again: new actors where capacity is free, else on survivors."""
        t_detect = time.monotonic()
        orphans: list[str] = []
        for w in dead:
            self._kill(w)
            self._publish_offline(w.cameras, f"worker {w.id} lost")
            for c in w.cameras:
                self.moved[c] = t_detect
            self._retire(w, w.status, stopped=False)
            self._drain_spool(w)
            orphans += w.cameras
        if not orphans or self._stop.is_set():
            return
        record = {
            "lost": [w.id for w in dead],
            "cameras": sorted(orphans),
            "to": [],
            "how": None,
            "at_s": round(time.time(), 3),
        }
        new = []
        free = self._free_slots()
        if free >= 1:
            shards = plan([self.costs[c] for c in orphans], min(free, len(dead), len(orphans)) or 1)
            new = [self._new_worker(s) for s in shards]
            ok = self._await_ready(new, self.place_timeout_s)
            for w in new:
                if w in ok:
                    self._launch(w)
                else:  # not placed in time: no capacity after all
                    self._kill(w)
                    with self._lock:
                        self.workers.pop(w.id, None)
            placed = [w for w in new if w in ok]
            left = [c for w in new if w not in ok for c in w.cameras]
            record["to"] += [w.id for w in placed]
            record["how"] = "replacement"
        else:
            left = orphans
        if left:
            self._merge(left, record)
        record["recovery_s"] = round(time.monotonic() - t_detect, 2)
        self.restarts.append(record)

    def _merge(self, cameras: list[str], record: dict) -> None:
        """No capacity: the least-loaded survivors take the cameras, restarted with their bigger shard."""
        with self._lock:
            survivors = [w for w in self.workers.values() if w.alive]
        if not survivors:  # the whole cluster is gone: wait for capacity on a fresh actor
            w = self._new_worker(cameras)
            self._launch(w)
            record["to"].append(w.id)
            record["how"] = (record["how"] + "+" if record["how"] else "") + "new"
            return
        load = {w.id: sum(self.costs[c].cost for c in w.cameras) for w in survivors}
        extra: dict[str, list[str]] = {}
        for c in sorted(cameras, key=lambda c: -self.costs[c].cost):
            # keep a bank's cameras together: prefer a survivor that already loads that bank
            same = [w for w in survivors if any(self.costs[x].bank == self.costs[c].bank for x in w.cameras)]
            pick = min(same or survivors, key=lambda w: load[w.id])
            extra.setdefault(pick.id, []).append(c)
            load[pick.id] += self.costs[c].cost
        targets = [w for w in survivors if w.id in extra]
        self._restart_with(targets, {w.id: w.cameras + extra[w.id] for w in targets})
        record["to"] += [w.id for w in targets]
        record["how"] = (record["how"] + "+" if record["how"] else "") + "merged"

    def _restart_with(self, workers: list[_Worker], shards: dict[str, list[str]]) -> None:
        """Stop these actors' runs gracefully and start them again on their new shards (same actor: no
        new process, the model loads again from the bank)."""
        ray = self._ray
        refs = {w.handle.stop.remote(30.0): w for w in workers}
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=45)
        for r, w in refs.items():
            st = None
            if r in done:
                try:
                    st = ray.get(r)
                except Exception:
                    st = None
            with self._lock:
                cams = (st or w.status or {}).get("cameras", {})
                for name in w.cameras:
                    self.frames_before[name] += int((cams.get(name) or {}).get("processed", 0) or 0)
            w.cameras = shards[w.id]
            w.status = {}
            w.pending = None
            w.last_ok = time.monotonic()
            self._launch(w)

    # -- rebalance on command ---------------------------------------------------------------------------
    def _subscribe(self) -> None:
        try:
            self._pubsub = self._redis_client().pubsub(ignore_subscribe_messages=True)
            self._pubsub.subscribe(f"{self.cfg.sinks.redis.prefix}:cluster:commands")
        except Exception as err:
            log.warning("cluster command channel unavailable: %s", err)
            self._pubsub = None

    def _commands(self) -> None:
        ps = getattr(self, "_pubsub", None)
        if ps is None:
            return
        try:
            while True:
                m = ps.get_message(timeout=0)
                if not m:
                    return
                data = m.get("data")
                cmd = (data.decode() if isinstance(data, bytes) else str(data)).strip()
                if cmd == "rebalance":
                    self.rebalance()
                else:
                    log.warning("cluster command %r not understood (known: rebalance)", cmd)
        except Exception as err:
            log.warning("cluster command channel: %s", err)

    def rebalance(self) -> None:
        """Plan again for the capacity now visible; restart only the workers whose shard changed."""
        self.rebalances += 1
        with self._lock:
            current = list(self.workers.values())
        cams = [c for w in current for c in w.cameras]
        shards = plan([self.costs[c] for c in cams], min(self.capacity(), len(cams)))
        keep = {frozenset(w.cameras): w for w in current}
        todo = []
        for s in shards:
            w = keep.pop(frozenset(s), None)
            if w is None:
                todo.append(s)
        if not todo:
            return
        self._stop_workers(list(keep.values()))
        ws = [self._new_worker(s) for s in todo]
        for w in ws:
            self._launch(w)
        self._await_ready(ws, 30.0)

    # -- driver HTTP: /healthz and /workers -------------------------------------------------------------
    def health(self) -> tuple[int, dict]:
        with self._lock:
            ws = list(self.workers.values())
            moving = set(self.costs) - {c for w in ws for c in w.cameras}
        cams, workers_ok = {}, True
        for w in ws:
            up = w.alive and time.monotonic() - w.last_ok <= self.deadline_s and w.status.get("state") != "failed"
            workers_ok &= up
            for name in w.cameras:
                c = (w.status.get("cameras") or {}).get(name) or {"state": "starting", "healthy": True}
                cams[name] = {"worker": w.id, "state": c.get("state"), "healthy": bool(c.get("healthy")) and up}
        for name in moving:
            cams[name] = {"worker": None, "state": "moving", "healthy": False}
        ok = workers_ok and all(c["healthy"] for c in cams.values())
        return (200 if ok else 503), {"status": "ok" if ok else "unhealthy", "cameras": cams}

    def workers_doc(self) -> dict:
        with self._lock:
            return {
                "workers": {
                    w.id: {
                        "node": w.host,
                        "metrics": w.status.get("metrics"),
                        "state": w.status.get("state", "starting"),
                        "cameras": list(w.cameras),
                    }
                    for w in self.workers.values()
                }
            }

    def _start_http(self) -> None:
        if self.metrics_port is None:
            return
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from configs import jsonsafe

        runner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                path = self.path.split("?", 1)[0]
                if path in ("/healthz", "/health"):
                    code, doc = runner.health()
                elif path == "/workers":
                    code, doc = 200, runner.workers_doc()
                elif path == "/targets":  # Prometheus http_sd_configs: every worker's /metrics
                    workers = runner.workers_doc()["workers"]
                    doc = [
                        {"targets": [w["metrics"]], "labels": {"worker": wid}}
                        for wid, w in workers.items()
                        if w["metrics"]
                    ]
                    code = 200
                else:
                    code, doc = 404, {"error": "not found: try /healthz, /workers or /targets"}
                body = (jsonsafe.dumps(doc) + "\n").encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):
                log.debug("cluster http: " + fmt, *args)

        host = self.cfg.pipeline.metrics_host
        try:
            self._http = ThreadingHTTPServer((host, self.metrics_port), Handler)
        except OSError as err:
            raise UserError(
                f"--metrics-port: cannot listen on {host}:{self.metrics_port} ({err.strerror or err})"
            ) from None
        self._http.daemon_threads = True
        self.http_port = self._http.server_address[1]
        threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True, name="cluster-http"
        ).start()
        log.info("cluster health on http://%s:%d/healthz and /workers", host, self.http_port)

    def _stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    # -- summary -------------------------------------------------------------------------------------------
    def summary(self, elapsed: float) -> dict:
        frames = dict(self.frames_before)
        return {
            "reason": self._reason,
            "elapsed_s": round(elapsed, 2),
            "workers": {wid: info for wid, info in sorted(self.finished.items())},
            "restarts": self.restarts,
            "rebalances": self.rebalances,
            "cameras": {
                n: {
                    "frames": frames.get(n, 0),
                    "worker": next(
                        (wid for wid, i in reversed(list(self.finished.items())) if n in i["cameras"]), None
                    ),
                }
                for n in self.costs
            },
            "frames": sum(frames.values()),
        }


def cmd_run_cluster(cfg, args) -> int:
    """`run --cluster ADDRESS`: see ClusterRunner. Exit codes as `run`: 0, 2 (bad input), 3 (no frames)."""
    import sys

    from configs import jsonsafe

    runner = ClusterRunner(
        cfg,
        Path(args.bank) if args.bank else None,
        Path(args.out),
        address=args.cluster,
        cpus_per_worker=args.cpus_per_worker,
        duration=args.duration,
        metrics_port=cfg.pipeline.metrics_port,
    )
    summary = runner.run()
    print(jsonsafe.dumps(summary, indent=1))
    failed = [w for w, i in summary["workers"].items() if i.get("error")]
    for w in failed:
        print(f"error: worker {w}: {summary['workers'][w]['error']}", file=sys.stderr)
    if summary["frames"] == 0:
        print("error: no camera delivered a frame during the run", file=sys.stderr)
        return 2 if failed else 3
    return 0


# --- offline: eval (and fit) over Ray tasks ------------------------------------------------------------
def _connect_offline(address: str | None, num_cpus: int | None = None) -> tuple[object, bool]:
    """(ray, whether this call started or connected it): `local` starts Ray in this process."""
    ray = _import_ray()
    if ray.is_initialized():
        return ray, False
    kw = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    if address in (None, "local"):
        # address="local": always a new Ray of its own, even where RAY_ADDRESS names a running one
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, object_store_memory=100 * 1024 * 1024, **kw)
    else:
        try:
            ray.init(address=address, **kw)
        except Exception as err:
            raise UserError(f"--cluster {address}: cannot connect to Ray ({err})") from None
    return ray, True


def _chunks_by_scene(videos: list, scene_of: dict, n_tasks: int) -> list[list]:
    """Consecutive test videos of one scene (one bank) per chunk, about `n_tasks` chunks in all."""
    groups: dict = {}
    for v in videos:
        groups.setdefault(scene_of.get(v.name), []).append(v)
    total = len(videos)
    out = []
    for vs in groups.values():
        k = max(1, min(len(vs), round(n_tasks * len(vs) / max(1, total))))
        size = math.ceil(len(vs) / k)
        out += [vs[i : i + size] for i in range(0, len(vs), size)]
    return out


def _score_chunk(cfg, bank_dir: str, videos: list, every: int):
    """A Ray task: score consecutive test videos of one scene exactly as `evaluate` does in one process
    (evaluation.run's own scoring function, on a routing of just these videos). Returns the ScoredTestSet
    and the thresholds of the banks it loaded."""
    from evaluation.run import SceneRouting, score_test_set

    routing = SceneRouting.of(cfg, bank_dir, videos)
    scored = score_test_set(cfg, videos, routing, every, False)
    return scored, dict(routing.router.thresholds)


def evaluate_cluster(
    cfg,
    data,
    bank_dir,
    out_dir,
    address: str | None = "local",
    every: int = 1,
    smoothing: str = "none",
    window: int = 1,
    progress: bool = True,
    cpus_per_task: float = 1.0,
) -> dict:
    """`eval --cluster ADDRESS`: `evaluation.run.evaluate` with its test videos scored by Ray tasks, a chunk of
    consecutive videos of one scene each (about two chunks per task slot), then merged in the test set's order:
    per-video scores as they are, pixel AUROC counts summed (exact integer histograms), the banks'
    thresholds in the order one process loads them. metrics.json is the single-process one (frame and pixel
    AUROCs, per-video tables), its `fps` aside. Every task reads the bank from `bank_dir`, which must be a
    path every node sees (a shared mount): a bank is tens of MB to GBs, and Ray's object store would copy it
    to every node per use."""
    from evaluation.metrics import PixelAuroc
    from evaluation.run import ScoredTestSet, evaluate

    if cpus_per_task <= 0:
        raise UserError(f"--cpus-per-worker: expected a positive number, got {cpus_per_task}")
    ray, started = _connect_offline(address)

    def score(cfg, videos, routing, every, progress):
        t0 = time.perf_counter()
        slots = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_task))
        chunks = _chunks_by_scene(videos, routing.scene, 2 * slots)
        task = ray.remote(_score_chunk).options(num_cpus=cpus_per_task, max_retries=2)
        bank = str(Path(bank_dir).resolve())
        results = ray.get([task.remote(cfg, bank, chunk, every) for chunk in chunks])
        per_video, pixel_by_video, thresholds = {}, {}, {}
        for scored, th in results:
            per_video.update(scored.videos)
            pixel_by_video.update(scored.pixel_by_video)
            thresholds.update({Path(p): t for p, t in th.items()})
        pixel_all = PixelAuroc()
        for v in videos:
            pixel_all.pos += pixel_by_video[v.name].pos
            pixel_all.neg += pixel_by_video[v.name].neg
        ordered = dict(routing.router.thresholds)  # what the driver loaded itself (the first bank) first
        for v in videos:  # then in the order one process meets them
            path = Path(routing.router.banks[v.name]).resolve()
            match = next((t for p, t in thresholds.items() if p.resolve() == path), None)
            key = routing.router.banks[v.name]
            if key not in ordered and match is not None:
                ordered[key] = match
        routing.router.thresholds.clear()
        routing.router.thresholds.update(ordered)
        return ScoredTestSet(
            {v.name: per_video[v.name] for v in videos},
            pixel_all,
            {v.name: pixel_by_video[v.name] for v in videos},
            time.perf_counter() - t0,
        )

    try:
        return evaluate(
            cfg,
            data,
            bank_dir,
            out_dir,
            every=every,
            smoothing=smoothing,
            window=window,
            progress=progress,
            score=score,
        )
    finally:
        if started:
            ray.shutdown()

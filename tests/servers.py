"""Real test servers that the test suite starts itself (Redis, RTSP, a silent TCP server).

Tests must not depend on services already running on the machine, so each helper picks a free
loopback port, starts its own process there and always cleans it up (context exit + atexit, and
the child gets SIGKILL from the kernel if the test process itself dies).

    from tests.servers import RedisServer, RtspServer, SilentTcpServer, redis_available, rtsp_available

    with RedisServer() as r:            # r.url == "redis://127.0.0.1:<port>/0"
        r.kill(); r.restart()           # outage: SIGKILL, then start again on the same port
    with RtspServer(video=path) as s:   # s.url == "rtsp://127.0.0.1:<port>/cam"
        ...
    with SilentTcpServer() as s:        # accepts TCP connections and never answers
        ...

Install the system packages with ``bash .ci/install_system_deps.sh``.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import IO

__all__ = [
    "free_port",
    "wait_port",
    "redis_available",
    "rtsp_available",
    "RedisServer",
    "RtspServer",
    "SilentTcpServer",
    "ServerStartError",
    "SYSTEM_PYTHON",
    "RTSP_SERVER_SCRIPT",
]

HOST = "127.0.0.1"
SYSTEM_PYTHON = "/usr/bin/python3"
RTSP_SERVER_SCRIPT = Path(__file__).resolve().with_name("rtsp_server.py")


class ServerStartError(RuntimeError):
    """A test server process did not come up."""


# --------------------------------------------------------------------------------------------
# generic helpers
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = HOST, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(port: int, timeout: float = 10.0, host: str = HOST) -> bool:
    """Wait until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port, host):
            return True
        time.sleep(0.05)
    return False


def _wait_port_free(port: int, timeout: float = 5.0, host: str = HOST) -> None:
    """Wait until host:port can be bound again (after the old server died)."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
                return
            except OSError:
                if time.monotonic() >= deadline:
                    return  # let the server itself report the bind failure
        time.sleep(0.05)


_PR_SET_PDEATHSIG = 1
try:  # resolved in the parent: no dlopen between fork and exec
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _prctl = None


def _child_setup_die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """preexec_fn: own session, and the kernel SIGKILLs the child if the test process dies."""
    os.setsid()  # own process group: killing the server kills all its children
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def _child_setup() -> None:  # pragma: no cover - runs in the child before exec
    os.setsid()


def _preexec_fn():
    # PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so it is only safe
    # from the main thread; a server (re)started from a helper thread (e.g. an outage test that
    # restarts Redis after a delay) is still covered by atexit and context exit.
    if threading.current_thread() is threading.main_thread():
        return _child_setup_die_with_parent
    return _child_setup


# every live process started here, so atexit can kill leftovers even if a test leaked one
_LIVE: weakref.WeakSet[_ManagedProcess] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


def _cleanup_all() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for srv in servers:
        try:
            srv.close()
        except Exception:
            pass


atexit.register(_cleanup_all)


class _ManagedProcess:
    """Base class: one server subprocess on a fixed port, restartable on the same port."""

    name = "server"
    start_timeout = 15.0

    def __init__(self, port: int | None = None) -> None:
        self.port: int = port or free_port()
        self._port_fixed = port is not None
        self.proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None
        self._log_path: str | None = None

    # -- to override -----------------------------------------------------------------------
    def _command(self) -> Sequence[str]:
        raise NotImplementedError

    def _wait_ready(self, deadline: float) -> None:
        raise NotImplementedError

    def _popen_kwargs(self) -> dict:
        return {"stdout": self._log, "stderr": subprocess.STDOUT}

    # -- public ----------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> _ManagedProcess:
        """Start the server (no-op if it runs). A port picked by free_port() that another
        process grabbed before the first start is replaced by a new free port (3 tries);
        after the first successful start the port never changes."""
        if self.is_running():
            return self
        attempts = 1 if self._port_fixed else 3
        for attempt in range(attempts):
            try:
                self._start_once()
                self._port_fixed = True
                return self
            except ServerStartError:
                if attempt + 1 >= attempts or not self._port_taken():
                    raise
                self.port = free_port()
        return self  # unreachable

    def _port_taken(self) -> bool:
        return port_open(self.port)

    def _start_once(self) -> None:
        if self._port_fixed:  # restart on the same port: let the old socket go first
            _wait_port_free(self.port)
        if self._log is None:
            fd, self._log_path = tempfile.mkstemp(prefix=f"{self.name}-{self.port}-", suffix=".log")
            self._log = os.fdopen(fd, "w+b")
        self.proc = subprocess.Popen(
            list(self._command()),
            stdin=subprocess.DEVNULL,
            preexec_fn=_preexec_fn(),
            **self._popen_kwargs(),
        )
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            self._wait_ready(time.monotonic() + self.start_timeout)
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL the server (an abrupt outage); the port is kept for restart()."""
        self._signal_and_reap(signal.SIGKILL, timeout=5.0)

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the server gracefully (SIGTERM, then SIGKILL after `timeout`)."""
        if self.is_running():
            self._signal_and_reap(signal.SIGTERM, timeout=timeout)
        self._signal_and_reap(signal.SIGKILL, timeout=5.0)
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def restart(self) -> _ManagedProcess:
        """Start the server again on the same port (after kill() or stop(), or while running)."""
        self.stop()
        return self.start()

    def log_text(self) -> str:
        """Everything the server process printed so far (for failure messages)."""
        if not self._log_path:
            return ""
        try:
            return Path(self._log_path).read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        """stop() and remove the log file."""
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._log_path:
            try:
                os.unlink(self._log_path)
            except OSError:
                pass
            self._log_path = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # last resort; normal paths are __exit__/atexit
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
        except Exception:
            pass

    # -- internals -------------------------------------------------------------------------
    def _signal_and_reap(self, sig: int, timeout: float) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)  # own session (setsid): reaches its children too
            except (ProcessLookupError, PermissionError):
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return
        else:
            # leader is gone; make sure no child of its group survives
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _fail(self, why: str) -> ServerStartError:
        return ServerStartError(f"{self.name} on port {self.port}: {why}\n--- log ---\n{self.log_text()}")


# --------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------


def redis_server_binary() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
    )


def redis_available() -> bool:
    """True when a `redis-server` binary exists (install: bash .ci/install_system_deps.sh)."""
    return redis_server_binary() is not None


class RedisServer(_ManagedProcess):
    """A throw-away redis-server on 127.0.0.1:<free port>, no persistence.

    password: sets `requirepass` (the default user needs AUTH).
    acl_user: (name, password) of an extra ACL user with full access (`user <name> on ><pw> ~* &* +@all`).
    """

    name = "redis-server"

    def __init__(
        self,
        port: int | None = None,
        password: str | None = None,
        acl_user: tuple[str, str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(port)
        binary = redis_server_binary()
        if binary is None:
            raise ServerStartError("redis-server not found; run: bash .ci/install_system_deps.sh")
        self.binary = binary
        self.password = password
        self.acl_user = acl_user
        self.extra_args = list(extra_args)
        self._dir = tempfile.mkdtemp(prefix="redis-test-")

    @property
    def host(self) -> str:
        return HOST

    @property
    def url(self) -> str:
        """redis://127.0.0.1:P/0 — no credentials (see url_with_auth)."""
        return f"redis://{HOST}:{self.port}/0"

    def url_with_auth(self, username: str | None = None, password: str | None = None) -> str:
        """URL with credentials: the ACL user if given/configured, else the requirepass password."""
        if username is None and password is None:
            if self.acl_user is not None:
                username, password = self.acl_user
            else:
                password = self.password
        from urllib.parse import quote

        auth = ""
        if password is not None:
            auth = (quote(username, safe="") if username else "") + ":" + quote(password, safe="") + "@"
        return f"redis://{auth}{HOST}:{self.port}/0"

    def _command(self) -> Sequence[str]:
        os.makedirs(self._dir, exist_ok=True)
        cmd = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._dir,
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
            "--loglevel",
            "warning",
        ]
        if self.password is not None:
            cmd += ["--requirepass", self.password]
        if self.acl_user is not None:
            user, pw = self.acl_user
            cmd += ["--user", user, "on", f">{pw}", "~*", "&*", "+@all"]
        return cmd + self.extra_args

    def _wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise self._fail(f"exited with code {self.proc.returncode if self.proc else '?'}")
            if self._ping():
                return
            time.sleep(0.05)
        raise self._fail("no PING reply in time")

    def _ping(self) -> bool:
        """Raw RESP PING (works with or without a password: NOAUTH also proves it is up)."""
        try:
            with socket.create_connection((HOST, self.port), timeout=0.5) as s:
                s.sendall(b"*1\r\n$4\r\nPING\r\n")
                reply = s.recv(64)
                return reply.startswith(b"+PONG") or b"NOAUTH" in reply or b"AUTH" in reply
        except OSError:
            return False

    def client(self, **kwargs):
        """A redis-py client for this server (authenticated when a password/ACL user is set)."""
        import redis

        if self.acl_user is not None:
            kwargs.setdefault("username", self.acl_user[0])
            kwargs.setdefault("password", self.acl_user[1])
        elif self.password is not None:
            kwargs.setdefault("password", self.password)
        kwargs.setdefault("socket_timeout", 5)
        kwargs.setdefault("socket_connect_timeout", 5)
        return redis.Redis(host=HOST, port=self.port, **kwargs)

    def close(self) -> None:
        super().close()
        shutil.rmtree(self._dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# RTSP (GStreamer, run by the system python)
# --------------------------------------------------------------------------------------------

_rtsp_ok: bool | None = None


def rtsp_available() -> bool:
    """True when /usr/bin/python3 has gi + GstRtspServer 1.0 + x264enc (cached)."""
    global _rtsp_ok
    if _rtsp_ok is None:
        probe = (
            "import gi\n"
            "gi.require_version('Gst', '1.0')\n"
            "gi.require_version('GstRtspServer', '1.0')\n"
            "from gi.repository import Gst, GstRtspServer\n"
            "Gst.init(None)\n"
            "missing = [e for e in ('x264enc', 'rtph264pay', 'decodebin', 'videotestsrc', 'appsrc')\n"
            "           if Gst.ElementFactory.find(e) is None]\n"
            "raise SystemExit(1 if missing else 0)\n"
        )
        try:
            _rtsp_ok = (
                os.access(SYSTEM_PYTHON, os.X_OK)
                and RTSP_SERVER_SCRIPT.is_file()
                and subprocess.run(
                    [SYSTEM_PYTHON, "-c", probe],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    timeout=30,
                ).returncode
                == 0
            )
        except (OSError, subprocess.TimeoutExpired):
            _rtsp_ok = False
    return _rtsp_ok


class RtspServer(_ManagedProcess):
    """tests/rtsp_server.py on 127.0.0.1:<free port>, run by /usr/bin/python3.

    video: a file to serve (re-encoded to H.264 in real time); loop=True (default) makes it a
    looping live camera that runs whether or not a client is connected; loop=False gives each
    client the file once from the start. video=None serves `videotestsrc` (pattern).
    """

    name = "rtsp-server"

    def __init__(
        self,
        video: os.PathLike | str | None = None,
        *,
        loop: bool = True,
        mount: str = "/cam",
        port: int | None = None,
        width: int = 320,
        height: int = 240,
        fps: int = 15,
        gop: int = 15,
    ) -> None:
        super().__init__(port)
        self.video = str(video) if video is not None else None
        self.loop = loop
        self.mount = mount if mount.startswith("/") else "/" + mount
        self.width, self.height, self.fps, self.gop = width, height, fps, gop
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"rtsp://{HOST}:{self.port}{self.mount}"

    def _command(self) -> Sequence[str]:
        cmd = [
            SYSTEM_PYTHON,
            "-u",
            str(RTSP_SERVER_SCRIPT),
            "--port",
            str(self.port),
            "--mount",
            self.mount,
            "--gop",
            str(self.gop),
        ]
        if self.video is None:
            cmd += ["--pattern", "--width", str(self.width), "--height", str(self.height), "--fps", str(self.fps)]
        else:
            cmd += ["--video", self.video]
            if self.loop:
                cmd.append("--loop")
        return cmd

    def _popen_kwargs(self) -> dict:
        # stdout is a pipe (for READY); stderr goes to the log file.
        # Drop the project venv's variables so the system python uses its own site-packages.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        return {"stdout": subprocess.PIPE, "stderr": self._log, "env": env}

    def start(self) -> RtspServer:
        if not self.is_running():
            self._ready = threading.Event()
        return super().start()  # type: ignore[return-value]

    def _pump_stdout(self, proc: subprocess.Popen, ready: threading.Event) -> None:
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, b""):
            if line.strip() == b"READY":
                ready.set()
            elif self._log is not None:
                try:
                    self._log.write(line)
                    self._log.flush()
                except (ValueError, OSError):
                    pass
        proc.stdout.close()

    def _wait_ready(self, deadline: float) -> None:
        assert self.proc is not None
        self._reader = threading.Thread(
            target=self._pump_stdout,
            args=(self.proc, self._ready),
            daemon=True,
            name=f"rtsp-server-{self.port}-stdout",
        )
        self._reader.start()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self._fail(f"exited with code {self.proc.returncode}")
            if self._ready.wait(0.05):
                break
        else:
            raise self._fail("no READY in time")
        if not wait_port(self.port, timeout=max(0.5, deadline - time.monotonic())):
            raise self._fail("printed READY but the port does not accept connections")


# --------------------------------------------------------------------------------------------
# A TCP server that accepts connections and never sends anything
# --------------------------------------------------------------------------------------------


class SilentTcpServer:
    """Accepts TCP connections on 127.0.0.1:<free port> and never sends a byte.

    For the fault test "server accepts, then says nothing": a client must time out, not hang.
    Accepted sockets are kept open (and their input drained) until stop().
    """

    def __init__(self, port: int | None = None, mount: str = "/cam") -> None:
        self.port = port or 0
        self.mount = mount if mount.startswith("/") else "/" + mount
        self._sock: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.accepted = 0

    @property
    def url(self) -> str:
        return f"rtsp://{HOST}:{self.port}{self.mount}"

    def start(self) -> SilentTcpServer:
        if self._sock is not None:
            return self
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((HOST, self.port))
        s.listen(16)
        s.settimeout(0.1)
        self.port = s.getsockname()[1]
        self._sock = s
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, daemon=True, name=f"silent-tcp-{self.port}")
        self._thread.start()
        with _LIVE_LOCK:
            _LIVE_SILENT.add(self)
        return self

    def _serve(self) -> None:
        assert self._sock is not None
        import select

        while not self._stop.is_set():
            readable = [self._sock] + self._conns
            try:
                r, _, _ = select.select(readable, [], [], 0.1)
            except (OSError, ValueError):
                if self._stop.is_set():
                    return
                self._conns = [c for c in self._conns if c.fileno() >= 0]
                continue
            for sock in r:
                if sock is self._sock:
                    try:
                        conn, _ = self._sock.accept()
                    except OSError:
                        continue
                    self._conns.append(conn)
                    self.accepted += 1
                else:
                    try:
                        data = sock.recv(65536)  # drain, never answer
                    except OSError:
                        data = b""
                    if not data:
                        sock.close()
                        self._conns.remove(sock)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
        for c in self._conns:
            try:
                c.close()
            except OSError:
                pass
        self._conns = []
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with _LIVE_LOCK:
            _LIVE_SILENT.discard(self)

    close = stop

    def __enter__(self) -> SilentTcpServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_LIVE_SILENT: weakref.WeakSet[SilentTcpServer] = weakref.WeakSet()


def _cleanup_silent() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE_SILENT)
    for srv in servers:
        try:
            srv.stop()
        except Exception:
            pass


atexit.register(_cleanup_silent)


if __name__ == "__main__":  # manual check: python -m tests.servers
    print("redis_available:", redis_available(), file=sys.stderr)
    print("rtsp_available:", rtsp_available(), file=sys.stderr)

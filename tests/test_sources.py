"""stream.sources / stream.avio against real inputs: videos encoded here with PyAV, image folders,
broken files, closed ports, a server that accepts and never answers, an HTTP stream that stalls,
and (when the system has GStreamer) a real RTSP server that goes away and comes back."""

from __future__ import annotations

import io
import logging
import random
import socket
import threading
import time
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from configs.errors import UserError
from configs.schema import SourceConfig
from stream import avio
from stream.avio import classify, redact
from stream.sources import Backoff, FrameBuffer, Source, SourceState, StatusEvent

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def make_video(
    path: Path, n: int = 24, size=(64, 48), codec="libx264", pix_fmt="yuv420p", fmt=None, rate=25, options=None
) -> Path:
    """Frame i is a flat colour whose red channel is 8*i: order is checkable after decoding."""
    w, h = size
    with av.open(str(path), "w", format=fmt, options=options or {}) as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        for i in range(n):
            img = np.zeros((h, w, 3), np.uint8)
            img[..., 0] = (8 * i) % 256
            img[..., 1] = 64
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def count_frames(path: Path) -> int:
    """Independent count: decode everything with plain PyAV."""
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def cfg(url, **kw) -> SourceConfig:
    return SourceConfig(name=kw.pop("name", "cam1"), url=str(url), **kw)


def drain(src: Source, limit_s: float = 20.0) -> list:
    frames, deadline = [], time.monotonic() + limit_s
    while not src.finished:
        assert time.monotonic() < deadline, f"source did not finish, state {src.state}"
        f = src.read(0.5)
        if f is not None:
            frames.append(f)
    return frames


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TcpServer:
    """Accepts connections on 127.0.0.1; `payload` (bytes or None) is sent after the client's
    first request bytes, then the connection is held open without another byte until close()."""

    def __init__(self, payload: bytes | None = None):
        self.payload = payload
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self._conns.append(conn)
            if self.payload is not None:
                try:
                    conn.settimeout(2)
                    conn.recv(4096)
                    conn.sendall(self.payload)
                except OSError:
                    pass

    def close(self):
        self.sock.close()
        for c in self._conns:
            c.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Events(list):
    """on_status collector."""

    def __call__(self, ev: StatusEvent):
        self.append(ev)

    def states(self):
        return [e.state for e in self]

    def wait_for(self, state: SourceState, timeout: float, after: int = 0) -> StatusEvent | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in list(self)[after:]:
                if e.state == state:
                    return e
            time.sleep(0.01)
        return None


@pytest.fixture
def video(tmp_path):
    return make_video(tmp_path / "cam.mp4", n=24)


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,codec,pix_fmt",
    [
        ("h264.mp4", "libx264", "yuv420p"),
        ("mjpeg.avi", "mjpeg", "yuvj420p"),
    ],
)
def test_file_yields_every_frame_in_order(tmp_path, name, codec, pix_fmt):
    path = make_video(tmp_path / name, n=30, size=(80, 60), codec=codec, pix_fmt=pix_fmt)
    expected = count_frames(path)
    assert expected == 30
    with Source(cfg(path)) as src:
        frames = drain(src)
        assert src.state == SourceState.STOPPED
        assert src.decoded == expected and src.dropped == 0
    assert len(frames) == expected
    assert [f.index for f in frames] == list(range(expected))
    for f in frames:
        assert f.camera_id == "cam1"
        assert f.image.shape == (60, 80, 3) and f.image.dtype == np.uint8
        assert f.image.flags["C_CONTIGUOUS"]
    red = [float(f.image[..., 0].mean()) for f in frames]
    assert all(b > a for a, b in zip(red, red[1:])), "frames out of order"
    ts = [f.timestamp for f in frames]
    assert ts[0] == pytest.approx(0.0, abs=1e-6)
    assert ts[-1] == pytest.approx((expected - 1) / 25, abs=0.01)  # media time, not wall clock


def _encode_or_skip(path, **kw):
    try:
        return make_video(path, **kw)
    except (av.error.FFmpegError, ValueError) as e:
        pytest.skip(f"encoder cannot write {kw}: {e}")


@pytest.mark.parametrize(
    "name,kw",
    [
        ("yuv444p.mp4", dict(codec="libx264", pix_fmt="yuv444p")),
        ("gray.mp4", dict(codec="libx264", pix_fmt="gray")),
        ("gray.mkv", dict(codec="ffv1", pix_fmt="gray")),  # decodes as true gray (h264 hands back yuv)
        ("10bit.mp4", dict(codec="libx264", pix_fmt="yuv420p10le")),
        ("1x1.mp4", dict(codec="libx264", pix_fmt="yuv444p", size=(1, 1))),
        ("wide.avi", dict(codec="mjpeg", pix_fmt="yuvj420p", size=(4352, 64))),  # > 4096 px a side
        ("4k.avi", dict(codec="mjpeg", pix_fmt="yuvj420p", size=(3840, 2160))),
    ],
)
def test_pixel_formats_and_sizes_become_rgb24(tmp_path, name, kw):
    n = 3 if kw.get("size", (0, 0))[0] > 1000 else 6
    path = _encode_or_skip(tmp_path / name, n=n, **kw)
    w, h = kw.get("size", (64, 48))
    with Source(cfg(path)) as src:
        frames = drain(src)
    assert src.state == SourceState.STOPPED, src.detail
    assert len(frames) == count_frames(path) == n
    for f in frames:
        assert f.image.shape == (h, w, 3) and f.image.dtype == np.uint8 and f.image.flags["C_CONTIGUOUS"]
    if w > 1:  # the encoded ramp survives any pixel format (gray keeps luma only)
        means = [float(f.image.mean()) for f in frames]
        assert means == sorted(means)


def test_file_states_sequence(video):
    ev = Events()
    with Source(cfg(video), on_status=ev) as src:
        drain(src)
        assert src.finished and src.read(0.05) is None
    assert ev.states() == [SourceState.CONNECTING, SourceState.STREAMING, SourceState.STOPPED]
    assert all(e.camera == "cam1" for e in ev)
    assert "24 frames" in ev[-1].detail


def test_lossless_backpressure_and_stop_while_blocked(video):
    src = Source(cfg(video, queue_size=3)).start()
    try:
        deadline = time.monotonic() + 5
        while src.queue_depth < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # the decoder would have finished 24 tiny frames by now if it did not wait
        assert src.queue_depth == 3 and src.dropped == 0 and src.decoded <= 4
        assert not src.finished
        t = time.monotonic()
        assert src.stop(timeout=5)  # the decode thread is blocked on a full buffer: stop must end it
        assert time.monotonic() - t < 2
        assert src.state == SourceState.STOPPED and src.finished
    finally:
        src.stop()


def test_loop_restarts_with_continuing_index(tmp_path):
    path = make_video(tmp_path / "short.mp4", n=8)
    with Source(cfg(path, loop=True)) as src:
        frames = [src.read(2.0) for _ in range(20)]
        assert all(f is not None for f in frames)
        assert not src.finished and src.state == SourceState.STREAMING
    assert [f.index for f in frames] == list(range(20))
    assert [f.sequence for f in frames] == [0] * 8 + [1] * 8 + [2] * 4  # a pass is a sequence of its own
    ts = [f.timestamp for f in frames]
    assert all(b > a for a, b in zip(ts, ts[1:])), "media time must keep increasing across loops"
    red = [int(f.image[..., 0].mean() + 0.5) for f in frames]
    assert red[8] == red[0] and red[16] == red[0]  # the file really restarted
    assert src.state == SourceState.STOPPED


def test_paced_file_drops_oldest_and_latency_stays_bounded(tmp_path):
    path = make_video(tmp_path / "paced.mp4", n=60)
    with Source(cfg(path, fps=50, queue_size=2, loop=True)) as src:
        seen, latencies, depths = [], [], []
        for _ in range(8):
            time.sleep(0.1)  # a consumer 5x slower than the source
            depths.append(src.queue_depth)
            f = src.read(2.0)
            assert f is not None
            latencies.append(time.time() - f.timestamp)
            seen.append(f.index)
        assert src.dropped > 0
        assert max(depths) <= 2
    # frames are paced (not decoded all at once): wall-clock timestamps, newest frames kept
    assert seen == sorted(seen) and seen[-1] - seen[0] > 8
    # queue of 2 at 50 fps: ~40 ms of frames; the bound is generous (slow CI), but would be
    # blown by a lossless queue (latency would grow by ~80 ms per read here)
    assert max(latencies) < 1.0
    assert latencies[-1] < 1.0


def test_paced_file_timestamps_come_from_clock(tmp_path):
    path = make_video(tmp_path / "c.mp4", n=5)
    fake_now = [1000.0]

    def clock():
        fake_now[0] += 1.0
        return fake_now[0]

    with Source(cfg(path, fps=100, queue_size=10), clock=clock) as src:
        frames = drain(src)
    assert len(frames) == 5
    assert all(f.timestamp > 1000.0 for f in frames)


# ------------------------------------------------------------------------------------------------
# broken inputs
# ------------------------------------------------------------------------------------------------


def _truncated(tmp_path):
    data = make_video(tmp_path / "full.mp4", n=24).read_bytes()
    p = tmp_path / "truncated.mp4"
    p.write_bytes(data[: len(data) // 2])  # moov atom (at the end) lost
    return p


def _random(tmp_path):
    p = tmp_path / "random.mp4"
    p.write_bytes(random.Random(0).randbytes(20000))
    return p


def _empty(tmp_path):
    p = tmp_path / "empty.mp4"
    p.write_bytes(b"")
    return p


def _missing(tmp_path):
    return tmp_path / "missing.mp4"


def _text(tmp_path):
    p = tmp_path / "notes.avi"
    p.write_text("this is not a video\n" * 50)
    return p


@pytest.mark.parametrize(
    "make,expect",
    [
        (_truncated, "not a decodable video"),
        (_random, "not a decodable video"),
        (_empty, "empty"),
        (_missing, "no such file"),
        (_text, "not a decodable video"),
    ],
)
def test_broken_file_fails_with_clear_error(tmp_path, caplog, make, expect):
    path = make(tmp_path)
    ev = Events()
    caplog.set_level(logging.DEBUG)
    src = Source(cfg(path), on_status=ev).start()
    t = time.monotonic()
    assert src.read(10.0) is None
    assert time.monotonic() - t < 10
    assert src.finished and src.state == SourceState.FAILED
    assert isinstance(src.error, UserError) and isinstance(src.error, avio.InputError)
    msg = str(src.error)
    if make is _random:  # the documented wording
        assert msg == f"{path}: not a decodable video (invalid data found when processing input)"
    assert path.name in msg and expect in msg
    assert ev.states() == [SourceState.CONNECTING, SourceState.FAILED]
    assert path.name in ev[-1].detail
    # one clear line, no traceback spam
    assert not [r for r in caplog.records if r.exc_info]
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    src.stop()
    assert src.state == SourceState.FAILED  # stop() does not hide the failure


def test_truncated_faststart_file_delivers_what_decodes_and_warns(tmp_path, caplog):
    # moov in front: the header survives the cut, so the first part is still playable
    data = make_video(tmp_path / "fs.mp4", n=40, options={"movflags": "faststart"}).read_bytes()
    path = tmp_path / "cut.mp4"
    mdat = data.index(b"mdat")
    assert mdat < len(data) // 2
    path.write_bytes(data[: mdat + (len(data) - mdat) // 2])  # half the frame data
    with Source(cfg(path)) as src:
        frames = drain(src)
    assert 0 < len(frames) < 40
    assert src.state == SourceState.STOPPED and "truncated" in src.detail
    assert any(
        "cut.mp4" in r.getMessage() and "truncated" in r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
    )


# ------------------------------------------------------------------------------------------------
# image folders
# ------------------------------------------------------------------------------------------------


def test_image_folder_sorted_skips_junk_and_unreadable(tmp_path, caplog):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in (1, 2, 10, 3):  # natural order: 1, 2, 3, 10
        img = np.full((30, 40, 3), 20 * i, np.uint8)
        ext = ".png" if i % 2 else ".jpg"
        assert cv2.imwrite(str(folder / f"frame{i}{ext}"), img)
    cv2.imwrite(str(folder / "frame4.bmp"), np.zeros((30, 40), np.uint8))  # gray -> RGB
    (folder / "notes.txt").write_text("not an image")
    (folder / "frame5.jpg").write_bytes(b"garbage, not a jpeg")
    (folder / "sub").mkdir()
    caplog.set_level(logging.WARNING)
    ev = Events()
    assert classify(str(folder)) == "images"
    with Source(cfg(folder), on_status=ev) as src:
        frames = drain(src)
    assert src.state == SourceState.STOPPED and src.error is None
    assert [f.index for f in frames] == [0, 1, 2, 3, 4]
    assert [int(f.image[0, 0, 0]) for f in frames] == [20, 40, 60, 0, 200]
    assert all(f.image.shape == (30, 40, 3) and f.image.dtype == np.uint8 for f in frames)
    assert [f.timestamp for f in frames] == pytest.approx([i / 25 for i in range(5)])
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "notes.txt" in warnings and "frame5.jpg" in warnings
    assert ev.states() == [SourceState.CONNECTING, SourceState.STREAMING, SourceState.STOPPED]


def test_image_folder_without_images_fails(tmp_path):
    folder = tmp_path / "empty_dir"
    folder.mkdir()
    (folder / "readme.md").write_text("x")
    with Source(cfg(folder, kind="images")) as src:
        assert src.read(5.0) is None
        assert src.state == SourceState.FAILED
        assert "empty_dir" in str(src.error) and ".jpg" in str(src.error)


# ------------------------------------------------------------------------------------------------
# URLs
# ------------------------------------------------------------------------------------------------

REDACT_CASES = [
    ("rtsp://admin:secret@10.0.0.5:554/stream1", "rtsp://***@10.0.0.5:554/stream1"),
    ("rtsps://admin:secret@cam.local/live", "rtsps://***@cam.local/live"),
    ("rtsp://:secret@10.0.0.5/x", "rtsp://***@10.0.0.5/x"),
    ("rtsp://admin@10.0.0.5/x", "rtsp://***@10.0.0.5/x"),
    ("rtsp://us%40er:p%40ss%2Fw%3A@host/x", "rtsp://***@host/x"),
    ("rtsp://user:p@ss@host:8554/x", "rtsp://***@host:8554/x"),  # unencoded '@' in the password
    ("http://u:pw@host:8080/video.mjpg?fps=5", "http://***@host:8080/video.mjpg?fps=5"),
    ("rtsp://u:pw@[::1]:554/x", "rtsp://***@[::1]:554/x"),
    ("rtsp://host/cam?channel=1&user=admin&password=secret", "rtsp://host/cam?channel=1&user=***&password=***"),
    ("rtsp://10.0.0.5:554/stream1", "rtsp://10.0.0.5:554/stream1"),
    ("/videos/cam@2x.mp4", "/videos/cam@2x.mp4"),
    ("videos/cam.mp4", "videos/cam.mp4"),
    ("0", "0"),
    ("failed: 'rtsp://a:b@h1/x' then http://c:d@h2/y", "failed: 'rtsp://***@h1/x' then http://***@h2/y"),
    # Redis URLs (sinks.redis.url) go through the same redactor
    ("rediss://spade:acl-pw@h:6380/0", "rediss://***@h:6380/0"),
    ("redis://:s3cr3t-p@ss@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0"),
    ("redis://127.0.0.1:6379/0?password=pw&db=1", "redis://127.0.0.1:6379/0?password=***&db=1"),
    ("unix:///run/redis.sock?db=0&password=pw", "unix:///run/redis.sock?db=0&password=***"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
]


@pytest.mark.parametrize("url,expected", REDACT_CASES)
def test_redact(url, expected):
    assert redact(url) == expected


def test_the_example_subscribers_copy_of_redact_agrees():
    """examples/subscriber.py runs without the package, so it carries a copy of the rules: the same ones."""
    import importlib.util

    pytest.importorskip("redis")
    path = Path(__file__).resolve().parents[1] / "examples" / "subscriber.py"
    spec = importlib.util.spec_from_file_location("subscriber_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for url, expected in REDACT_CASES:
        assert mod.redact(url) == expected, url


@pytest.mark.parametrize(
    "url,kind",
    [
        ("rtsp://cam/x", "rtsp"),
        ("RTSPS://u:p@cam/x", "rtsp"),
        ("http://cam/x.mjpg", "http"),
        ("https://cdn/live.m3u8", "http"),
        ("hls+https://cdn/a.m3u8", "http"),
        ("/dev/video0", "webcam"),
        ("0", "webcam"),
        ("v4l2:/dev/video2", "webcam"),
        ("clip.mp4", "file"),
        ("file:///tmp/clip.mp4", "file"),
    ],
)
def test_classify(url, kind):
    assert classify(url) == kind


def test_classify_folder_and_unsupported(tmp_path):
    assert classify(str(tmp_path)) == "images"
    assert classify(f"file://{tmp_path}") == "images"
    with pytest.raises(UserError) as e:
        classify("ftp://bob:hunter2@host/x.mp4")
    assert "ftp://" in str(e.value) and "hunter2" not in str(e.value)
    with pytest.raises(UserError):
        Source(cfg("foo://cam/x"))


# ------------------------------------------------------------------------------------------------
# backoff and buffers (unit level)
# ------------------------------------------------------------------------------------------------


def test_backoff_equal_jitter_grows_caps_and_resets():
    b = Backoff(0.5, 4.0, "equal", rng=random.Random(1))
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    delays = [b.next() for _ in ceilings]
    for d, c in zip(delays, ceilings):
        assert c / 2 <= d <= c
    assert all(b2 >= a for a, b2 in zip(delays[:3], delays[1:4]))  # grows until the cap
    b.reset()
    assert 0.25 <= b.next() <= 0.5


def test_backoff_full_jitter_bounds():
    b = Backoff(1.0, 8.0, "full", rng=random.Random(2))
    for c in [1, 2, 4, 8, 8, 8]:
        assert 0.0 <= b.next() <= c
    for _ in range(2000):  # a camera gone for days: no overflow, stays at the cap
        assert b.next() <= 8.0


def test_frame_buffer_drop_oldest():
    from stream.frame import Frame

    buf = FrameBuffer(3, drop_oldest=True)
    img = np.zeros((1, 1, 3), np.uint8)
    for i in range(10):
        assert buf.put(Frame("c", i, float(i), img))
    assert buf.depth == 3 and buf.dropped == 7
    assert [buf.get(0).index for _ in range(3)] == [7, 8, 9]
    assert buf.get(0.01) is None and not buf.drained
    buf.close()
    assert buf.drained and not buf.put(Frame("c", 10, 10.0, img))


# ------------------------------------------------------------------------------------------------
# live sources
# ------------------------------------------------------------------------------------------------


def test_unreachable_rtsp_reconnects_with_growing_backoff(caplog):
    caplog.set_level(logging.DEBUG)
    port = free_port()  # nothing listens there: connection refused
    ev = Events()
    src = Source(
        cfg(f"rtsp://admin:hunter2@127.0.0.1:{port}/live", reconnect_base_s=0.05, reconnect_max_s=0.4), on_status=ev
    ).start()
    try:
        deadline = time.monotonic() + 10
        while len([e for e in ev if e.state == SourceState.RECONNECTING]) < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        recon = [e for e in ev if e.state == SourceState.RECONNECTING]
        assert len(recon) >= 6
        assert ev[0].state == SourceState.CONNECTING
        delays = [e.retry_in for e in recon]
        # equal jitter: attempt n waits in [d_n/2, d_n] with d_n doubling, so the first ones grow
        assert delays[0] <= 0.05 and delays[1] >= delays[0] and delays[2] >= delays[1]
        assert all(d <= 0.4 for d in delays) and max(delays) > 0.1
        # each attempt really waited (loosely: event spacing >= the announced delay, minus slack)
        for a, b in zip(recon, recon[1:]):
            assert b.ts - a.ts >= 0.8 * a.retry_in
        assert "connection refused" in recon[0].detail and "127.0.0.1" in recon[0].detail
        assert src.reconnects >= 6 and not src.finished
    finally:
        t = time.monotonic()
        assert src.stop(timeout=5)
        assert time.monotonic() - t < 1.5  # waiting in backoff: stop is immediate
    assert src.state == SourceState.STOPPED and ev[-1].state == SourceState.STOPPED
    assert src.finished and src.read(0.05) is None
    # credentials never reach events or logs
    assert all("hunter2" not in e.detail and "admin" not in e.detail for e in ev)
    assert "hunter2" not in caplog.text and "***@127.0.0.1" in caplog.text


def test_silent_server_does_not_hang():
    # accepts the TCP connection, never says a word (e.g. a wedged camera)
    with TcpServer(payload=None) as server:
        ev = Events()
        src = Source(
            cfg(f"rtsp://127.0.0.1:{server.port}/cam", open_timeout_s=1.0, read_timeout_s=1.0, reconnect_base_s=0.1),
            on_status=ev,
        ).start()
        try:
            e = ev.wait_for(SourceState.RECONNECTING, timeout=1.0 + 4.0)
            assert e is not None, f"still {src.state} after the timeout"
            assert "no response within 1 s" in e.detail
            assert server.accepted >= 1
            assert src.read(0.05) is None
        finally:
            t = time.monotonic()
            src.stop(timeout=5)
            assert time.monotonic() - t < 1.0 + 2.0  # at worst one open timeout
        assert src.state == SourceState.STOPPED


def _mpegts_bytes(n: int = 60) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mpegts") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.options = {"tune": "zerolatency", "g": "10"}
        for i in range(n):
            img = np.full((48, 64, 3), (4 * i) % 256, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def test_stalled_http_stream_hits_read_timeout_and_reconnects():
    # each connection: 6 s of valid stream, then silence with the socket kept open. (fflags=nobuffer
    # discards what FFmpeg reads while probing, about the first second, hence the long payload.)
    payload = b"HTTP/1.0 200 OK\r\nContent-Type: video/mp2t\r\n\r\n" + _mpegts_bytes(150)
    with TcpServer(payload=payload) as server:
        ev = Events()
        src = Source(
            cfg(
                f"http://127.0.0.1:{server.port}/live.ts",
                open_timeout_s=2.0,
                read_timeout_s=1.0,
                reconnect_base_s=0.05,
                queue_size=1000,
            ),
            on_status=ev,
        ).start()
        try:
            first = src.read(5.0)
            assert first is not None and first.index == 0 and first.image.shape == (48, 64, 3)
            streaming = ev.wait_for(SourceState.STREAMING, 1.0)
            stalled = ev.wait_for(SourceState.RECONNECTING, timeout=1.0 + 4.0)
            assert stalled is not None, f"no reconnect after the stall, state {src.state}"
            assert "stalled" in stalled.detail and "no data for 1 s" in stalled.detail
            assert stalled.ts - streaming.ts < 1.0 + 4.0
            first_connection = src.decoded  # everything it sent was decoded before the stall
            # second connection: STREAMING again, index continues where it was
            assert ev.wait_for(SourceState.STREAMING, timeout=5.0, after=ev.index(stalled)) is not None
            indices = [first.index]
            deadline = time.monotonic() + 5
            while len(indices) < first_connection + 5 and time.monotonic() < deadline:
                f = src.read(0.5)
                if f is not None:
                    indices.append(f.index)
            assert indices == list(range(len(indices))) and len(indices) == first_connection + 5
            assert server.accepted >= 2 and src.dropped == 0
        finally:
            src.stop(timeout=5)
        assert src.state == SourceState.STOPPED


def test_real_rtsp_server_outage_and_recovery():
    servers = pytest.importorskip("tests.servers")
    if not servers.rtsp_available():
        pytest.skip("GStreamer RTSP server not available (bash .ci/install_system_deps.sh)")
    with servers.RtspServer(width=64, height=48, fps=15) as server:
        url = server.url.replace("rtsp://", "rtsp://viewer:s3cret@")
        ev = Events()
        with Source(
            cfg(url, open_timeout_s=3.0, read_timeout_s=1.0, reconnect_base_s=0.1, reconnect_max_s=0.5), on_status=ev
        ) as src:
            f = src.read(10.0)
            assert f is not None and f.image.shape == (48, 64, 3)
            assert abs(time.time() - f.timestamp) < 5.0  # live: wall-clock timestamps
            server.kill()
            lost = ev.wait_for(SourceState.RECONNECTING, timeout=1.0 + 4.0)
            assert lost is not None
            server.restart()
            back = ev.wait_for(SourceState.STREAMING, timeout=15.0, after=ev.index(lost))
            assert back is not None, f"did not recover: {src.detail}"
            g = None
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and (g is None or g.index <= f.index):
                g = src.read(1.0) or g
            assert g is not None and g.index > f.index  # index continues across reconnects
            assert src.reconnects >= 1
        assert all("s3cret" not in e.detail for e in ev)

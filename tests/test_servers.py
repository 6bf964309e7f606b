"""The test-server helpers in tests/servers.py work with the real components."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import pytest

from tests.servers import (
    RedisServer,
    RtspServer,
    SilentTcpServer,
    free_port,
    redis_available,
    rtsp_available,
)

W, H, FPS, NFRAMES = 320, 240, 15, 30

needs_redis = pytest.mark.skipif(not redis_available(), reason="redis-server missing (bash .ci/install_system_deps.sh)")
needs_rtsp = pytest.mark.skipif(
    not rtsp_available(), reason="GStreamer RTSP server missing (bash .ci/install_system_deps.sh)"
)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def make_video(path: Path, n: int = NFRAMES, w: int = W, h: int = H, fps: int = FPS) -> Path:
    """A small H.264 (or MPEG-4 fallback) .mp4 with a moving white bar."""
    import av

    try:
        av.codec.Codec("libx264", "w")
        codec = "libx264"
    except Exception:  # pragma: no cover - PyAV wheels ship libx264
        codec = "mpeg4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            img = np.full((h, w, 3), 40, np.uint8)
            x = (i * 9) % (w - 24)
            img[:, x : x + 24] = 255
            for pkt in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(pkt)
        for pkt in stream.encode():
            out.mux(pkt)
    return path


def read_frames(url: str, n: int, timeout=(10, 5)) -> list:
    """Open an RTSP url with PyAV over TCP and decode up to n frames as RGB arrays."""
    import av

    frames = []
    with av.open(url, options={"rtsp_transport": "tcp"}, timeout=timeout) as c:
        for frame in c.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) >= n:
                break
    return frames


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return make_video(tmp_path_factory.mktemp("video") / "clip.mp4")


# --------------------------------------------------------------------------------------------
# generic
# --------------------------------------------------------------------------------------------


def test_free_port_is_bindable():
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


# --------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------


@needs_redis
def test_redis_ping_kill_restart_same_port():
    import redis

    with RedisServer() as srv:
        assert srv.url == f"redis://127.0.0.1:{srv.port}/0"
        r = redis.Redis.from_url(srv.url, socket_timeout=2, socket_connect_timeout=2)
        assert r.ping() is True
        r.set("k", "v")
        port, pid = srv.port, srv.pid

        srv.kill()
        assert not srv.is_running()
        with pytest.raises(redis.exceptions.ConnectionError):
            r.ping()

        srv.restart()
        assert srv.port == port and srv.pid != pid
        assert r.ping() is True  # redis-py reconnects to the same address
        assert r.get("k") is None  # no persistence: a fresh server
    assert not srv.is_running()


@needs_redis
def test_redis_password_requires_auth():
    import redis

    with RedisServer(password="s3cret") as srv:
        anon = redis.Redis.from_url(srv.url, socket_timeout=2)
        with pytest.raises(redis.exceptions.AuthenticationError):
            anon.ping()
        wrong = redis.Redis.from_url(srv.url, password="nope", socket_timeout=2)
        with pytest.raises(redis.exceptions.AuthenticationError):
            wrong.ping()
        assert redis.Redis.from_url(srv.url_with_auth(), socket_timeout=2).ping() is True
        assert srv.client().ping() is True


@needs_redis
def test_redis_acl_user():
    import redis

    with RedisServer(password="defaultpw", acl_user=("spade", "userpw")) as srv:
        assert srv.url_with_auth() == f"redis://spade:userpw@127.0.0.1:{srv.port}/0"
        ok = redis.Redis.from_url(srv.url_with_auth(), socket_timeout=2)
        assert ok.ping() is True
        assert ok.acl_whoami() in ("spade", b"spade")
        bad = redis.Redis.from_url(srv.url, username="spade", password="wrong", socket_timeout=2)
        with pytest.raises(redis.exceptions.AuthenticationError):
            bad.ping()


# --------------------------------------------------------------------------------------------
# RTSP
# --------------------------------------------------------------------------------------------


@needs_rtsp
def test_rtsp_serves_looping_video_kill_restart(video):
    import av

    with RtspServer(video=video, loop=True) as srv:
        assert srv.url == f"rtsp://127.0.0.1:{srv.port}/cam"
        # more frames than the file has: the server loops
        frames = read_frames(srv.url, NFRAMES + 10)
        assert len(frames) == NFRAMES + 10
        assert all(f.shape == (H, W, 3) for f in frames)
        assert max(float(f.mean()) for f in frames) > 50  # the white bar is there
        port, pid = srv.port, srv.pid

        srv.kill()
        assert not srv.is_running()
        t0 = time.monotonic()
        with pytest.raises(av.error.FFmpegError):
            read_frames(srv.url, 1, timeout=(3, 3))
        assert time.monotonic() - t0 < 5  # connection refused, no hang

        srv.restart()
        assert srv.port == port and srv.pid != pid
        frames = read_frames(srv.url, 5)
        assert len(frames) == 5 and frames[0].shape == (H, W, 3)
    assert not srv.is_running()


@needs_rtsp
def test_rtsp_file_without_loop_ends(video):
    with RtspServer(video=video, loop=False) as srv:
        t0 = time.monotonic()
        frames = read_frames(srv.url, 10 * NFRAMES)
        # the stream ends at the end of the file (roughly NFRAMES frames; no hang)
        assert NFRAMES // 2 <= len(frames) <= NFRAMES + 5
        assert time.monotonic() - t0 < 15


@needs_rtsp
def test_rtsp_pattern():
    with RtspServer(video=None, width=160, height=128, fps=25) as srv:
        frames = read_frames(srv.url, 5)
        assert len(frames) == 5 and frames[0].shape == (128, 160, 3)


# --------------------------------------------------------------------------------------------
# silent TCP server
# --------------------------------------------------------------------------------------------


def test_silent_tcp_server_makes_open_time_out():
    import av

    with SilentTcpServer() as srv:
        assert srv.url == f"rtsp://127.0.0.1:{srv.port}/cam"
        t0 = time.monotonic()
        with pytest.raises(av.error.FFmpegError):
            av.open(srv.url, options={"rtsp_transport": "tcp"}, timeout=(2, 2))
        elapsed = time.monotonic() - t0
        assert srv.accepted >= 1  # it did connect: the failure is the silence, not a refusal
        assert elapsed < 8, f"open took {elapsed:.1f}s"
    # port is released
    with socket.socket() as s:
        s.bind(("127.0.0.1", srv.port))

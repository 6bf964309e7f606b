"""Everything that knows how inputs are opened and decoded: PyAV/FFmpeg options, URL kinds, error
mapping, credential redaction, and image folders.

`stream.sources` decides *when* to open, retry and buffer; this module decides *how*. Keeping the
FFmpeg knowledge here means a tuning change (probe size, transport, timeouts) happens in one place.

Every string that may contain a URL goes through `redact()` before it reaches a log line, a status
detail or an exception message: camera URLs routinely carry `user:password@`.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import unquote, urlsplit

import av
import cv2
import numpy as np
from av.video.reformatter import VideoReformatter

from configs.errors import UserError
from stream.picture import Picture

log = logging.getLogger(__name__)

Kind = Literal["file", "rtsp", "http", "webcam", "images"]
LIVE_KINDS: frozenset[str] = frozenset({"rtsp", "http", "webcam"})
IMAGE_EXTS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

# Live inputs: start decoding as soon as possible instead of buffering/probing for seconds.
# FFmpeg's defaults (5 MB probe, 5 s analysis) are tuned for files and add seconds of start-up
# latency on a camera; 0.5 MB / 1 s is still enough to find the resolution of an H.264/H.265 stream.
LIVE_OPTIONS = {
    "fflags": "nobuffer",
    "flags": "low_delay",
    "probesize": "500000",
    "analyzeduration": "1000000",  # microseconds
    "max_delay": "500000",  # microseconds of RTP/demuxer reordering we accept
}

# A stream whose packets all fail to decode is not a video we can use; a few bad packets in a
# row (packet loss on a camera, a damaged region in a file) are normal and skipped.
MAX_CONSECUTIVE_BAD_PACKETS = 100

# Errors no retry can fix: the URL names something this FFmpeg build cannot handle at all.
_PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    av.error.ProtocolNotFoundError,
    av.error.DemuxerNotFoundError,
    av.error.DecoderNotFoundError,
    av.error.OptionNotFoundError,
)


class InputError(UserError):
    """An input could not be opened or read. The message is "<redacted url>: <problem> (<reason>)".

    `permanent` is False for what a live source may recover from by reconnecting (refused,
    timed out, stream ended); files treat every InputError as final.
    """

    def __init__(self, url: str, problem: str, reason: str | None = None, *, permanent: bool = False):
        self.url = redact(url)
        self.problem = problem
        self.reason = redact(reason) if reason else None
        self.permanent = permanent
        super().__init__(f"{self.url}: {problem}" + (f" ({self.reason})" if self.reason else ""))


# ----------------------------------------------------------------------------------------------
# URLs
# ----------------------------------------------------------------------------------------------

# scheme://userinfo@ : the userinfo ends at the LAST '@' before the first '/', '?', '#' or space,
# the same rule FFmpeg's av_url_split applies, so what FFmpeg would send as credentials is exactly
# what gets hidden (an unencoded '@' in a password included; '/' in a password must be %2F for
# FFmpeg too). Works on free text, e.g. an FFmpeg message that quotes the URL.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^\s/?#@]*(?:@[^\s/?#@]*)*@")
# Some cameras (Dahua, Hikvision, ...) take credentials as query parameters instead.
_SECRET_QUERY = re.compile(
    r"(?i)([?&;](?:user|username|password|passwd|pwd|pass|token|access_token|auth|key|api_key|"
    r"apikey|secret|signature|sig)=)[^&#\s'\"]*"
)


def redact(text: str) -> str:
    """`text` with URL credentials replaced: rtsp://user:pass@host -> rtsp://***@host.

    Also hides password-only (`://:pass@`), user-only and percent-encoded credentials, and
    credential-looking query parameters (`?user=...&password=...`)."""
    if not text:
        return text
    text = _USERINFO.sub(r"\1***@", text)
    return _SECRET_QUERY.sub(r"\1***", text)


def with_credentials(url: str, username: str | None, password: str | None) -> str:
    """`url` with `username:password@` put in front of its host (percent-encoded), for FFmpeg only.

    The result must never be logged or stored: pass it straight to `open_input`; every message
    about it goes through `redact()`."""
    if username is None and password is None:
        return url
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]*://)(.*)$", url.strip(), re.S)
    if m is None:
        raise UserError(f"{redact(url)}: credentials can only be added to a URL (rtsp://, http://, ...)")
    from urllib.parse import quote

    auth = quote(username or "", safe="") + (":" + quote(password, safe="") if password is not None else "")
    return f"{m.group(1)}{auth}@{m.group(2)}"


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_SUPPORTED = (
    "rtsp://, rtsps://, http(s):// (HLS .m3u8 included), a video file, "
    "a folder of images or a webcam (/dev/videoN, N or v4l2:/dev/videoN)"
)


def classify(url: str) -> Kind:
    """The kind of input `url` names: "file", "rtsp", "http", "webcam" or "images"."""
    s = url.strip()
    if re.fullmatch(r"\d+", s) or s.lower().startswith("v4l2:") or re.fullmatch(r"/dev/video\d+", s):
        return "webcam"
    m = _SCHEME.match(s)
    if m:
        scheme = m.group(1).lower()
        if scheme in ("rtsp", "rtsps"):
            return "rtsp"
        if scheme in ("http", "https", "hls+http", "hls+https"):
            return "http"
        if scheme == "file":
            return "images" if local_path(s).is_dir() else "file"
        hint = "; for HLS give the playlist's http(s):// URL" if scheme == "hls" else ""
        raise UserError(f"{redact(s)}: unsupported URL scheme '{scheme}://' (expected {_SUPPORTED}){hint}")
    return "images" if Path(s).expanduser().is_dir() else "file"


def local_path(url: str) -> Path:
    """The filesystem path of a file/folder source (`file://` URLs included)."""
    s = url.strip()
    if s.lower().startswith("file://"):
        return Path(unquote(urlsplit(s).path))
    return Path(s).expanduser()


def _ffmpeg_target(url: str, kind: Kind) -> tuple[str, str | None]:
    """(what to pass to FFmpeg, forced demuxer format or None)."""
    s = url.strip()
    if kind == "webcam":
        dev = s[5:] if s.lower().startswith("v4l2:") else s
        if re.fullmatch(r"\d+", dev):
            dev = f"/dev/video{dev}"
        # Linux capture devices; other OSes would need avfoundation/dshow here.
        return dev, "v4l2"
    if kind == "file":
        return str(local_path(s)), None
    if kind == "http":
        # "hls+http://" is FFmpeg's old spelling; the hls demuxer now probes http(s) playlists itself.
        return re.sub(r"(?i)^hls\+", "", s), None
    return s, None


# ----------------------------------------------------------------------------------------------
# opening and decoding
# ----------------------------------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    # strerror, never str(exc): PyAV's str() appends the (unredacted) URL.
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    text = str(text).strip().rstrip(".")
    return redact(text[:1].lower() + text[1:])


def _is_timeout(exc: BaseException, elapsed: float, limit: float | None) -> bool:
    # PyAV aborts a blocking call through FFmpeg's interrupt callback; depending on the protocol
    # that surfaces as "immediate exit requested", as a timeout, or as a misleading "invalid data"
    # from a half-read header. The elapsed time tells them apart.
    if isinstance(exc, (av.error.ExitError, av.error.TimeoutError, TimeoutError)):
        return True
    return limit is not None and elapsed >= 0.9 * limit


def _open_error(url: str, kind: Kind, exc: BaseException, elapsed: float, open_timeout: float) -> InputError:
    permanent = isinstance(exc, _PERMANENT_ERRORS)
    if kind in LIVE_KINDS:
        if _is_timeout(exc, elapsed, open_timeout):
            return InputError(url, "cannot connect", f"no response within {open_timeout:g} s")
        if isinstance(exc, av.error.FileNotFoundError) and kind == "webcam":
            return InputError(url, "cannot open webcam", "no such device")
        what = "unsupported URL" if permanent else "cannot connect"
        return InputError(url, what, _reason(exc), permanent=permanent)
    if isinstance(exc, (av.error.FileNotFoundError, FileNotFoundError)):
        return InputError(url, "cannot open", "no such file", permanent=True)
    if isinstance(exc, (av.error.PermissionError, PermissionError)):
        return InputError(url, "cannot open", "permission denied", permanent=True)
    if isinstance(exc, (av.error.IsADirectoryError, IsADirectoryError)):
        return InputError(url, "cannot open", "is a directory; expected a video file", permanent=True)
    return InputError(url, "not a decodable video", _reason(exc), permanent=True)


def resolve_hwaccel(name: str) -> str | None:
    """source.hwaccel -> the device type to decode on, or None for software decoding."""
    return None if name == "none" else name


def open_input(
    url: str,
    kind: Kind,
    open_timeout: float = 10.0,
    read_timeout: float = 5.0,
    rtsp_transport: str = "tcp",
    hwaccel: str | None = None,
) -> av.container.InputContainer:
    """An opened PyAV input container for `url`, or InputError naming the (redacted) URL.

    `timeout=(open, read)` bounds the connection and every packet read, so a camera that accepts
    the connection and then sends nothing raises instead of hanging. Caller closes the container.
    `hwaccel` ('cuda'): decode on the GPU, frames come back to host memory; a stream the hardware
    cannot decode falls back to software inside FFmpeg, and a device that cannot be opened at all
    falls back here, with a warning.
    """
    target, fmt = _ffmpeg_target(url, kind)
    if kind == "file":
        # Checked here because FFmpeg reports an empty file as "invalid data", which sends
        # people looking for a codec problem.
        p = Path(target)
        if p.is_file() and p.stat().st_size == 0:
            raise InputError(url, "not a decodable video", "the file is empty", permanent=True)
    options: dict[str, str] = {}
    if kind in LIVE_KINDS:
        options.update(LIVE_OPTIONS)
    if kind == "rtsp":
        # TCP by default: UDP loses packets on busy networks and through NAT, and a smeared
        # H.264 picture is worse for an anomaly detector than a few ms of latency.
        options["rtsp_transport"] = rtsp_transport
    t0 = time.monotonic()
    kwargs: dict[str, Any] = {}
    if hwaccel is not None:
        from av.codec.hwaccel import HWAccel

        kwargs["hwaccel"] = HWAccel(device_type=hwaccel, allow_software_fallback=True)
    try:
        return av.open(target, "r", fmt, options, timeout=(open_timeout, read_timeout), **kwargs)
    except (av.error.FFmpegError, OSError) as exc:
        if hwaccel is not None:
            # FFmpeg reports a missing or busy device the same way as a bad input: retry in software
            # once, and let that attempt decide whether the input itself is the problem.
            log.warning(
                "%s: hardware decoding (%s) unavailable (%s): decoding on the CPU", redact(url), hwaccel, _reason(exc)
            )
            return open_input(url, kind, open_timeout, read_timeout, rtsp_transport, None)
        raise _open_error(url, kind, exc, time.monotonic() - t0, open_timeout) from None


class VideoInput:
    """One opened video (file or live stream): `pictures()` yields (Picture, media time or None),
    `frames()` the same with each picture converted to a full-size RGB array.

    Use as a context manager; the container is always closed (PyAV leaks decoder memory and file
    descriptors otherwise).
    """

    def __init__(
        self,
        url: str,
        kind: Kind,
        *,
        open_timeout: float = 10.0,
        read_timeout: float = 5.0,
        rtsp_transport: str = "tcp",
        hwaccel: str | None = None,
        threads: int = 0,
    ):
        self.url, self.kind, self.name = url, kind, redact(url)
        self.open_timeout, self.read_timeout = open_timeout, read_timeout
        self._frames: Iterator | None = None
        self._reformatter = VideoReformatter()  # one swscale context for all of this input's frames
        self.decoded = 0  # frames decoded so far
        self.bad_packets = 0  # packets skipped because they failed to decode
        self.container = open_input(url, kind, open_timeout, read_timeout, rtsp_transport, hwaccel)
        try:
            if not self.container.streams.video:
                raise InputError(url, "no video stream", "expected a video", permanent=kind not in LIVE_KINDS)
            self.stream = self.container.streams.video[0]
            # Files: frame + slice threads for throughput. Live: slice threads only, because
            # frame threading holds back one frame per thread, i.e. adds latency.
            self.stream.thread_type = "AUTO" if kind == "file" else "SLICE"
            if threads > 0:  # else FFmpeg's default, one per core: oversubscribed when many cameras decode
                self.stream.thread_count = threads
        except BaseException:
            self.container.close()
            raise

    @property
    def fps(self) -> float | None:
        for rate in (self.stream.average_rate, self.stream.guessed_rate, self.stream.base_rate):
            if rate:
                return float(rate)
        return None

    def pictures(self) -> Iterator[tuple[Picture, float | None]]:
        """Decoded frames until end of input, not yet converted (stream.picture). A file that yields no
        frame at all raises InputError. Convert each on the thread that iterates (the pictures share
        this input's swscale context)."""
        if self._frames is None:
            self._frames = self._decode()
        return self._frames

    def frames(self) -> Iterator[tuple[np.ndarray, float | None]]:
        """(uint8 RGB [H, W, 3], media time or None) until end of input."""
        return ((p.rgb(), t) for p, t in self.pictures())

    def _decode(self) -> Iterator[tuple[Picture, float | None]]:
        packets = cast(Generator, self.container.demux(self.stream))
        bad, last_data = 0, time.monotonic()
        try:
            while True:
                try:
                    packet = next(packets)
                except StopIteration:
                    break
                except (av.error.FFmpegError, OSError) as exc:
                    raise self._read_error(exc, time.monotonic() - last_data) from None
                last_data = time.monotonic()
                try:
                    decoded = packet.decode()
                except av.error.FFmpegError as exc:
                    bad += 1
                    self.bad_packets += 1
                    log.debug("%s: undecodable packet skipped (%s)", self.name, _reason(exc))
                    if bad > MAX_CONSECUTIVE_BAD_PACKETS:
                        raise InputError(
                            self.url,
                            "not a decodable video",
                            f"{bad} packets in a row failed to decode: {_reason(exc)}",
                            permanent=self.kind not in LIVE_KINDS,
                        ) from None
                    continue
                for vf in decoded:
                    bad = 0
                    self.decoded += 1
                    yield Picture(vf, self._reformatter), vf.time
        finally:
            packets.close()
        if self.decoded == 0 and self.kind not in LIVE_KINDS:
            raise InputError(self.url, "not a decodable video", "no video frame could be decoded", permanent=True)

    @property
    def damage(self) -> str | None:
        """After the last frame: why the file looks damaged (e.g. truncated), or None."""
        expected = self.stream.frames or None  # frame count from the header; 0 when unknown
        short = expected is not None and self.decoded < expected
        if not self.bad_packets and not short:
            return None
        parts = [f"{self.bad_packets} undecodable packet(s)"] if self.bad_packets else []
        if short:
            parts.append(f"decoded {self.decoded} of the {expected} frames its header lists")
        return "damaged or truncated: " + ", ".join(parts)

    def _read_error(self, exc: BaseException, since_data: float) -> InputError:
        if self.kind in LIVE_KINDS:
            if _is_timeout(exc, since_data, self.read_timeout):
                return InputError(self.url, "stream stalled", f"no data for {self.read_timeout:g} s")
            return InputError(self.url, "stream lost", _reason(exc))
        return InputError(self.url, "not a decodable video", _reason(exc), permanent=True)

    def close(self) -> None:
        try:
            if self._frames is not None:
                cast(Generator, self._frames).close()  # runs the demuxer's cleanup before the container goes away
        finally:
            self.container.close()

    def __enter__(self) -> VideoInput:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# image folders
# ----------------------------------------------------------------------------------------------


def _natural_key(p: Path) -> list:
    # frame2.jpg before frame10.jpg; identical to plain sorting for zero-padded names.
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", p.name)]


def read_image(path: Path) -> np.ndarray | None:
    """uint8 RGB [H, W, 3] or None when the file cannot be decoded."""
    try:
        # imdecode(fromfile) rather than imread: handles non-ASCII paths; IMREAD_COLOR turns gray,
        # alpha and 16-bit images into 8-bit 3-channel.
        data = np.fromfile(str(path), dtype=np.uint8)
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    except (OSError, cv2.error):
        return None
    if bgr is None:
        return None
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


class ImageFolder:
    """Sorted image files of a folder, with the same interface as VideoInput (`fps` is None).

    Non-image files and unreadable images are skipped with a warning naming them.
    """

    def __init__(self, url: str):
        self.url, self.name = url, redact(url)
        folder = local_path(url)
        if not folder.is_dir():
            raise InputError(url, "cannot open", "not a folder; expected a folder of images", permanent=True)
        self.images: list[Path] = []
        for p in sorted(folder.iterdir(), key=_natural_key):
            if p.is_dir():
                continue
            if p.suffix.lower() in IMAGE_EXTS:
                self.images.append(p)
            else:
                log.warning("%s: skipping %s (not an image; expected %s)", self.name, p.name, ", ".join(IMAGE_EXTS))
        if not self.images:
            raise InputError(url, "no images", f"expected {', '.join(IMAGE_EXTS)} files", permanent=True)
        self.fps: float | None = None

    def pictures(self) -> Iterator[tuple[Picture, float | None]]:
        return ((Picture(img), t) for img, t in self.frames())

    def frames(self) -> Iterator[tuple[np.ndarray, float | None]]:
        n = 0
        for p in self.images:
            img = read_image(p)
            if img is None:
                log.warning("%s: skipping %s (cannot be decoded as an image)", self.name, p.name)
                continue
            n += 1
            yield img, None
        if n == 0:
            raise InputError(self.url, "no readable images", "every image file failed to decode", permanent=True)

    damage: str | None = None  # unreadable images are warned about one by one

    def close(self) -> None:
        pass

    def __enter__(self) -> ImageFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

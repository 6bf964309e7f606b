#!/usr/bin/python3
"""Small GStreamer RTSP server used by the test suite.

Run it with the *system* python (``/usr/bin/python3``), which has PyGObject (``gi``) and the
GstRtspServer typelib; the project's own python does not.

    /usr/bin/python3 tests/rtsp_server.py --port 8554 --mount /cam --video clip.mp4 [--loop]
    /usr/bin/python3 tests/rtsp_server.py --port 8554 --mount /cam --pattern [--width W --height H --fps F]

Modes
-----
``--video PATH`` (no ``--loop``)
    Every client gets its own pipeline that plays the file once from the start, in real time,
    re-encoded to H.264 (``x264enc tune=zerolatency``); the stream ends at the end of the file.
``--video PATH --loop``
    Behaves like a live camera: one producer pipeline decodes the file in real time and loops it
    forever (seek to 0 on EOS), whether or not a client is connected.  Clients share one RTSP
    media that re-encodes those frames to H.264, so a client that connects later joins the
    stream "now" (it starts on a key frame, as x264enc starts fresh for every new media).
``--pattern``
    ``videotestsrc is-live=true`` (shared, live) instead of a file.

Prints ``READY`` on stdout once the server listens.  Exits cleanly on SIGTERM / SIGINT.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

ENCODE = (
    "videoconvert ! video/x-raw,format=I420 ! "
    "x264enc tune=zerolatency speed-preset=ultrafast key-int-max={gop} bframes=0 ! "
    "video/x-h264,profile=constrained-baseline ! "
    "rtph264pay name=pay0 pt=96 config-interval=-1"
)


def log(msg: str) -> None:
    print(f"rtsp_server: {msg}", file=sys.stderr, flush=True)


class LoopingFileProducer:
    """Decodes a video file in real time into an appsink, looping forever.

    Every decoded frame is handed to whatever appsrc(s) the RTSP media currently has; frames
    produced while no client is connected are dropped (like a live camera).
    """

    def __init__(self, path: str) -> None:
        self.pipeline = Gst.parse_launch(
            "filesrc name=file ! decodebin ! videoconvert ! "
            "video/x-raw,format=I420 ! appsink name=sink sync=true emit-signals=true "
            "max-buffers=2 drop=true"
        )
        self.pipeline.get_by_name("file").set_property("location", path)
        self.sink = self.pipeline.get_by_name("sink")
        self.sink.connect("new-sample", self._on_sample)
        self._lock = threading.Lock()
        self._appsrcs: list[Gst.Element] = []
        self.caps: Gst.Caps | None = None
        bus = self.pipeline.get_bus()
        bus.add_signal_watch()
        bus.connect("message", self._on_message)

    def start(self) -> bool:
        return self.pipeline.set_state(Gst.State.PLAYING) != Gst.StateChangeReturn.FAILURE

    def stop(self) -> None:
        self.pipeline.set_state(Gst.State.NULL)

    def add_appsrc(self, appsrc: Gst.Element) -> None:
        with self._lock:
            if self.caps is not None:
                appsrc.set_property("caps", self.caps)
            self._appsrcs.append(appsrc)

    def remove_appsrc(self, appsrc: Gst.Element) -> None:
        with self._lock:
            self._appsrcs = [a for a in self._appsrcs if a is not appsrc]

    def _on_sample(self, sink: Gst.Element) -> Gst.FlowReturn:
        sample = sink.emit("pull-sample")
        if sample is None:
            return Gst.FlowReturn.OK
        caps = sample.get_caps()
        with self._lock:
            if self.caps is None or not self.caps.is_equal(caps):
                self.caps = caps
                for appsrc in self._appsrcs:
                    appsrc.set_property("caps", caps)
            targets = list(self._appsrcs)
        if not targets:
            return Gst.FlowReturn.OK
        src_buf = sample.get_buffer()
        for appsrc in targets:
            # Fresh buffer without timestamps: the appsrc (is-live, do-timestamp) stamps it with
            # the media pipeline's running time, so timestamps keep increasing across loops.
            buf = Gst.Buffer.new()
            buf.append_memory(src_buf.get_all_memory())
            appsrc.emit("push-buffer", buf)
        return Gst.FlowReturn.OK

    def _on_message(self, _bus: Gst.Bus, msg: Gst.Message) -> None:
        if msg.type == Gst.MessageType.EOS:
            ok = self.pipeline.seek_simple(Gst.Format.TIME, Gst.SeekFlags.FLUSH | Gst.SeekFlags.KEY_UNIT, 0)
            if not ok:
                log("seek to start failed; restarting producer pipeline")
                self.pipeline.set_state(Gst.State.NULL)
                self.pipeline.set_state(Gst.State.PLAYING)
        elif msg.type == Gst.MessageType.ERROR:
            err, dbg = msg.parse_error()
            log(f"producer error: {err.message} ({dbg})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mount", default="/cam")
    ap.add_argument("--host", default="127.0.0.1")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--video", help="video file to serve")
    src.add_argument("--pattern", action="store_true", help="serve videotestsrc instead of a file")
    ap.add_argument("--loop", action="store_true", help="loop the video file forever (live camera)")
    ap.add_argument("--width", type=int, default=320, help="--pattern frame width")
    ap.add_argument("--height", type=int, default=240, help="--pattern frame height")
    ap.add_argument("--fps", type=int, default=15, help="--pattern frame rate")
    ap.add_argument("--gop", type=int, default=15, help="key frame interval (frames)")
    args = ap.parse_args(argv)

    Gst.init(None)
    mount = args.mount if args.mount.startswith("/") else "/" + args.mount
    encode = ENCODE.format(gop=max(1, args.gop))

    factory = GstRtspServer.RTSPMediaFactory()
    producer: LoopingFileProducer | None = None

    if args.pattern:
        launch = (
            f"( videotestsrc is-live=true pattern=ball ! "
            f"video/x-raw,width={args.width},height={args.height},framerate={args.fps}/1 ! "
            f"{encode} )"
        )
        factory.set_shared(True)
    elif args.loop:
        if not os.path.isfile(args.video):
            log(f"no such file: {args.video}")
            return 2
        producer = LoopingFileProducer(os.path.abspath(args.video))
        launch = (
            "( appsrc name=src is-live=true do-timestamp=true format=time block=false "
            f"max-buffers=30 leaky-type=downstream ! {encode} )"
        )
        factory.set_shared(True)

        def on_media_configure(_factory, media):
            appsrc = media.get_element().get_child_by_name("src")
            producer.add_appsrc(appsrc)
            media.connect("unprepared", lambda _m: producer.remove_appsrc(appsrc))

        factory.connect("media-configure", on_media_configure)
    else:
        if not os.path.isfile(args.video):
            log(f"no such file: {args.video}")
            return 2
        video = os.path.abspath(args.video)
        launch = f"( filesrc name=file ! decodebin ! {encode} )"
        factory.set_shared(False)

        def on_media_configure_file(_factory, media):
            media.get_element().get_child_by_name("file").set_property("location", video)

        factory.connect("media-configure", on_media_configure_file)

    factory.set_launch(launch)
    factory.set_eos_shutdown(False)

    server = GstRtspServer.RTSPServer()
    server.set_address(args.host)
    server.set_service(str(args.port))
    server.get_mount_points().add_factory(mount, factory)

    loop = GLib.MainLoop()
    if server.attach(None) == 0:
        log(f"could not listen on {args.host}:{args.port}")
        return 1
    if producer is not None and not producer.start():
        log("could not start the file producer pipeline")
        return 1

    def quit_(*_a):
        loop.quit()
        return GLib.SOURCE_REMOVE

    GLib.unix_signal_add(GLib.PRIORITY_HIGH, signal.SIGTERM, quit_)
    GLib.unix_signal_add(GLib.PRIORITY_HIGH, signal.SIGINT, quit_)

    print("READY", flush=True)
    log(f"serving rtsp://{args.host}:{args.port}{mount}")
    try:
        loop.run()
    finally:
        if producer is not None:
            producer.stop()
    # Don't let GStreamer/GLib teardown of live RTSP sessions delay the exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())

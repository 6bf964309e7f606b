"""The operator console in a real browser (Playwright driving Debian's Chromium) against a real Redis fed
by the real live pipeline (app.pipeline.Pipeline over a looped synthetic clip, Redis + preview sinks and
snapshots): the page lists the camera, a new alert shows within 2 s without a reload, the preview moves,
"False alarm" reaches `spade:feedback`, a wrong token is refused; the screenshot is saved where
SPADE_CONSOLE_SCREENSHOT says (docs/console.png for the README)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette", reason="starlette not installed (pip install -e '.[console]')")
pytest.importorskip("uvicorn", reason="uvicorn not installed (pip install -e '.[console]')")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")

from configs.schema import SourceConfig  # noqa: E402
from tests.servers import RedisServer, redis_available  # noqa: E402
from tests.test_console_http import TOKEN, ConsoleServer  # noqa: E402

CHROMIUM = next(
    (p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), shutil.which("chromium")
)
ROOT = Path(__file__).resolve().parents[1]
RED = np.array([230, 40, 40])

pytestmark = [
    pytest.mark.skipif(not redis_available(), reason="redis-server not installed"),
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)"),
    pytest.mark.slow,
    pytest.mark.timeout(300),
]


class LivePipeline:
    """The real pipeline on a looped, paced clip with an anomaly, publishing to Redis, in a thread."""

    def __init__(self, env, out, redis_url):
        from tests.helpers import base_cfg

        self.cfg = base_cfg()
        self.cfg.sinks.redis.url = redis_url
        self.cfg.sinks.redis.spool_dir = str(out / "spool")
        self.cfg.alerts.snapshot_dir = str(out / "snapshots")
        self.cfg.sinks.jsonl.enabled = False
        self.env, self.out = env, out
        self.pipe = None
        self.thread = None

    def start(self, detector):
        from app.pipeline import Pipeline
        from sinks import build_sinks

        self.cfg.sources = [
            SourceConfig(name="gate", url=str(self.env / "clip.mp4"), fps=12, loop=True),
            SourceConfig(name="lobby", url=str(self.env / "plain.mp4"), fps=6, loop=True),
        ]
        self.pipe = Pipeline(self.cfg, detector, build_sinks(self.cfg.sinks, self.cfg.alerts, self.out))
        self.thread = threading.Thread(target=lambda: self.pipe.run(duration_s=240, progress=False), daemon=True)
        self.thread.start()

    def stop(self):
        if self.pipe is not None:
            self.pipe.stop()
            self.thread.join(30)


def has_colour(png: bytes, colour=RED, tol=30, min_pixels=30) -> int:
    import cv2

    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)[..., ::-1].astype(int)
    n = int((np.abs(img - colour).max(axis=2) <= tol).sum())
    return n if n >= min_pixels else 0


def test_console_in_a_browser(env, detector, tmp_path):
    with RedisServer() as srv:
        client = srv.client(decode_responses=True)
        alerts_ps = client.pubsub()
        alerts_ps.subscribe("spade:alerts")
        feedback_ps = client.pubsub()
        feedback_ps.subscribe("spade:feedback")
        for ps in (alerts_ps, feedback_ps):
            assert ps.get_message(timeout=2)["type"] == "subscribe"
        live = LivePipeline(env, tmp_path, srv.url)
        with (
            ConsoleServer(srv.url, snapshots_root=str(tmp_path / "snapshots")) as console,
            sync_api.sync_playwright() as pw,
        ):
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1440, "height": 860})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: m.type == "error" and "404" not in m.text and errors.append(m.text))
            base = f"http://127.0.0.1:{console.port}"
            page.goto(base + "/")
            assert page.title() == "spade-stream console"
            page.wait_for_selector("#live.live-on", timeout=10_000)  # SSE connected before anything happens
            try:
                live.start(detector)
                # the page lists the camera once the pipeline publishes
                page.wait_for_selector(".camera .cam-name:text('gate')", timeout=60_000)
                page.wait_for_selector(".camera .cam-name:text('lobby')", timeout=30_000)
                page.wait_for_selector(".camera .badge.online", timeout=30_000)

                # a new alert appears within 2 s of its publication, without a reload
                deadline, new = time.monotonic() + 90, None
                while new is None and time.monotonic() < deadline:
                    m = alerts_ps.get_message(timeout=1.0)
                    if m and m["type"] == "message" and json.loads(m["data"])["type"] == "new":
                        new = json.loads(m["data"])
                assert new is not None, "the pipeline raised no alert"
                published = time.monotonic()
                row = page.wait_for_selector(f"li.alert[data-id='{new['alert_id']}']", timeout=2_000)
                assert time.monotonic() - published < 2.0
                assert "gate" in row.inner_text()

                # the preview image changes (a live picture, a few per second)
                img = page.locator(".camera .preview img").first
                page.wait_for_function(
                    "() => document.querySelector('.camera .preview img').naturalWidth > 0", timeout=10_000
                )
                shots = [img.screenshot()]
                for _ in range(10):
                    time.sleep(0.7)
                    shots.append(img.screenshot())
                    if shots[-1] != shots[0]:
                        break
                assert shots[-1] != shots[0], "the preview did not change"

                # let the alert's snapshot and the sparkline fill in, then the screenshot for the README
                page.wait_for_function(
                    f"() => {{ const i = document.querySelector(\"li.alert[data-id='{new['alert_id']}'] .thumb img\");"
                    " return i && i.complete && i.naturalWidth > 0; }",
                    timeout=10_000,
                )
                time.sleep(3.5)
                png = page.screenshot(full_page=False)
                pixels = np.frombuffer(png, np.uint8)
                assert len(png) > 20_000 and pixels.std() > 10, "blank screenshot"
                assert has_colour(png), "no alert box colour (230, 40, 40) in the screenshot"
                # the README's picture is refreshed on request only: a test run never rewrites a tracked file
                target = os.environ.get("SPADE_CONSOLE_SCREENSHOT")  # e.g. docs/console.png
                (Path(target) if target else tmp_path / "console.png").write_bytes(png)

                # the detail view draws the regions onto the snapshot (exact box colour, client-side canvas)
                row.click()
                page.wait_for_selector("#detail:not([hidden])", timeout=5_000)
                page.wait_for_timeout(1000)
                assert has_colour(page.locator("#d-snapshot").screenshot(), tol=8)
                assert page.locator("#d-history li").count() >= 1

                # "False alarm" reaches the feedback channel
                page.click("#d-fa")
                fb, deadline = None, time.monotonic() + 5
                while fb is None and time.monotonic() < deadline:
                    m = feedback_ps.get_message(timeout=0.5)
                    if m and m["type"] == "message":
                        fb = json.loads(m["data"])
                assert fb is not None, "no message on spade:feedback"
                assert fb["type"] == "false_alarm" and fb["alert_id"] == new["alert_id"] and fb["camera"] == "gate"
                assert fb["by"] == "console" and fb["v"] == 1
                page.wait_for_selector("#d-fa:disabled", timeout=5_000)
                page.click("#d-close")
                page.wait_for_selector(f"li.alert[data-id='{new['alert_id']}'] .a-verdict.false_alarm", timeout=5_000)
                assert not errors, errors
            finally:
                live.stop()

            # a wrong token is refused; the right one lets the operator in
            with ConsoleServer(srv.url, token=TOKEN) as guarded:
                p2 = browser.new_page()
                g = f"http://127.0.0.1:{guarded.port}"
                p2.goto(g + "/")
                assert p2.url == g + "/login"
                p2.fill("#token", "not-the-token-at-all")
                with p2.expect_response(lambda r: r.url == g + "/login" and r.request.method == "POST") as resp:
                    p2.click("button[type=submit]")
                assert resp.value.status == 401
                assert "Wrong token" in p2.inner_text("body")
                r = p2.request.get(g + "/api/alerts")
                assert r.status == 401
                p2.fill("#token", TOKEN)
                p2.click("button[type=submit]")
                p2.wait_for_selector(".camera .cam-name:text('gate')", timeout=10_000)
                assert TOKEN not in p2.content()
                assert p2.request.get(g + "/api/alerts").status == 200
            browser.close()
        client.close()

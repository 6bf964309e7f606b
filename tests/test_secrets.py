"""Camera and Redis credentials come from the environment or a secrets file and never leak: not into
logs (DEBUG included), JSONL, Redis streams, channels or keys, status messages, /metrics, /healthz,
snapshots' paths, or the stderr of a CLI run."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest

import configs
import run_stream
from app.pipeline import Pipeline
from app.prometheus import MetricsServer
from configs.errors import UserError
from configs.schema import SourceConfig
from detector.detector import Detector
from sinks import build_sinks
from tests.helpers import base_cfg, shared_env, wait_for
from tests.servers import RedisServer, RtspServer, free_port, redis_available, rtsp_available

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)

CAM_USER, CAM_PW = "camadmin-q7", "Cam-Pw#9xK/2@z"
REDIS_PW = "Redis-Pw-7hQ2mZ"  # requirepass of the default user
ACL_USER, ACL_PW = "spade-acl-u1", "Acl-Pw-4vN8rT"
SECRETS = [CAM_PW, REDIS_PW, ACL_PW]


def leaks(text: str) -> list[str]:
    found = []
    for s in SECRETS:
        for form in {s, quote(s, safe=""), quote(s)}:
            if form in text:
                found.append(form)
    return found


def write_secrets(path: Path, mode=0o600) -> Path:
    path.write_text(
        f"# spade-stream secrets\nexport CAM_USER={CAM_USER}\nCAM_PW='{CAM_PW}'\n"
        f'REDIS_ACL_USER={ACL_USER}\nREDIS_ACL_PW="{ACL_PW}"\n\n'
    )
    os.chmod(path, mode)
    return path


@pytest.fixture
def clean_env(monkeypatch):
    for k in ("CAM_USER", "CAM_PW", "REDIS_ACL_USER", "REDIS_ACL_PW"):
        monkeypatch.delenv(k, raising=False)
    yield monkeypatch
    for k in ("CAM_USER", "CAM_PW", "REDIS_ACL_USER", "REDIS_ACL_PW"):
        os.environ.pop(k, None)


def test_load_secrets_file(tmp_path, clean_env, caplog):
    env = {"CAM_USER": "from-environment"}
    names = configs.load_secrets(write_secrets(tmp_path / "s.env"), environ=env)
    assert names == ["CAM_USER", "CAM_PW", "REDIS_ACL_USER", "REDIS_ACL_PW"]
    assert env["CAM_USER"] == "from-environment"  # the real environment wins
    assert env["CAM_PW"] == CAM_PW and env["REDIS_ACL_PW"] == ACL_PW  # quotes removed
    with pytest.raises(UserError, match="readable by every user.*chmod 600"):
        configs.load_secrets(write_secrets(tmp_path / "w.env", 0o644), environ={})
    caplog.set_level(logging.WARNING)
    configs.load_secrets(write_secrets(tmp_path / "g.env", 0o640), environ={})
    assert "group" in caplog.text
    bad = tmp_path / "bad.env"
    bad.write_text(f"CAM_PW {CAM_PW}\n")
    os.chmod(bad, 0o600)
    with pytest.raises(UserError, match="line 1") as e:
        configs.load_secrets(bad, environ={})
    assert not leaks(str(e.value))
    with pytest.raises(UserError, match="not found"):
        configs.load_secrets(tmp_path / "nope.env")


def test_missing_secret_and_credentials_in_url_are_config_errors(tmp_path, clean_env):
    with pytest.raises(UserError, match="sources.cam.password_env: environment variable CAM_PW is not set"):
        from stream.sources import Source

        Source(SourceConfig(name="cam", url="rtsp://h/x", password_env="CAM_PW"))
    with pytest.raises(UserError) as e:
        configs.parse(
            {"sources": [{"name": "cam", "url": f"rtsp://u:{quote(CAM_PW, safe='')}@h/x", "password_env": "CAM_PW"}]}
        )
    assert "already carries credentials" in str(e.value) and not leaks(str(e.value))
    with pytest.raises(UserError) as e:  # a rejected URL is echoed redacted
        configs.parse(
            {
                "sinks": {"redis": {"url": f"redis://u:{REDIS_PW}@h:1/0", "prefix": 7}},
                "sources": [{"name": "bad name", "url": f"rtsp://u:{quote(CAM_PW, safe='')}@h/x"}],
            }
        )
    assert not leaks(str(e.value))


def test_world_readable_secrets_file_refused_by_the_cli(tmp_path, clean_env, capsys):
    s = write_secrets(tmp_path / "s.env", 0o644)
    rc = run_stream.main(
        [
            "run",
            "--bank",
            str(tmp_path / "nobank"),
            "--secrets-file",
            str(s),
            "--source",
            f"cam={tmp_path / 'x.mp4'}",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "error: pipeline.secrets_file" in err and "chmod 600" in err
    assert not leaks(err)


@pytest.mark.skipif(not redis_available(), reason="redis-server not installed")
def test_no_secret_in_any_output(tmp_path_factory, tmp_path, clean_env, caplog):
    env = shared_env(tmp_path_factory)
    caplog.set_level(logging.DEBUG)
    configs.load_secrets(write_secrets(tmp_path / "s.env"))
    rtsp = RtspServer(env / "plain.mp4", loop=True, width=192, height=128, fps=24).start() if rtsp_available() else None
    srv = RedisServer(password=REDIS_PW, acl_user=(ACL_USER, ACL_PW)).start()
    try:
        admin = srv.client(decode_responses=True)
        ps = admin.pubsub()
        ps.psubscribe("*")
        got: list[str] = []
        done = threading.Event()

        def listen():
            while not done.is_set():
                m = ps.get_message(timeout=0.2)
                if m and m["type"] == "pmessage":
                    got.append(f"{m['channel']} {m['data']}")

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()

        cfg = base_cfg()
        cfg.sinks.redis.url = srv.url  # no credentials in the URL: ACL user and password from secrets
        cfg.sinks.redis.username_env, cfg.sinks.redis.password_env = "REDIS_ACL_USER", "REDIS_ACL_PW"
        cfg.sinks.redis.spool_dir = str(tmp_path / "spool")
        cfg.sinks.jsonl.enabled = True
        dead = SourceConfig(
            name="dead",
            url=f"rtsp://127.0.0.1:{free_port()}/x",
            username_env="CAM_USER",
            password_env="CAM_PW",
            open_timeout_s=1,
            read_timeout_s=1,
            reconnect_base_s=0.2,
            reconnect_max_s=0.5,
            health_timeout_s=1.0,
        )
        clip = SourceConfig(name="clip", url=str(env / "clip.mp4"))  # an anomaly: alert messages
        cfg.sources = [dead, clip]
        if rtsp is not None:
            cfg.sources.append(
                SourceConfig(
                    name="cam",
                    url=rtsp.url,
                    username_env="CAM_USER",
                    password_env="CAM_PW",
                    open_timeout_s=5,
                    read_timeout_s=3,
                )
            )
        det = Detector.load(cfg, env / "bank")
        pipe = Pipeline(cfg, det, build_sinks(cfg.sinks, cfg.alerts, tmp_path / "out"))
        metrics = MetricsServer(pipe, 0).start()
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("s", pipe.run(duration_s=200, progress=False)))
        t.start()
        scraped = []
        try:

            def progressed():
                ok = (
                    pipe.sources[1].finished
                    and pipe.stats.camera("clip").alerts_opened >= 1
                    and pipe.sources[0].reconnects >= 2
                )
                return ok and (rtsp is None or pipe.stats.camera("cam").processed >= 10)

            def get(path):
                try:
                    with urllib.request.urlopen(metrics.url + path, timeout=10) as r:
                        return r.read().decode()
                except urllib.error.HTTPError as err:  # 503: the dead camera
                    return err.read().decode()

            def dead_unhealthy():
                body = get("/healthz")
                return body if json.loads(body)["cameras"]["dead"]["healthy"] is False else None

            wait_for(progressed, timeout=180, what="clip done, an alert, retries and RTSP frames")
            # The dead camera turns unhealthy health_timeout_s (1 s) after the start; without the RTSP
            # camera the condition above can hold sooner: wait for it instead of racing it.
            health = wait_for(
                dead_unhealthy, timeout=60, interval=0.1, what="/healthz to report the dead camera unhealthy"
            )
            scraped += [get("/metrics"), health]
        finally:
            pipe.stop()
            t.join(timeout=60)
            metrics.stop()
        assert scraped and "spade_frames_processed_total" in scraped[0]
        assert json.loads(scraped[1])["cameras"]["dead"]["healthy"] is False
        done.set()
        listener.join(timeout=5)
        summary = box["s"]
        assert summary.cameras["clip"]["processed"] == 64 and summary.sink_errors == {}
        if rtsp is not None:  # the camera really was opened with the injected credentials
            assert summary.cameras["cam"]["processed"] >= 10

        # everything Redis holds: streams, keys (status), and what went over pub/sub
        dump = []
        for key in admin.scan_iter("*"):
            kind = admin.type(key)
            if kind == "stream":
                dump += [json.dumps(f) for _, f in admin.xrange(key)]
            elif kind == "string" and key.endswith(":preview"):  # a JPEG: its bytes, searched as latin-1
                dump.append(f"{key} {srv.client().get(key).decode('latin-1')}")
            elif kind == "string":
                dump.append(f"{key} {admin.get(key)}")
            else:
                dump.append(key)
        assert any("spade:alerts" in d for d in admin.scan_iter("*"))
        assert admin.xlen("spade:clip:frames") == 64  # the ACL user wrote everything
        assert json.loads(admin.get("spade:dead:status"))["state"] == "offline"
        assert any('"type":"new"' in m.replace(" ", "") for m in got)
        outputs = {
            "logs": caplog.text,
            "jsonl": (tmp_path / "out" / "events.jsonl").read_text(),
            "redis": "\n".join(dump),
            "pubsub": "\n".join(got),
            "metrics+healthz": "\n".join(scraped),
            "status": "\n".join(f"{s.name} {s.state} {s.detail} {s.url} {s.error}" for s in pipe.sources),
            "summary": json.dumps(summary.cameras, default=str),
            "files": "\n".join(str(p) for p in (tmp_path / "out").rglob("*")),
            "spool": "\n".join(p.read_text(errors="replace") for p in (tmp_path / "spool").rglob("*") if p.is_file()),
        }
        for where, text in outputs.items():
            assert not leaks(text), f"secret found in {where}"
        assert "dead" in outputs["logs"] and "***" not in CAM_PW  # the logs did talk about the camera
    finally:
        srv.close()
        if rtsp is not None:
            rtsp.close()


def test_cli_run_stderr_has_no_secret(tmp_path_factory, tmp_path, clean_env):
    """A real `run_stream.py run -v` (DEBUG logging on stderr) with a camera whose credentials come from
    the secrets file and a password-protected Redis that refuses the wrong one; ended by SIGTERM once the
    clip is done and the camera was retried."""
    env = shared_env(tmp_path_factory)
    secrets = write_secrets(tmp_path / "s.env")
    import yaml

    cfg = base_cfg()
    tree = cfg.model_dump(mode="json")
    port = free_port()
    tree["sources"] = [
        {
            "name": "dead",
            "url": f"rtsp://127.0.0.1:{port}/x",
            "username_env": "CAM_USER",
            "password_env": "CAM_PW",
            "open_timeout_s": 1,
            "read_timeout_s": 1,
            "reconnect_base_s": 0.2,
            "reconnect_max_s": 0.5,
        },
        {"name": "clip", "url": str(env / "plain.mp4")},
    ]
    tree["sinks"]["redis"]["password_env"] = "CAM_PW"  # a wrong Redis password: refused, logged
    tree["sinks"]["jsonl"]["enabled"] = True  # the test sees the clip's frames while the run goes on
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tree))
    srv = RedisServer(password=REDIS_PW).start() if redis_available() else None
    stdout_path, stderr_path, events = tmp_path / "stdout", tmp_path / "stderr", tmp_path / "out" / "events.jsonl"
    try:
        args = [
            sys.executable,
            str(ROOT / "run_stream.py"),
            "run",
            "-v",
            "--config",
            str(tmp_path / "c.yaml"),
            "--bank",
            str(env / "bank"),
            "--out",
            str(tmp_path / "out"),
            "--secrets-file",
            str(secrets),
            "--duration",
            "180",
            "--no-progress",
        ]
        if srv is not None:
            args += ["--redis", srv.url_with_auth(password=REDIS_PW)]
        with open(stdout_path, "w") as out, open(stderr_path, "w") as err:
            proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=err, text=True)
        try:

            def clip_done_and_dead_retried():
                if proc.poll() is not None:
                    return True
                frames = 0
                if events.is_file():
                    for line in events.read_text().splitlines():
                        try:
                            r = json.loads(line)
                        except ValueError:  # a line being written
                            continue
                        frames += r.get("type") == "frame" and r.get("camera") == "clip"
                retried = any("dead: " in ln and "retrying in" in ln for ln in stderr_path.read_text().splitlines())
                return frames >= 30 and retried

            # the dead camera keeps the run going: wait for what is asserted below, then SIGTERM
            wait_for(
                clip_done_and_dead_retried,
                timeout=200,
                interval=0.2,
                what="the clip's 30 frames and a retry of the dead camera",
            )
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        if srv is not None:
            srv.close()
    r = subprocess.CompletedProcess(args, proc.returncode, stdout_path.read_text(), stderr_path.read_text())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dead" in r.stderr and "secrets file" in r.stderr  # it did log about the camera and the file
    assert not leaks(r.stderr + r.stdout), [ln for ln in r.stderr.splitlines() if leaks(ln)][:5]
    summary = json.loads(r.stdout)
    assert summary["cameras"]["clip"]["processed"] == 30 and summary["cameras"]["dead"]["reconnects"] >= 1

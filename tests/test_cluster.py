"""Many machines (app/cluster.py) on a real local Ray cluster: a head and one more node on 127.0.0.1
(`ray.cluster_utils.Cluster`, 1 CPU each, small object stores), a real redis-server.

- four file cameras over two workers: every frame of every camera reaches Redis, and the alerts are the
  ones a single process publishes for the same files;
- a node removed mid-run: its cameras run again on the other node within 30 s, their frames continue,
  no alert is duplicated, and their status goes offline ("worker W lost") -> online naming the new worker;
- `eval --cluster local` writes the same metrics.json as `eval`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from configs.schema import SourceConfig  # noqa: E402
from tests.helpers import base_cfg, wait_for  # noqa: E402
from tests.servers import RedisServer, redis_available  # noqa: E402

pytestmark = pytest.mark.skipif(not redis_available(), reason="redis-server not installed")

ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024
FILES = {"a": "clip.mp4", "b": "two.mp4", "c": "long_anomaly.mp4", "d": "plain.mp4"}
LENGTHS = {"a": 64, "b": 130, "c": 64, "d": 30}


@pytest.fixture(scope="module")
def redis_srv():
    with RedisServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "object_store_memory": 100 * MB},
    )
    node = c.add_node(num_cpus=1, object_store_memory=100 * MB)
    ray.init(address=c.address, log_to_driver=False, configure_logging=False)
    try:
        yield c, node
    finally:
        ray.shutdown()
        c.shutdown()


def _cfg(redis_url, prefix, env, loop=False, fps=None):
    cfg = base_cfg()
    cfg.sinks.redis.url = redis_url
    cfg.sinks.redis.prefix = prefix
    cfg.sources = [SourceConfig(name=n, url=str(env / f), loop=loop, fps=fps) for n, f in FILES.items()]
    return cfg


def _alerts(client, prefix):
    """Per camera, the alert messages in the stream, as (type, frame_index, regions)."""
    out: dict[str, list] = {}
    for _id, fields in client.xrange(f"{prefix}:alerts"):
        m = json.loads(fields[b"data"])
        out.setdefault(m["camera"], []).append((m["type"], m["frame_index"], m["regions"]))
    return out


def _frame_indices(client, prefix, cam):
    return [int(f[b"frame_index"]) for _id, f in client.xrange(f"{prefix}:{cam}:frames")]


@pytest.mark.slow
def test_four_cameras_two_workers_match_one_process(env, tmp_path, redis_srv, cluster):
    from app.cli import run_pipeline
    from app.cluster import ClusterRunner

    client = redis_srv.client()
    single = _cfg(redis_srv.url, "single", env)
    run_pipeline(single, env / "bank", tmp_path / "single", progress=False)

    cfg = _cfg(redis_srv.url, "spread", env)
    runner = ClusterRunner(cfg, env / "bank", tmp_path / "cluster", address=None, cpus_per_worker=1, poll_s=0.5)
    summary = runner.run()
    json.dumps(summary, allow_nan=False)
    assert summary["reason"] == "all sources ended"
    assert len(summary["workers"]) == 2 and summary["restarts"] == []
    assert sorted(c for w in summary["workers"].values() for c in w["cameras"]) == sorted(FILES)
    for cam, n in LENGTHS.items():
        assert _frame_indices(client, "spread", cam) == list(range(n)), cam
        assert summary["cameras"][cam]["frames"] == n
    one, many = _alerts(client, "single"), _alerts(client, "spread")
    assert one and set(one) >= {"a", "b", "c"}
    assert many == one


def _status_log(client, prefix):
    """Every status message published on <prefix>:*:status, recorded from now on (a thread)."""
    ps = client.pubsub(ignore_subscribe_messages=True)
    ps.psubscribe(f"{prefix}:*:status")
    got: list[dict] = []
    stop = threading.Event()

    def listen():
        while not stop.is_set():
            m = ps.get_message(timeout=0.2)
            if m and m["type"] == "pmessage":
                got.append(json.loads(m["data"]))

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    return got, stop


@pytest.mark.slow
def test_node_loss_moves_its_cameras(env, tmp_path, redis_srv, cluster):
    """Must run last in this module: it removes the second node."""
    from app.cluster import ClusterRunner

    c, node = cluster
    client = redis_srv.client()
    prefix = "loss"
    statuses, stop_log = _status_log(client, prefix)
    cfg = _cfg(redis_srv.url, prefix, env, loop=True, fps=8)
    runner = ClusterRunner(
        cfg,
        env / "bank",
        tmp_path,
        address=None,
        cpus_per_worker=1,
        poll_s=0.5,
        deadline_s=5.0,
        place_timeout_s=3.0,
        metrics_port=0,
    )
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("s", runner.run()), daemon=True)
    t.start()
    try:
        wait_for(lambda: all(client.xlen(f"{prefix}:{n}:frames") > 5 for n in FILES), 120, 0.2, "every camera's frames")
        wait_for(
            lambda: len(runner.workers) == 2 and all(w.node_id for w in runner.workers.values()),
            30,
            0.2,
            "two placed workers",
        )
        import urllib.error
        import urllib.request

        doc = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{runner.http_port}/workers").read())
        assert set(doc["workers"]) == {"w0", "w1"}
        wait_for(lambda: all(w.status.get("metrics") for w in runner.workers.values()), 30, 0.2, "worker metrics")
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{runner.http_port}/targets").read())
        assert {t["labels"]["worker"] for t in targets} == {"w0", "w1"}
        for tgt in targets:  # every worker's own Prometheus endpoint answers
            body = urllib.request.urlopen(f"http://{tgt['targets'][0]}/metrics").read().decode()
            assert "spade_frames_processed_total" in body
        lost = next(w for w in runner.workers.values() if w.node_id == node.node_id)
        moved = list(lost.cameras)
        last = {n: client.xrevrange(f"{prefix}:{n}:frames", count=1)[0][0] for n in moved}
        c.remove_node(node)
        t0 = time.monotonic()

        def resumed():
            return all(
                (client.xrevrange(f"{prefix}:{n}:frames", count=1) or [[b"0-0"]])[0][0] != last[n]
                and any(s["camera"] == n and s["state"] == "online" and lost.id not in s["detail"] for s in statuses)
                for n in moved
            )

        wait_for(resumed, 60, 0.2, "the lost node's cameras to resume")
        took = time.monotonic() - t0
        assert took <= 30, took
        print(f"cameras {moved} resumed {took:.1f} s after the node was removed; {runner.restarts}")

        def healthz():
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{runner.http_port}/healthz").status
            except urllib.error.HTTPError as err:
                return err.code

        wait_for(lambda: healthz() == 200, 30, 0.2, "the driver's /healthz to say ok")
        # a node joins again; an operator asks for a rebalance on the command channel
        c.add_node(num_cpus=1, object_store_memory=100 * MB)
        wait_for(lambda: runner.capacity() == 2, 30, 0.2, "the new node's CPU")
        client.publish(f"{prefix}:cluster:commands", "rebalance")
        wait_for(
            lambda: (
                runner.rebalances == 1
                and len(runner.workers) == 2
                and all(w.status.get("state") == "running" for w in runner.workers.values())
            ),
            60,
            0.2,
            "two running workers after the rebalance",
        )
        time.sleep(2.0)
    finally:
        runner.stop()
        t.join(90)
        stop_log.set()
    summary = box["s"]
    json.dumps(summary, allow_nan=False)
    assert summary["restarts"] and summary["restarts"][0]["lost"] == [lost.id]
    assert sorted(summary["restarts"][0]["cameras"]) == sorted(moved)
    for n in moved:  # offline naming the lost worker, then online naming the new one
        seq = [s for s in statuses if s["camera"] == n]
        i = next(i for i, s in enumerate(seq) if s["state"] == "offline" and f"worker {lost.id} lost" in s["detail"])
        assert any(
            s["state"] == "online" and "(worker w" in s["detail"] and lost.id not in s["detail"] for s in seq[i + 1 :]
        ), seq
    news = [
        json.loads(f[b"data"])["alert_id"]
        for _id, f in client.xrange(f"{prefix}:alerts")
        if json.loads(f[b"data"])["type"] == "new"
    ]
    assert len(news) == len(set(news)) and news
    keys = [
        (m["alert_id"], m["type"], m["frame_index"])
        for m in (json.loads(f[b"data"]) for _id, f in client.xrange(f"{prefix}:alerts"))
    ]
    assert len(keys) == len(set(keys))
    for n in FILES:  # frames of every camera kept coming in
        assert summary["cameras"][n]["frames"] > 0


def test_cluster_needs_redis(env, tmp_path, capsys):
    from app.cli import main

    rc = main(
        [
            "run",
            "--bank",
            str(env / "bank"),
            "--source",
            f"a={env / 'clip.mp4'}",
            "--cluster",
            "local",
            "--out",
            str(tmp_path),
            "--quiet",
        ]
    )
    assert rc == 2
    assert "error: --cluster needs a Redis URL" in capsys.readouterr().err


def test_plan_balances_cost_and_keeps_banks_together():
    from app.cluster import CameraCost, plan

    cams = [CameraCost(f"c{i}", "b", cost) for i, cost in enumerate([5, 4, 3, 3, 2, 1])]
    shards = plan(cams, 2)
    loads = sorted(sum(c.cost for c in cams if c.name in s) for s in shards)
    assert loads == [9, 9]
    two = [CameraCost("x1", "bx", 1), CameraCost("x2", "bx", 1), CameraCost("y1", "by", 5)]
    assert sorted(map(sorted, plan(two, 2))) == [["x1", "x2"], ["y1"]]
    assert plan(two, 5) and len(plan(two, 5)) == 3  # never more workers than cameras
    many = [CameraCost(f"g{i}", f"bank{i % 3}", 1) for i in range(9)]
    for s in plan(many, 3):  # as many banks as workers: each bank on one worker
        assert len({int(n[1:]) % 3 for n in s}) == 1


EVAL_CFG = """\
detector: {backbone: {name: efficientnet_lite0}, input_size: 128, grid: 16, batch_size: 8, smooth_window: 3,
           gallery: knn}
bank: {holdout: 0.25, max_frames: null}
"""


@pytest.mark.slow
def test_eval_cluster_equals_eval(tmp_path):
    """Two scenes (a bank each), their test videos spread over Ray tasks (`eval --cluster local`, a Ray of
    its own in a subprocess): the same metrics.json as `eval` in one process."""
    import configs
    from detector.fit import fit_bank
    from evaluation.run import evaluate
    from stream.synthetic import generate_stc

    data, cfg_path, bank = tmp_path / "data", tmp_path / "eval.yaml", tmp_path / "bank"
    cfg_path.write_text(EVAL_CFG)
    for cam in (0, 1):
        generate_stc(
            data, seed=0, camera=cam, size=(160, 120), train_videos=1, train_frames=64, test_videos=2, test_frames=40
        )
    cfg = configs.load(str(cfg_path))
    fit_bank(cfg, data, bank, progress=False)
    one = evaluate(cfg, data, bank, tmp_path / "one", progress=False, plots=False)
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "run_stream.py"),
            "eval",
            "--config",
            str(cfg_path),
            "--data",
            str(data),
            "--bank",
            str(bank),
            "--out",
            str(tmp_path / "many"),
            "--quiet",
            "--cluster",
            "local",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},  # set by the cluster fixture's ray.init
    )
    assert p.returncode == 0, p.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    many = json.loads((tmp_path / "many" / "metrics.json").read_text())
    assert one["n_videos"] == 4 and isinstance(one["threshold"], dict) and len(one["threshold"]) == 2
    for key in ("frame_auroc_micro", "frame_auroc_macro", "pixel_auroc"):
        assert many[key] == pytest.approx(one[key], abs=1e-9), key
    assert many["per_video"] == one["per_video"]
    one.pop("fps"), many.pop("fps")
    assert many == one

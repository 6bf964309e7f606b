"""Smoke test of the benchmark harness: bench_pipeline.py --quick on a tiny config, in a subprocess.

Checks that the JSON has every key the tracker asks for, with positive values; no timing assertions.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY = """\
detector:
  backbone: {name: resnet18, weights: random}
  input_size: 64
  grid: 8
  batch_size: 8
pipeline:
  max_batch: 8
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_pipeline_quick(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    out = tmp_path / "bench.json"
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_pipeline.py"),
        "--quick",
        "--config",
        str(cfg),
        "--frames",
        "8",
        "--train-frames",
        "12",
        "--size",
        "192x128",
        "--repeats",
        "1",
        "--workdir",
        str(tmp_path / "work"),
        "--json",
        str(out),
    ]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=280)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    for key in ("decode_fps", "backbone_fps", "scoring_fps", "e2e_fps", "e2e_ratio", "peak_rss_mb"):
        assert isinstance(r[key], (int, float)) and r[key] > 0, (key, r.get(key))
    for stage in ("decode", "preprocess", "backbone", "knn", "post", "regions", "sinks"):
        assert r["stage_ms"][stage] > 0, stage
    assert set(r["multi_camera"]) == {"1", "2", "4"}
    assert all(v > 0 for v in r["multi_camera"].values())
    assert r["pipeline_stage_ms"]["detector"] > 0
    for key in ("config", "torch_threads", "device", "git_commit", "date"):
        assert key in r, key
    assert r["frames"] == 8 and r["backbone"] == "resnet18"
    assert "bench_pipeline:" in p.stdout  # the table


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_gpu_check_self_check_on_cpu(tmp_path):
    """gpu_check.py with --device cpu compares the CPU path with itself: the harness runs end to end here
    (the real comparison needs a GPU) and must report zero error and full neighbour agreement."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    out = tmp_path / "check.json"
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "gpu_check.py"),
        "--device",
        "cpu",
        "--config",
        str(cfg),
        "--frames",
        "6",
        "--clip-frames",
        "8",
        "--train-frames",
        "12",
        "--size",
        "192x128",
        "--workdir",
        str(tmp_path / "work"),
        "--json",
        str(out),
    ]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=280)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["precision"] for r in rows] == ["fp32", "bf16"]
    for r in rows:
        assert r["frames"] == 6 and r["passed"] is True
        assert r["map_rel_l2_max"] == 0.0 and r["top1_agreement"] == 1.0 and r["flipped_top2_gaps"] == []
    assert "gpu_check: passed" in p.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_per_scene_benchmark_runs(tmp_path):
    """per_scene.py on two small generated scenes (no Avenue): both modes fitted and evaluated, one row each,
    every scene's AUROCs reported."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    out = tmp_path / "per_scene.json"
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "per_scene.py"),
        "--avenue",
        str(tmp_path / "absent"),
        "--synthetic-scenes",
        "2",
        "--train-frames",
        "24",
        "--test-frames",
        "36",
        "--config",
        str(cfg),
        "--out",
        str(tmp_path / "work"),
        "--json",
        str(out),
    ]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=280)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert [row["mode"] for row in r["rows"]] == ["per_scene", "pooled"] and set(r["scenes"]) == {"01", "02"}
    for row in r["rows"]:
        assert set(row["scenes"]) == {"01", "02"} and 0.0 <= row["frame_auroc_micro"] <= 1.0
    assert (tmp_path / "work" / "bank_per_scene" / "scene_02" / "meta.json").is_file()
    assert (tmp_path / "work" / "bank_pooled" / "meta.json").is_file()
    assert "| per_scene |" in p.stdout and "| pooled |" in p.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_frame_evidence_benchmark_matches_eval(tmp_path):
    """frame_evidence.py on a small generated set: its `product` row is what `run_stream.py eval` reports for
    the same bank, its recomputed baseline agrees with it, and every requested variant gives a row."""
    from stream.synthetic import generate_stc

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    data = tmp_path / "set"
    generate_stc(data, seed=0, train_frames=40, test_frames=48)
    out = tmp_path / "fe.json"
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
    variants = ",".join(
        [
            "product",
            "baseline",
            "kappa_2",
            "local_scale_sqrt_ratio",
            "motion_novelty",
            "moving_embedding",
            "semantic_moving_0.5",
            "semantic_moving_z",
            "border_cell",
        ]
    )
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "frame_evidence.py"),
        "--data",
        str(data),
        "--config",
        str(cfg),
        "--work",
        str(tmp_path / "work"),
        "--variants",
        variants,
        "--json",
        str(out),
    ]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=280)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    rows = {row["variant"]: row for row in r["rows"]}
    assert list(rows) == variants.split(",")
    for row in rows.values():
        assert 0.0 <= row["frame_micro"] <= 1.0
    assert rows["baseline"]["pixel"] is not None and rows["product"]["pixel"] is None
    assert abs(rows["baseline"]["frame_micro"] - rows["product"]["frame_micro"]) < 0.03
    ev = subprocess.run(
        [
            sys.executable,
            str(ROOT / "run_stream.py"),
            "eval",
            "--config",
            str(cfg),
            "--data",
            str(data),
            "--bank",
            r["bank"],
            "--out",
            str(tmp_path / "eval"),
            "--quiet",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=200,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert rows["product"]["frame_micro"] == pytest.approx(m["frame_auroc_micro"], abs=1e-3)
    assert rows["baseline"]["pixel"] == pytest.approx(m["pixel_auroc"], abs=0.01)

"""Bad input ends with exit code 2 and one clear line naming the file, never a bare traceback."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

CFG = """
detector:
  backbone: {name: resnet18, weights: random}
  input_size: 64
  grid: 8
bank: {holdout: 0.0}
"""


def run(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, str(ROOT / "run_stream.py"), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_one_clear_line(r, *needles):
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) >= 1, r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def cfg(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(CFG)
    return p


def test_missing_data_folder(tmp_path, cfg):
    r = run("fit", "--config", cfg, "--data", tmp_path / "nope", "--bank", tmp_path / "b", "--quiet")
    assert_one_clear_line(r, str(tmp_path / "nope"), "not found")


def test_empty_data_folder(tmp_path, cfg):
    (tmp_path / "empty").mkdir()
    r = run("fit", "--config", cfg, "--data", tmp_path / "empty", "--bank", tmp_path / "b", "--quiet")
    assert_one_clear_line(r, str(tmp_path / "empty"), "no videos")


def test_unreadable_video(tmp_path, cfg):
    d = tmp_path / "vids"
    d.mkdir()
    (d / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    r = run("fit", "--config", cfg, "--data", d, "--bank", tmp_path / "b", "--quiet")
    assert_one_clear_line(r, "broken.mp4")


def test_label_length_mismatch(tmp_path, cfg):
    import cv2

    root = tmp_path / "stc"
    (root / "testing" / "frames" / "v1").mkdir(parents=True)
    (root / "testing" / "test_frame_mask").mkdir(parents=True)
    for i in range(5):
        cv2.imwrite(str(root / "testing" / "frames" / "v1" / f"{i:03d}.jpg"), np.zeros((32, 32, 3), np.uint8))
    np.save(root / "testing" / "test_frame_mask" / "v1.npy", np.zeros(7, np.uint8))
    (tmp_path / "bank").mkdir()
    r = run("eval", "--config", cfg, "--data", root, "--bank", tmp_path / "bank", "--out", tmp_path / "o", "--quiet")
    assert_one_clear_line(r, "v1.npy", "7 labels for 5 frames")


def test_bad_config_field(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("detector:\n  k_image: 0\n  colour: red\n")
    r = run("fit", "--config", p, "--data", tmp_path, "--bank", tmp_path / "b")
    assert r.returncode == 2
    errs = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert any("detector.k_image" in e for e in errs) and any("detector.colour" in e for e in errs)
    assert "Traceback" not in r.stderr


def test_missing_bank(tmp_path, cfg):
    root = tmp_path / "stc"
    (root / "testing" / "frames" / "v1").mkdir(parents=True)
    r = run("eval", "--config", cfg, "--data", root, "--bank", tmp_path / "nobank", "--out", tmp_path / "o")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_synth_writes_stc_layout_and_rejects_bad_size(tmp_path):
    r = run("synth", "--out", tmp_path / "s", "--train-frames", "24", "--test-frames", "24", "--test-videos", "1")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "s" / "testing" / "frames").iterdir())) == 1
    assert len(list((tmp_path / "s" / "training" / "videos").glob("*.avi"))) == 2
    r = run("synth", "--out", tmp_path / "t", "--size", "big")
    assert_one_clear_line(r, "--size")

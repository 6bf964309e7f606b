"""What a new user meets first (issue 16): backbone weights found on disk or named exactly, never
downloaded; environment overrides blamed by variable name; red reserved for anomalous frames in the
annotated video; no alarming faiss loader lines in `fit`."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import run_stream
from configs.errors import UserError
from configs.schema import BackboneConfig, VideoSinkConfig
from detector.result import FrameResult, Region
from sinks import annotate
from sinks.annotate import Annotator, annotate_frame
from sinks.snapshots import SnapshotWriter
from sinks.video import VideoSink
from stream.frame import Frame

ROOT = Path(__file__).resolve().parents[1]


# -- item 3: torchvision weights: the hub cache on disk only -----------------------------------------
@pytest.fixture
def no_network(monkeypatch):
    """Every way torch / torchvision could download records the attempt and fails."""
    import torch.hub
    import torchvision.models._api as tv_api

    calls = []

    def refuse(*args, **kwargs):
        calls.append(args[:1])
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", refuse, raising=False)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return calls


@pytest.mark.parametrize("name", ["wide_resnet50_2", "resnet18"])
def test_missing_torchvision_weights_fail_at_once_naming_the_path(tmp_path, monkeypatch, no_network, name):
    import torchvision.models as tvm

    from detector.backbone import FeatureExtractor

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    enum = {"resnet18": tvm.ResNet18_Weights, "wide_resnet50_2": tvm.Wide_ResNet50_2_Weights}[name]
    file_name = Path(enum.IMAGENET1K_V1.url).name
    expected = tmp_path / "th" / "hub" / "checkpoints" / file_name
    t0 = time.monotonic()
    with pytest.raises(UserError) as info:
        FeatureExtractor(BackboneConfig(name=name), grid=8)
    elapsed = time.monotonic() - t0
    msg = str(info.value)
    assert no_network == [], "a download was attempted"
    assert len(msg.splitlines()) == 1, msg
    assert str(expected) in msg and file_name in msg
    assert f"detector.backbone.weights: /path/to/{file_name}" in msg
    assert "download" in msg  # says it never downloads, and where to fetch it by hand
    assert elapsed < 5.0, f"took {elapsed:.1f} s to report a missing file"


def test_torchvision_weights_are_read_from_the_hub_cache(tmp_path, monkeypatch, no_network):
    import torchvision.models as tvm

    from detector.backbone import FeatureExtractor

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    path = tmp_path / "th" / "hub" / "checkpoints" / Path(tvm.ResNet18_Weights.IMAGENET1K_V1.url).name
    path.parent.mkdir(parents=True)
    torch.save(tvm.resnet18(weights=None).state_dict(), path)
    fe = FeatureExtractor(BackboneConfig(name="resnet18"), grid=8)
    assert fe.weights_origin == str(path) and no_network == []


def test_readme_names_torchvision_weights_files():
    import torchvision.models as tvm

    readme = (ROOT / "README.md").read_text()
    for enum in (tvm.Wide_ResNet50_2_Weights, tvm.ResNet18_Weights):
        assert Path(enum.IMAGENET1K_V1.url).name in readme
    assert "9ba9bcbe" not in readme


# -- item 8: environment overrides name the variable -------------------------------------------------
def _errors(capsys, argv):
    rc = run_stream.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


def test_unknown_env_setting_names_the_variable_and_suggests(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPADE__DETECTOR__K_IMGAE", "5")
    lines = _errors(capsys, ["fit", "--data", str(tmp_path), "--bank", str(tmp_path / "b"), "--quiet"])
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: environment variable SPADE__DETECTOR__K_IMGAE: detector.k_imgae"), lines
    assert "did you mean detector.k_image?" in lines[0]
    assert "default.yaml" not in lines[0]


def test_bad_env_value_names_the_variable_bad_yaml_value_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPADE__DETECTOR__K_IMAGE", "abc")
    lines = _errors(capsys, ["fit", "--data", str(tmp_path), "--bank", str(tmp_path / "b"), "--quiet"])
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: environment variable SPADE__DETECTOR__K_IMAGE: detector.k_image:"), lines
    assert "'abc'" in lines[0] and "default.yaml" not in lines[0]

    monkeypatch.delenv("SPADE__DETECTOR__K_IMAGE")
    monkeypatch.setenv("SPADE__DETECTOR__GRID", "0")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("detector:\n  k_image: abc\n  colour: red\n")
    lines = _errors(
        capsys, ["fit", "--config", str(cfg), "--data", str(tmp_path), "--bank", str(tmp_path / "b"), "--quiet"]
    )
    by_field = {f: [ln for ln in lines if f in ln] for f in ("detector.k_image", "detector.colour", "detector.grid")}
    assert all(len(v) == 1 for v in by_field.values()), lines
    assert by_field["detector.k_image"][0].startswith(f"error: {cfg}: detector.k_image:")
    assert by_field["detector.colour"][0].startswith(f"error: {cfg}: detector.colour is not a setting")
    assert by_field["detector.grid"][0].startswith("error: environment variable SPADE__DETECTOR__GRID: ")


# -- item 11: red only on anomalous frames -----------------------------------------------------------
FW, FH = 240, 180
NORMAL_BOX = Region(20, 50, 100, 150, 1.4, 1.2, 4000)
ANOMALY_BOX = Region(140, 50, 220, 150, 3.0, 2.0, 4000)


def _result(score, regions, amap=None, pixel_threshold=1.0, threshold=1.0):
    amap = np.zeros((256, 256), np.float32) if amap is None else amap
    return FrameResult(
        "cam", 0, 100.0, score, threshold, amap, list(regions), (FW, FH), pixel_threshold=pixel_threshold
    )


def _red(px: np.ndarray) -> np.ndarray:
    px = px.astype(int)
    return (px[..., 0] >= 180) & (px[..., 1] <= 90) & (px[..., 2] <= 90)


def _edges(img: np.ndarray, r: Region) -> np.ndarray:
    """The pixels on a region box's outline (as drawn: x2/y2 exclusive)."""
    x1, y1, x2, y2 = r.x1, r.y1, r.x2 - 1, r.y2 - 1
    return np.concatenate([img[y1, x1 : x2 + 1], img[y2, x1 : x2 + 1], img[y1 : y2 + 1, x1], img[y1 : y2 + 1, x2]])


def test_regions_of_a_normal_frame_are_not_red_those_of_an_anomalous_frame_are():
    image = np.full((FH, FW, 3), 90, np.uint8)
    normal = annotate_frame(image, _result(0.5, [NORMAL_BOX]))
    anomalous = annotate_frame(image, _result(2.0, [ANOMALY_BOX]))

    assert not _red(normal).any(), "a frame under its threshold shows red"
    edge = _edges(normal, NORMAL_BOX)
    assert (edge == annotate.GREY).all(-1).sum() > 0.3 * len(edge)  # drawn, faint (dashed) and neutral
    assert (edge == 90).all(-1).sum() > 0.2 * len(edge)  # the gaps of the dashes

    edge = _edges(anomalous, ANOMALY_BOX)
    assert _red(edge).mean() > 0.9, "an anomalous frame's region is not boxed in red"
    assert _red(anomalous[: ANOMALY_BOX.y1 - 1, ANOMALY_BOX.x1 :]).sum() > 100  # the label's red tag


def test_one_frame_boxes_only_when_anomalous_and_hidden_mode_draws_nothing():
    image = np.full((FH, FW, 3), 90, np.uint8)
    both = [NORMAL_BOX, ANOMALY_BOX]
    normal = annotate_frame(image, _result(0.5, both))
    assert not _red(normal).any()
    hidden = annotate_frame(image, _result(0.5, both), normal_regions="hidden")
    bar = 30  # the status bar at the top
    assert np.array_equal(hidden[bar:], image[bar:])
    anomalous = annotate_frame(image, _result(2.0, both), normal_regions="hidden")
    assert _red(_edges(anomalous, NORMAL_BOX)).mean() > 0.9 and _red(_edges(anomalous, ANOMALY_BOX)).mean() > 0.9


def test_heat_map_is_drawn_and_scaled_by_the_frames_pixel_threshold():
    image = np.full((FH, FW, 3), 90, np.uint8)
    amap = np.zeros((256, 256), np.float32)
    amap[100:160, 100:160] = 1.5
    inside = (slice(int(FH * 110 / 256), int(FH * 150 / 256)), slice(int(FW * 110 / 256), int(FW * 150 / 256)))
    tinted = annotate_frame(image, _result(2.0, [], amap, pixel_threshold=1.0))
    assert np.abs(tinted[inside].astype(int) - 90).max() > 10  # 1.5 = 1.5 x threshold: coloured
    calm = annotate_frame(image, _result(2.0, [], amap, pixel_threshold=2.0))
    assert np.array_equal(calm[inside], image[inside])  # under 0.8 x threshold: transparent
    assert np.array_equal(annotate_frame(image, _result(0.5, [], amap), normal_regions="hidden")[40:], image[40:])


def test_video_sink_option_reaches_the_annotator_and_is_validated(tmp_path):
    assert VideoSinkConfig().normal_regions == "faint"
    sink = VideoSink(VideoSinkConfig(dir=str(tmp_path), normal_regions="hidden"), fps_hint=10)
    assert sink.annotator.normal_regions == "hidden"
    sink.close()
    with pytest.raises(Exception):
        VideoSinkConfig(normal_regions="red")
    with pytest.raises(Exception):
        VideoSinkConfig(normal_region="hidden")  # unknown keys still refused
    image = np.full((FH, FW, 3), 90, np.uint8)
    out = Annotator(normal_regions="hidden").annotate(Frame("cam", 0, 100.0, image), _result(0.5, [NORMAL_BOX]))
    assert not (out == annotate.GREY).all(-1)[40 : FH - 40].any()


def test_snapshot_of_a_normal_frame_has_no_red_box(tmp_path):
    image = np.full((FH, FW, 3), 90, np.uint8)
    path = SnapshotWriter(tmp_path).save("cam", "a1", Frame("cam", 0, 100.0, image), _result(0.5, [NORMAL_BOX]))
    snap = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
    assert not _red(snap).any()


# -- item 12: no faiss loader noise in fit (faiss has since gone: benchmarks/knn_faiss.py) ------------
def test_fit_does_not_log_faiss_loader_failures(tmp_path):
    data = tmp_path / "imgs"
    data.mkdir()
    rng = np.random.default_rng(0)
    base = rng.integers(40, 200, (48, 64, 3), dtype=np.uint8)
    for i in range(8):
        img = np.clip(base.astype(int) + rng.integers(-5, 6, base.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(data / f"{i:03d}.png"), img)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "detector:\n  backbone: {name: resnet18, weights: random}\n  input_size: 64\n  grid: 8\n"
        "  gallery: knn\n  frame_score: map_max\n  smooth_window: 1\nbank: {holdout: 0.0}\n"
    )
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "run_stream.py"),
            "fit",
            "--config",
            str(cfg),
            "--data",
            str(data),
            "--bank",
            str(tmp_path / "bank"),
            "--quiet",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "bank" / "global.faiss").exists()  # never read, no longer written
    out = r.stdout + r.stderr
    assert "Could not load library" not in out and "faiss.loader" not in out, out

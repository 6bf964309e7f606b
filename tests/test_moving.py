"""The moving_max frame score: appearance evidence weighted by where things move, against the camera's
flow noise floor measured at fit."""

import numpy as np
import pytest
import torch

import configs
from configs.errors import UserError
from detector.motion import FLOW_NOISE_FLOOR, MovingGate, flow_noise, frame_flow_medians
from tests.test_motion import scene

G = 8
SIZE = 64


def cells(mags: dict[tuple[int, int], float], n: int = 1) -> np.ndarray:
    c = np.zeros((n, G, G, 3), np.float32)
    for (y, x), m in mags.items():
        c[:, y, x] = [m, 0.0, m]
    return c


def test_gate_weights_static_moving_linear_and_dilated():
    gate = MovingGate(noise=0.1, noise_factor=2.0, static_weight=0.5, dilate=1, size=G, device=torch.device("cpu"))
    w = gate(cells({(4, 4): 1.0, (0, 7): 0.1}))[0].numpy()  # at grid size: no interpolation
    assert w.shape == (G, G)
    assert w[4, 4] == pytest.approx(1.0) and w[3, 5] == pytest.approx(1.0)  # moving, and one cell away
    assert w[4, 6] == pytest.approx(0.5) and w[7, 0] == pytest.approx(0.5)  # two cells away: static
    assert w[0, 7] == pytest.approx(0.5 + 0.5 * 0.1 / 0.2)  # half the moving threshold: halfway
    off = MovingGate(0.1, 2.0, static_weight=1.0, dilate=0, size=G, device=torch.device("cpu"))
    assert (off(cells({(4, 4): 5.0}))[0] == 1).all()  # static_weight 1: the gate is off
    up = MovingGate(0.1, 2.0, 0.0, dilate=1, size=4 * G, device=torch.device("cpu"))(cells({(4, 4): 5.0}))
    assert up.shape == (1, 4 * G, 4 * G) and float(up.max()) == pytest.approx(1.0) and float(up.min()) == 0.0


def test_noise_floor_is_the_median_of_frame_medians():
    static = cells({}, n=3) + 0.02
    static[..., :2] = 0
    busy = cells({(y, x): 3.0 for y in range(3) for x in range(G)}, n=2) + 0.02  # 3 of 8 rows move
    med = frame_flow_medians(np.concatenate([static, busy]))
    assert med.shape == (5,) and np.allclose(med, 0.02)  # movers in a minority of cells do not shift it
    assert flow_noise(med) == pytest.approx(0.02)
    assert flow_noise(np.zeros(4)) == FLOW_NOISE_FLOOR  # a noiseless camera: the floor, not 0
    assert flow_noise(np.zeros(0)) == FLOW_NOISE_FLOOR


def test_config_moving_max_needs_flow_not_the_motion_model():
    d = configs.parse({"detector": {"frame_score": "moving_max"}}).detector
    assert d.needs_flow and not d.motion.enabled
    assert configs.parse({}).detector.needs_flow  # the default frame score
    assert not configs.parse({"detector": {"frame_score": "map_max"}}).detector.needs_flow
    d = configs.parse({"detector": {"frame_score": "combined", "combine": ["topq", "moving_max"]}}).detector
    assert d.needs_flow and d.components_used() == {"topq", "moving_max"}
    with pytest.raises(UserError, match="static_weight"):
        configs.parse({"detector": {"moving": {"static_weight": 1.5}}})


def small_cfg(**det):
    tree = {
        "detector": {
            "backbone": {"name": "resnet18", "weights": "random"},
            "input_size": SIZE,
            "grid": G,
            "batch_size": 4,
            "motion": {"flow_size": SIZE, "preset": "medium"},
            **det,
        },
        "bank": {"holdout": 0.25, "max_frames": None},
    }
    return configs.parse(tree)


@pytest.fixture(scope="module")
def footage(tmp_path_factory):
    """Normal footage: a square moving right at 3 px/frame along one row over a static background."""
    import cv2

    root = tmp_path_factory.mktemp("moving")
    d = root / "normal" / "cam"
    d.mkdir(parents=True)
    for i in range(24):
        cv2.imwrite(str(d / f"{i:03d}.png"), cv2.cvtColor(scene(4 + 3 * (i % 14)), cv2.COLOR_RGB2BGR))
    return root


@pytest.fixture(scope="module")
def moving_bank(footage):
    from detector.fit import fit_bank

    cfg = small_cfg(frame_score="moving_max")
    meta = fit_bank(cfg, footage / "normal", footage / "bank_moving", progress=False)
    return cfg, footage / "bank_moving", meta


def novel(img: np.ndarray, x: int, y: int = 44) -> np.ndarray:
    """`img` with a bright unseen 10x10 checkerboard patch at (x, y), below the square's row."""
    out = img.copy()
    chk = (np.indices((10, 10)).sum(0) % 2 * 255).astype(np.uint8)
    out[y : y + 10, x : x + 10] = chk[:, :, None]
    return out


def results_of(det, frames):
    """The live path's results of a batch, every frame component computed."""
    return det.score_batch(frames, all_components=True).results()


def components_of(det, images, camera_id):
    """The offline path's frame components of consecutive images of one camera (eval's way)."""
    from evaluation.run import score_video_batch

    return score_video_batch(det, camera_id, images, None)[1]


def test_fit_measures_noise_floor_and_calibrates_moving_max(moving_bank):
    from detector.detector import Detector

    cfg, bank, meta = moving_bank
    cal = meta["calibration"]
    assert FLOW_NOISE_FLOOR <= cal["flow_noise"] < 0.2  # a static background: noise, not the square's 3 px
    assert "moving_max" in cal["holdout_components"] and "moving" in cal["scoring"]
    det = Detector.load(cfg, bank)
    assert det.moving_gate is not None and det.bank.motion_model is None  # flow without the motion model
    assert np.isfinite(det.thresholds.frame)


def test_novel_appearance_counts_fully_only_where_it_moves(moving_bank):
    from detector.detector import Detector

    cfg, bank, _ = moving_bank
    det = Detector.load(cfg, bank)
    bg = scene(40)  # the normal square parked at the right edge
    still = components_of(det, [novel(bg, 8), novel(bg, 8)], camera_id="still")
    moved = components_of(det, [novel(bg, 8), novel(bg, 14)], camera_id="moved")
    # the same unseen patch: equal appearance evidence, but only the moving one keeps its full weight
    assert moved["map_max"][1] == pytest.approx(still["map_max"][1], rel=0.2)
    assert still["moving_max"][1] == pytest.approx(0.5 * still["map_max"][1], rel=0.05)
    assert moved["moving_max"][1] > 0.9 * moved["map_max"][1]
    # first frame of a camera: no flow yet, everything counts as static
    assert still["moving_max"][0] == pytest.approx(0.5 * still["map_max"][0], rel=1e-4)


def test_bank_without_noise_floor_is_refused_by_name(footage):
    from detector.detector import Detector
    from detector.fit import fit_bank

    plain = small_cfg(frame_score="map_max")
    fit_bank(plain, footage / "normal", footage / "bank_plain", progress=False)
    with pytest.raises(UserError, match=r"bank_plain.*moving_max.*fit it again"):
        Detector.load(small_cfg(frame_score="moving_max"), footage / "bank_plain")


def test_scoring_settings_unchanged_without_moving_max():
    from detector.thresholds import scoring_settings

    assert "moving" not in scoring_settings(configs.parse({"detector": {"frame_score": "map_max"}}))
    assert scoring_settings(small_cfg(frame_score="moving_max"))["moving"]["static_weight"] == 0.5


def test_bank_without_holdout_still_measures_noise_floor(footage):
    from detector.detector import Detector
    from detector.fit import fit_bank

    cfg = small_cfg(frame_score="moving_max")
    cfg.bank.holdout = 0.0
    meta = fit_bank(cfg, footage / "normal", footage / "bank_nohold", progress=False)
    assert set(meta["calibration"]) == {"flow_noise"}  # bank frames give it; thresholds come from the config
    det = Detector.load(cfg, footage / "bank_nohold")
    assert det.moving_gate is not None and det.thresholds.frame == float("inf")


# -- flow on the source threads ---------------------------------------------------------------------------


def test_flow_tracker_follows_one_source_and_resets():
    from detector.motion import FlowExtractor, FlowTracker

    a, b, c = scene(20), scene(23), scene(26)
    tr = FlowTracker(FlowExtractor(SIZE, G, "medium"))
    ref = FlowExtractor(SIZE, G, "medium")
    assert (tr(a) == 0).all()  # first frame: nothing to compare with
    np.testing.assert_array_equal(tr(b), ref(ref.gray(a), ref.gray(b)))
    tr.reset()
    assert (tr(c) == 0).all()  # a new connection: no flow across the gap


def test_source_computes_flow_on_its_thread_and_resets_each_pass(env):
    from configs.schema import SourceConfig
    from detector.motion import FlowExtractor, FlowTracker
    from stream.sources import Source

    size = 64
    src = Source(
        SourceConfig(name="cam", url=str(env / "plain.mp4"), loop=True),
        prepare=lambda p: p.scaled(size),
        flow=FlowTracker(FlowExtractor(size, G, "medium")),
    )
    src.start()
    got = [src.read(timeout=10.0) for _ in range(34)]
    src.stop()
    assert all(f is not None and f.flow is not None and f.flow.shape == (G, G, 3) for f in got)
    ref = FlowExtractor(size, G, "medium")
    np.testing.assert_array_equal(got[5].flow, ref(ref.gray(got[4].small), ref.gray(got[5].small)))
    assert np.abs(got[29].flow).max() > 0  # sensor noise: small but not zero
    assert (got[0].flow == 0).all() and (got[30].flow == 0).all()  # plain.mp4 has 30 frames: pass 2 starts


def test_detector_uses_the_sources_flow_like_its_own(moving_bank):
    from detector.detector import Detector
    from detector.motion import FlowTracker
    from stream.frame import Frame

    cfg, bank, _ = moving_bank
    det = Detector.load(cfg, bank)
    imgs = [novel(scene(40), 8 + 3 * i) for i in range(6)]
    own = results_of(det, [Frame("own", i, i / 24, im) for i, im in enumerate(imgs)])
    tr = det.flow_tracker()
    assert isinstance(tr, FlowTracker) and tr.extractor is not det.flow_extractor  # its own DIS instance per source
    smalls = [det.prepare(Frame("src", i, 0.0, im).picture) for i, im in enumerate(imgs)]
    frames = [Frame("src", i, i / 24, im, small, tr(small)) for i, (im, small) in enumerate(zip(imgs, smalls))]
    det.camera_states.previous.clear()
    theirs = results_of(det, frames)
    assert "src" not in det.camera_states.previous  # the detector's own flow state was not needed
    np.testing.assert_allclose(
        [r.components["moving_max"] for r in theirs], [r.components["moving_max"] for r in own], rtol=1e-5
    )
    assert theirs[3].components["moving_max"] > 0.9 * theirs[3].components["map_max"]  # the patch moves
    # a batch mixing frames with and without source flow: each frame gets the same evidence either way
    det.reset()
    mixed = results_of(det, [frames[0], Frame("own", 1, 1 / 24, imgs[1])] + frames[1:3])
    assert mixed[0].components["moving_max"] == pytest.approx(own[0].components["moving_max"], rel=1e-5)
    assert mixed[3].components["moving_max"] == pytest.approx(own[2].components["moving_max"], rel=1e-5)


def test_a_new_sequence_restarts_flow_and_smoothing(moving_bank):
    """After a reconnect or a new pass (Frame.sequence changes) the detector neither takes flow from the
    frame before the gap nor averages the new frames' scores with the old ones."""
    from detector.detector import Detector
    from stream.frame import Frame

    cfg, bank, _ = moving_bank
    cfg = cfg.model_copy(deep=True)
    cfg.detector.smooth_window = 4
    det = Detector.load(cfg, bank)
    imgs = [novel(scene(40), 8 + 3 * i) for i in range(8)]
    # pass 0: frames 0-3; pass 1 restarts with frame 4's picture; indices continue, as a looped file's do
    frames = [Frame("cam", i, i / 24, im, sequence=int(i >= 4)) for i, im in enumerate(imgs)]
    alone = results_of(det, frames[4:6])  # what pass 1 scores as a camera seen for the first time
    det.reset()
    both = results_of(det, frames[:2]) + results_of(det, frames[2:6])  # the change falls inside a batch
    assert [r.score for r in both[4:]] == pytest.approx([r.score for r in alone], rel=1e-5)
    assert both[4].components["moving_max"] == pytest.approx(alone[0].components["moving_max"], rel=1e-5)
    assert both[4].components["moving_max"] == pytest.approx(0.5 * both[4].components["map_max"], rel=1e-4)
    # without the sequence number the same frames are smoothed across the change and get flow from frame 3
    det.reset()
    plain = [Frame("cam", f.index, f.timestamp, f.picture) for f in frames]
    joined = results_of(det, plain[:2]) + results_of(det, plain[2:6])
    assert joined[4].score != pytest.approx(alone[0].score, rel=1e-3)
    assert joined[4].components["moving_max"] > 0.9 * joined[4].components["map_max"]

"""One bank per STC scene: which footage splits, the bank layout, eval against each video's scene."""

import json
import shutil

import numpy as np
import pytest

import configs
import run_stream
from configs.errors import UserError
from detector.bank import open_bank
from detector.fit import fit_bank
from detector.scenes import INDEX, read_index, scene_of, split_by_scene, write_index
from evaluation.run import evaluate
from stream.synthetic import generate_stc


def test_scene_of_stc_names():
    assert scene_of("01_001") == "01" and scene_of("12_0174") == "12"
    assert scene_of("avenue_12") is None and scene_of("01_001_x") is None and scene_of("01") is None


def test_split_by_scene_settings():
    stc = ["01_001", "01_002", "02_001", "10_001"]
    assert split_by_scene(stc, "auto", stc_layout=True) == {"01": [0, 1], "02": [2], "10": [3]}
    assert split_by_scene(stc, "auto", stc_layout=False) == {}  # recordings named by date are one camera
    assert split_by_scene(["01_001", "01_002"], "auto", stc_layout=True) == {}  # one scene: one bank
    assert split_by_scene(stc + ["lobby"], "auto", stc_layout=True) == {}
    assert split_by_scene(stc, False, stc_layout=True) == {}
    assert split_by_scene(["01_001"], True, stc_layout=False) == {"01": [0]}
    with pytest.raises(UserError, match="lobby.*per_scene"):
        split_by_scene(stc + ["lobby"], True, stc_layout=True)


def test_per_scene_option_is_validated():
    assert configs.parse({"bank": {"per_scene": False}}).bank.per_scene is False
    assert configs.parse({}).bank.per_scene == "auto"
    with pytest.raises(UserError, match="per_scene"):
        configs.parse({"bank": {"per_scene": "sometimes"}})


def small_cfg(**bank):
    return configs.parse(
        {
            "detector": {
                "backbone": {"name": "resnet18", "weights": "random"},
                "input_size": 64,
                "grid": 8,
                "batch_size": 8,
                "coreset": {"max_size": 128},
            },
            "bank": {"holdout": 0.2, "max_frames": None, **bank},
        }
    )


@pytest.fixture(scope="module")
def two_scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_scenes")
    for camera in (0, 1):
        generate_stc(
            root,
            seed=camera,
            camera=camera,
            size=(96, 64),
            train_videos=2,
            train_frames=20,
            test_videos=1,
            test_frames=30,
        )
    return root


def test_fit_splits_by_scene_and_eval_uses_each_scenes_bank(tmp_path, two_scenes, capsys):
    bank = tmp_path / "bank"
    meta = fit_bank(small_cfg(), two_scenes, bank, progress=False)
    assert list(meta["scenes"]) == ["01", "02"]
    assert read_index(bank) == {"01": bank / "scene_01", "02": bank / "scene_02"}
    for scene in ("01", "02"):
        b = open_bank(bank / f"scene_{scene}")
        assert {s["path"].split("/")[-1][:2] for s in b.meta["sources"]} == {scene}  # only its own footage
        assert b.meta["n_frames"] == meta["scenes"][scene]["n_frames"] == 32  # 40 frames, 20 % held out
    with pytest.raises(UserError, match=r"one bank per scene \(01, 02\).*--bank .*scene_01"):
        open_bank(bank)
    assert run_stream.main(["verify-bank", "--bank", str(bank)]) == 0
    assert capsys.readouterr().out.count(": OK (32 frames)") == 2

    m = evaluate(small_cfg(), two_scenes, bank, tmp_path / "eval", progress=False, plots=False)
    assert set(m["per_scene"]) == {"01", "02"} and m["n_frames"] == 60
    assert set(m["threshold"]) == {"01", "02"} and m["threshold"]["01"] != m["threshold"]["02"]
    assert all(np.isfinite(v) for v in m["pixel_threshold"].values())
    assert 0.0 <= m["frame_auroc_micro"] <= 1.0
    # Each video was scored against its own scene's bank: its scores exceed the threshold of that scene
    # exactly where the reported recall / false-positive rates say.
    labels = np.concatenate([v["labels"] for v in m["per_video"].values()])
    alarm = np.concatenate([np.asarray(v["scores"]) >= m["threshold"][name[:2]] for name, v in m["per_video"].items()])
    assert m["at_threshold"]["recall"] == pytest.approx(alarm[labels == 1].mean())

    write_index(bank, ["01"])  # a bank that lacks a scene of the test set is refused by name
    with pytest.raises(UserError, match=r"no bank for scene\(s\) 02"):
        evaluate(small_cfg(), two_scenes, bank, tmp_path / "eval2", progress=False, plots=False)


def test_refit_as_one_bank_removes_the_scene_index(tmp_path, two_scenes):
    bank = tmp_path / "bank"
    fit_bank(small_cfg(), two_scenes, bank, progress=False)
    assert (bank / INDEX).is_file()
    meta = fit_bank(small_cfg(per_scene=False), two_scenes, bank, progress=False)
    assert not (bank / INDEX).exists() and open_bank(bank).meta["n_frames"] == meta["n_frames"] == 64
    json.loads((bank / "meta.json").read_text())
    # and back: a per-scene fit removes the single bank's files, so the root is not read as a stale bank
    fit_bank(small_cfg(), two_scenes, bank, progress=False)
    assert not (bank / "meta.json").exists() and read_index(bank) is not None


def test_eval_refuses_test_videos_without_a_scene(tmp_path, two_scenes):
    bank = tmp_path / "bank"
    fit_bank(small_cfg(), two_scenes, bank, progress=False)
    data = tmp_path / "data"
    shutil.copytree(two_scenes / "testing", data / "testing")
    for sub, ext in (("frames", ""), ("test_frame_mask", ".npy"), ("test_pixel_mask", ".npy")):
        (data / "testing" / sub / f"01_0014{ext}").rename(data / "testing" / sub / f"lobby{ext}")
    with pytest.raises(UserError, match="lobby.*<scene>_<clip>"):
        evaluate(small_cfg(), data, bank, tmp_path / "eval", progress=False, plots=False)

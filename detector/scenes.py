"""One memory bank per scene of a multi-camera STC data set: which scene a video belongs to, and the index
that `fit` writes beside the scenes' banks.

STC names every training and test video `<scene>_<clip>` (`01_001.avi`, `01_0014`): thirteen fixed
cameras. Each camera's normal footage is its own normal model, so by default `fit` builds a bank per
scene and `eval` scores each test video against its scene's bank. Pooling the cameras would spread the
coreset's fixed budget over all of them and measure one flow noise floor for cameras that differ.

    <bank>/scenes.json          {"format": "spade-scenes", "version": 1, "scenes": {"01": "scene_01", ...}}
    <bank>/scene_01/            a complete bank (`run --bank <bank>/scene_01` serves that camera)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from configs import jsonsafe
from configs.errors import UserError

INDEX = "scenes.json"
FORMAT = "spade-scenes"
STC_NAME = re.compile(r"^(\d+)_\d+$")


def scene_of(name: str) -> str | None:
    """The scene of an STC video or frame-folder name ('01' of '01_001' or '01_0014'), else None."""
    m = STC_NAME.match(name)
    return m.group(1) if m else None


def split_by_scene(names: list[str], setting: str | bool, stc_layout: bool) -> dict[str, list[int]]:
    """{scene: indices into `names`} when the bank is split by scene, else {} (one bank).

    `setting` is `bank.per_scene`: True splits (every name must carry a scene), False never does, and
    "auto" splits only an STC-layout root whose names carry two or more scenes: a plain folder of
    recordings named by date (`20240101_1200.mp4`) is one camera, not many.
    """
    if setting is False:
        return {}
    scenes = [scene_of(n) for n in names]
    if setting == "auto" and (not stc_layout or None in scenes or len(set(scenes)) < 2):
        return {}
    missing = [n for n, s in zip(names, scenes) if s is None]
    if missing:
        raise UserError(
            f"bank.per_scene is true but {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''} do not follow STC's <scene>_<clip> naming "
            "(e.g. 01_001.avi); set bank.per_scene to auto or false"
        )
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(scenes):
        assert s is not None, "names without a scene were refused or returned {} above"
        groups.setdefault(s, []).append(i)
    return dict(sorted(groups.items(), key=lambda kv: int(kv[0])))


def scene_dir(scene: str) -> str:
    return f"scene_{scene}"


def write_index(bank_dir: Path, scenes: list[str]) -> None:
    """Written after each scene's bank is complete, so an interrupted fit leaves the finished ones usable."""
    doc = {"format": FORMAT, "version": 1, "scenes": {s: scene_dir(s) for s in scenes}}
    tmp = Path(bank_dir) / (INDEX + ".part")
    tmp.write_text(jsonsafe.dumps(doc, indent=1))
    tmp.replace(Path(bank_dir) / INDEX)


def read_index(bank_dir: str | Path) -> dict[str, Path] | None:
    """{scene: bank directory} of a per-scene bank, None for a single bank."""
    path = Path(bank_dir) / INDEX
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        scenes = doc["scenes"] if doc.get("format") == FORMAT else None
        if not isinstance(scenes, dict) or not all(isinstance(v, str) for v in scenes.values()):
            raise ValueError("no 'scenes' map")
    except (OSError, ValueError, KeyError, AttributeError) as err:
        raise UserError(f"{path}: unreadable scene index ({err})") from None
    return {s: Path(bank_dir) / d for s, d in scenes.items()}


def not_a_single_bank(bank_dir: Path, scenes: dict[str, Path]) -> UserError:
    """The error for a command that needs one bank but was given a per-scene one."""
    names = ", ".join(list(scenes)[:13])
    first = next(iter(scenes.values()), Path(bank_dir) / "scene_NN")
    return UserError(
        f"{bank_dir}: holds one bank per scene ({names}); give one of them, e.g. --bank {first} "
        "(`eval` takes the whole folder)"
    )

"""The memory bank: features of normal footage, on disk.

Layout of a bank directory:
  meta.json     format version, backbone, weights digest, input size, grid, shapes, frame sources,
                array checksums, calibration
  global.npy    float32 [N, D]   global features (small; loaded into memory)
  pixel.f16     float16 [N, grid*grid, C], raw row-major: memory-mapped, only the K neighbours of a
                frame are ever read, so the bank may be far larger than RAM.
  motion.npy    float32 [grid*grid, M, 3] per-cell coreset of normal flow features (only when the bank
                was fitted with detector.motion.enabled; see detector/motion.py). Format version 2.
  coreset.f16   float16 [M, C] raw: the pixel gallery of detector.gallery: coreset, a greedy k-centre
                coreset of all rows of pixel.f16, in selection order (detector/coreset.py); with
  coreset_index.npy  int32 [M, 2] (bank frame, cell) each coreset feature was taken from. Format version 3;
                meta.json's `coreset` holds the detector.coreset settings it was built with.

Banks fitted before faiss was dropped also hold `global.faiss`, an exact L2 index over global.npy that
nothing ever read (torch's search was faster: benchmarks/knn_faiss.py): it is not checksummed, loading
ignores it and the next fit into the directory removes it.

meta.json's calibration holds, since version 2, the frame-score components of every held-out frame
(`holdout_components`, in time order, with `holdout_items`), so any frame score, combination or
smoothing can be calibrated against them when the detector loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from configs import jsonsafe
from configs.errors import UserError
from detector.scenes import INDEX as SCENE_INDEX
from detector.scenes import not_a_single_bank, read_index

FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # 1: no motion model, no held-out component sequences; 2: no coreset
META = "meta.json"
GLOBAL = "global.npy"
PIXEL = "pixel.f16"
# Values implied for metadata keys that banks written before the key existed do not carry.
LEGACY_DEFAULTS = {"precision": "fp32", "resize": "area-from-rgb", "bf16_trunk": "eager"}
# Config fields behind signature keys whose mismatch message names the field rather than the key.
CONFIG_FIELDS = {"coreset": "detector.coreset"}
MOTION = "motion.npy"
CORESET = "coreset.f16"
CORESET_INDEX = "coreset_index.npy"
# Written by older versions and no longer read; removed with the rest of an old bank.
LEGACY_FILES = ("global.faiss",)


def clear_bank(directory: Path) -> None:
    """Remove an old bank's files from `directory` (a single bank's, or a per-scene bank's index), so no
    stale half of it is ever read beside a new one."""
    for name in (META, GLOBAL, PIXEL, MOTION, CORESET, CORESET_INDEX, SCENE_INDEX, *LEGACY_FILES):
        (Path(directory) / name).unlink(missing_ok=True)


class BankWriter:
    """Appends features frame by frame; RAM use is one batch, whatever the number of frames."""

    def __init__(self, directory: Path, *, pixel_dim: int, grid: int, global_dim: int):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        clear_bank(self.dir)
        self.pixel_dim, self.grid, self.global_dim = pixel_dim, grid, global_dim
        self._pixel = open(self.dir / (PIXEL + ".part"), "wb")
        self._pixel_hash = hashlib.sha256()
        self._global: list[np.ndarray] = []
        self.sources: list[tuple[int, int]] = []  # (source id, frame index) of each bank row
        self.n = 0

    def append(self, pyramid: np.ndarray, glob: np.ndarray, origins: list[tuple[int, int]]) -> None:
        """pyramid float [B, C, g, g] (channels-last memory, as the backbone gives it, needs no reordering);
        glob float [B, D]."""
        b = pyramid.shape[0]
        rows = np.ascontiguousarray(
            pyramid.transpose(0, 2, 3, 1).reshape(b, self.grid * self.grid, self.pixel_dim), dtype=np.float16
        )
        buf = rows.tobytes()
        self._pixel.write(buf)
        self._pixel_hash.update(buf)
        self._global.append(np.asarray(glob, dtype=np.float32))
        self.sources.extend(origins)
        self.n += b

    def abort(self) -> None:
        self._pixel.close()
        (self.dir / (PIXEL + ".part")).unlink(missing_ok=True)

    def finish(self, meta: dict[str, Any], motion_model: np.ndarray | None = None) -> Path:
        if self.n == 0:
            self.abort()
            raise UserError(f"{self.dir}: no frames were read, the memory bank would be empty")
        self._pixel.flush()
        os.fsync(self._pixel.fileno())
        self._pixel.close()
        os.replace(self.dir / (PIXEL + ".part"), self.dir / PIXEL)
        glob = np.concatenate(self._global, axis=0)
        np.save(self.dir / GLOBAL, glob)
        checksums = {GLOBAL: _sha256_file(self.dir / GLOBAL), PIXEL: self._pixel_hash.hexdigest()}
        if motion_model is not None:
            np.save(self.dir / MOTION, np.ascontiguousarray(motion_model, dtype=np.float32))
            checksums[MOTION] = _sha256_file(self.dir / MOTION)
        meta = dict(meta)
        meta.update(
            format_version=FORMAT_VERSION,
            n_frames=self.n,
            grid=self.grid,
            pixel_dim=self.pixel_dim,
            global_dim=self.global_dim,
            frame_origins=self.sources,
            checksums=checksums,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        write_meta(self.dir, meta)
        return self.dir


def write_coreset(directory: Path, feats: np.ndarray, index: np.ndarray, params: dict, stats: dict) -> dict:
    """Add a coreset (float16 [M, C], int32 [M, 2]) to a finished bank; returns the updated metadata.

    `params` (the detector.coreset settings) go into meta.json's `coreset`, which the bank signature of a
    config with detector.gallery: coreset must match.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    feats = np.ascontiguousarray(feats, dtype=np.float16)
    index = np.ascontiguousarray(index, dtype=np.int32)
    if feats.ndim != 2 or feats.shape[1] != int(meta["pixel_dim"]) or index.shape != (len(feats), 2):
        raise ValueError(f"coreset shapes {feats.shape} / {index.shape} do not fit pixel_dim {meta['pixel_dim']}")
    (directory / (CORESET + ".part")).write_bytes(feats.tobytes())
    os.replace(directory / (CORESET + ".part"), directory / CORESET)
    np.save(directory / CORESET_INDEX, index)
    meta["checksums"] = {
        **meta.get("checksums", {}),
        CORESET: _sha256_file(directory / CORESET),
        CORESET_INDEX: _sha256_file(directory / CORESET_INDEX),
    }
    meta["coreset"] = dict(params)
    meta["coreset_stats"] = dict(stats, size=len(feats))
    write_meta(directory, meta)
    return meta


def write_meta(directory: Path, meta: dict) -> None:
    tmp = Path(directory) / (META + ".part")
    tmp.write_text(jsonsafe.dumps(meta, indent=1))
    os.replace(tmp, Path(directory) / META)


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


@dataclass
class MemoryBank:
    directory: Path
    meta: dict
    global_features: np.ndarray  # float32 [N, D]
    pixel_features: np.memmap  # float16 [N, grid*grid, C]
    calibration: dict = field(default_factory=dict)
    motion_model: np.ndarray | None = None  # float32 [grid*grid, M, 3]
    coreset: np.ndarray | None = None  # float16 [M, C], in memory (small next to pixel.f16)
    coreset_index: np.ndarray | None = None  # int32 [M, 2] (bank frame, cell)

    @property
    def n_frames(self) -> int:
        return int(self.meta["n_frames"])

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """float16 [len(indices), grid*grid, C]: reads only these rows from disk."""
        idx = np.asarray(indices, dtype=np.int64)
        if not isinstance(self.pixel_features, np.memmap):  # an in-memory bank (tests, tools)
            return np.asarray(self.pixel_features[idx], dtype=np.float16)
        out = np.empty((len(idx),) + self.pixel_features.shape[1:], dtype=np.float16)
        row = out[0].nbytes if len(idx) else 0
        # Positioned reads rather than slicing the memmap: touched mapped pages would count towards
        # the process's RSS and accumulate over a long run; read pages stay in the OS cache anyway.
        fd = os.open(self.directory / PIXEL, os.O_RDONLY)
        try:
            for j in np.argsort(idx, kind="stable"):  # ascending offsets: sequential on disk
                buf = os.pread(fd, row, int(idx[j]) * row)
                if len(buf) != row:
                    raise UserError(f"{self.directory / PIXEL}: short read at frame {int(idx[j])} (truncated bank?)")
                out[j] = np.frombuffer(buf, dtype=np.float16).reshape(out.shape[1:])
        finally:
            os.close(fd)
        return out

    def verify(self) -> None:
        """Full checksum of the arrays against meta.json (reads the whole bank)."""
        for name, expected in self.meta.get("checksums", {}).items():
            got = _sha256_file(self.directory / name)
            if got != expected:
                raise UserError(f"{self.directory / name}: checksum mismatch (bank is corrupt; fit it again)")


def read_meta(directory: Path) -> dict:
    path = Path(directory) / META
    if not Path(directory).is_dir():
        raise UserError(f"{directory}: memory bank directory not found (run `run_stream.py fit` first)")
    if not path.is_file():
        scenes = read_index(directory)
        if scenes is not None:
            raise not_a_single_bank(Path(directory), scenes)
        raise UserError(f"{path}: missing; {directory} is not a memory bank (run `run_stream.py fit`)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable bank metadata ({err})") from None
    if not isinstance(meta, dict) or meta.get("format_version") not in READABLE_VERSIONS:
        got = meta.get("format_version") if isinstance(meta, dict) else None
        raise UserError(
            f"{path}: format_version is {got!r}, this program reads {' or '.join(map(str, READABLE_VERSIONS))}"
        )
    return meta


def _coreset_mismatch(have, want) -> str | None:
    if have is not None:
        return None  # other coreset settings: the generic message names detector.coreset
    return (
        "detector.gallery is 'coreset' but this bank has no coreset (it was fitted with detector.gallery: "
        "knn); fit it again with this config, or set detector.gallery: knn"
    )


def _trunk_mismatch(have, want) -> str:
    fix = (
        "set detector.backbone.freeze: false to use it as it is"
        if want == "frozen"
        else "on a CPU set detector.backbone.freeze: true (a bank shared by CPU and GPU detectors is "
        "fitted with freeze: false)"
    )
    return (
        f"this bank's bf16 features came from the {have} backbone trunk and this detector runs the {want} "
        "one (detector.backbone.freeze, which only the CPU applies); bf16 rounds the two differently: fit the "
        f"bank again with this config, or {fix}"
    )


def _resize_mismatch(have, want) -> str:
    return (
        f"this bank's frames were shrunk to the model input by another method ({have!r}; this version: "
        f"{want!r}, stream/picture.py), so its features and thresholds do not match what the detector now "
        "computes; fit the bank again"
    )


# Keys whose mismatch needs more than "built with X, config gives Y": what it means and how to fix it.
# A function may return None to fall back to the generic message.
MISMATCH_MESSAGES = {"coreset": _coreset_mismatch, "bf16_trunk": _trunk_mismatch, "resize": _resize_mismatch}


def mismatch_message(key: str, have: Any, want: Any) -> str:
    """Why a bank whose `key` is `have` cannot serve a config that implies `want`, and what to do."""
    special = MISMATCH_MESSAGES.get(key)
    msg = special(have, want) if special is not None else None
    if msg is not None:
        return msg
    if key in CONFIG_FIELDS:
        return (
            f"bank's {key} was built with {have!r} but the config gives {CONFIG_FIELDS[key]}={want!r}; "
            "use a matching config or fit a new bank"
        )
    return (
        f"bank was built with {key}={have!r} but the config gives {key}={want!r}; use a matching config or "
        "fit a new bank"
    )


def open_bank(directory: Path, expected: dict[str, Any] | None = None) -> MemoryBank:
    """Open a bank, refusing one that is truncated or was built with a different configuration.

    `expected` maps metadata keys to the values the current config implies.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    for key, want in (expected or {}).items():
        have = meta.get(key, LEGACY_DEFAULTS.get(key))
        if have != want:
            raise UserError(f"{directory}: {mismatch_message(key, have, want)}")
    n, g, c, d = (int(meta[k]) for k in ("n_frames", "grid", "pixel_dim", "global_dim"))
    pix_path = directory / PIXEL
    want_bytes = n * g * g * c * 2
    have_bytes = pix_path.stat().st_size if pix_path.is_file() else -1
    if have_bytes != want_bytes:
        raise UserError(
            f"{pix_path}: {'missing' if have_bytes < 0 else f'{have_bytes} bytes'}, expected {want_bytes} "
            f"({n} frames x {g * g} cells x {c} channels fp16): the bank is truncated or incomplete"
        )
    try:
        glob = np.load(directory / GLOBAL)
    except (OSError, ValueError) as err:
        raise UserError(f"{directory / GLOBAL}: unreadable ({err})") from None
    if glob.shape != (n, d) or glob.dtype != np.float32:
        raise UserError(f"{directory / GLOBAL}: shape {glob.shape} {glob.dtype}, expected ({n}, {d}) float32")
    pixel = np.memmap(pix_path, dtype=np.float16, mode="r", shape=(n, g * g, c))
    motion = None
    if (directory / MOTION).is_file():
        try:
            motion = np.load(directory / MOTION)
        except (OSError, ValueError) as err:
            raise UserError(f"{directory / MOTION}: unreadable ({err})") from None
        if motion.ndim != 3 or motion.shape[0] != g * g or motion.dtype != np.float32:
            raise UserError(
                f"{directory / MOTION}: shape {motion.shape} {motion.dtype}, expected ({g * g}, M, 3) float32"
            )
    coreset = coreset_index = None
    if meta.get("coreset") is not None:
        coreset, coreset_index = _load_coreset(directory, meta, c)
    return MemoryBank(directory, meta, glob, pixel, meta.get("calibration") or {}, motion, coreset, coreset_index)


def _load_coreset(directory: Path, meta: dict, channels: int) -> tuple[np.ndarray, np.ndarray]:
    path = directory / CORESET
    size = int((meta.get("coreset_stats") or {}).get("size", -1))
    want_bytes = size * channels * 2
    have_bytes = path.stat().st_size if path.is_file() else -1
    if size < 1 or have_bytes != want_bytes:
        raise UserError(
            f"{path}: {'missing' if have_bytes < 0 else f'{have_bytes} bytes'}, expected {want_bytes} "
            f"({size} features x {channels} channels fp16): the bank is truncated or incomplete"
        )
    feats = np.fromfile(path, dtype=np.float16).reshape(size, channels)
    try:
        index = np.load(directory / CORESET_INDEX)
    except (OSError, ValueError) as err:
        raise UserError(f"{directory / CORESET_INDEX}: unreadable ({err})") from None
    if index.shape != (size, 2):
        raise UserError(f"{directory / CORESET_INDEX}: shape {index.shape}, expected ({size}, 2)")
    return feats, index

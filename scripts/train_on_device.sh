#!/usr/bin/env bash
# Train the embedded chest patient's SCR network on one GPU, online (fresh simulated views every
# step), within 8 minutes from a cold start. Needs only python3 with torch, numpy, scipy, OpenCV,
# matplotlib and tqdm (no Open3D, SimpleITK or ROS): the inputs are this source tree and the patient
# file models/chest_example_patient.npz (xray-ct-reg export-patient --ct example --out ...).
#
#   scripts/train_on_device.sh OUT_DIR [MINUTES]
#
# Several network configurations (CONFIGS) can train side by side on the one GPU (each process is bound by
# kernel launches, not by the GPU), so capacity and resolution are chosen by measurement. Each
# writes OUT_DIR/<name>/model.pt, training_curves.png, training_log.json, train.log and its
# training state in parts, model.state.pt.part-NN (`cat` them into model.state.pt; resume with
# `xray-ct-reg train --patient ... --resume .../model.state.pt`). A device call returns at most 8
# files (16 MiB each, 64 MiB in all): with two CONFIGS, delete the curves and train.log under OUT
# after the script (their ends are in its output). DEVICE=cpu and small MINUTES/EPOCH_VIEWS give
# a smoke test on a machine without a GPU.
#
# One schedule over two device calls (each at most 10 minutes): STOP_AFTER ends a call early
# while the learning-rate schedule runs over MINUTES; the state comes back in parts under 16 MiB
# (model.state.pt.part-NN, a device machine returns no larger file), and the next call resumes it:
#   STOP_AFTER=7.5 RESUME=models/chest_example.pt scripts/train_on_device.sh OUT 12
#   mkdir -p state && cat OUT/px64_w16/model.state.pt.part-* > state/model.state.pt
#   RESUME=state/model.state.pt scripts/train_on_device.sh OUT2 12
set -euo pipefail
OUT_DIR=${1:?usage: train_on_device.sh OUT_DIR [MINUTES]}
MINUTES=${2:-6.5}
DEVICE=${DEVICE:-cuda}
EPOCH_VIEWS=${EPOCH_VIEWS:-16384}
BATCH=${BATCH:-256}
RESUME=${RESUME:-}          # a checkpoint or training state to continue from
STOP_AFTER=${STOP_AFTER:-}  # minutes: end this call early; the schedule still runs over MINUTES
# name:size:width -- resolution and width measured against each other (CPU inference cost:
# bench/latency.py)
# (first run, 2026-11-26, H200, 6.5 min each side by side at batch 32: px64_w16 38.5 mm,
# px128_w12 53.4 mm, px128_w16 64.8 mm validation median; see models/README.md)
CONFIGS=${CONFIGS:-"px64_w16:64:16"}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
pids=()
for config in $CONFIGS; do
  IFS=: read -r name size width <<<"$config"
  mkdir -p "$OUT_DIR/$name"
  python3 -m xray_ct_reg.cli train --patient "$ROOT/models/chest_example_patient.npz" \
    --out "$OUT_DIR/$name/model.pt" --device "$DEVICE" --train-size "$size" --width "$width" \
    --batch-size "$BATCH" --epoch-views "$EPOCH_VIEWS" --max-minutes "$MINUTES" \
    --epochs 100000 --patience 100000 --threads 2 --quiet ${RESUME:+--resume "$RESUME"} \
    ${STOP_AFTER:+--stop-after-minutes "$STOP_AFTER"} \
    >"$OUT_DIR/$name/train.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
for config in $CONFIGS; do
  name=${config%%:*}
  echo "== $name"; tail -n 2 "$OUT_DIR/$name/train.log"
  state="$OUT_DIR/$name/model.state.pt"
  if [ -f "$state" ]; then
    rm -f "$state".part-*
    split -b 15M -d "$state" "$state.part-"
    rm "$state"  # a device call would not return it (over 16 MiB), and it would take a file's place
  fi
done
exit $status

#!/usr/bin/env bash
# Every GPU measurement of benchmarks/README.md in one run, for a GPU machine with torch and torchvision only.
# The most wanted figures come first (PreAct-ResNet18's speed, agreement, attack training and outcome, then
# packing), and each script rewrites its JSON under OUT as it goes, so a run cut short keeps what it measured.
#
#   bash benchmarks/gpu_run.sh OUT [NPZ]
#
# NPZ: CIFAR-10 as an .npz of the layout backdoor.data reads (default: runs/cifar10_subset.npz, where a copy of
# ../shared/data/cifar10_subset.npz travels to a machine that has no ../shared).
set -u
out=${1:?usage: benchmarks/gpu_run.sh OUT [NPZ]}
npz=${2:-runs/cifar10_subset.npz}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
status=0
step() {
  echo "== $*"
  "$@" || status=1
}
step python3 benchmarks/sau_speed.py --out-dir "$out/preactresnet18" --arch preactresnet18 --full-trial \
  --train-data "npz:$npz"
step python3 benchmarks/packing.py --out-dir "$out/packing" --arch cnn-small --arch mobilenet_v3_large
step python3 benchmarks/sau_speed.py --out-dir "$out/torchvision" --only speed --only agreement \
  --arch vgg19_bn --arch mobilenet_v3_large --arch efficientnet_b3 --arch densenet161
step python3 benchmarks/packing.py --out-dir "$out/packing-efficientnet" --arch efficientnet_b3
exit $status

#!/usr/bin/env bash
# Train the reference models on one lent GPU within one device call (issue 17; models/README.md, "GPU").
#
#   tools/train_on_gpu.sh                                   # on the device machine: all three, 530 s in all
#   tools/train_on_gpu.sh --device cpu --seconds 60 -- --train-npz models/cifar10_calib512.npz \
#       --test-npz models/cifar10_test1000.npz --limit-train 256 --limit-test 200 --batch 64   # CPU smoke test
#
# Each model starts from its shipped ONNX file (models/<name>.onnx) and trains one new cosine cycle whose
# length models/train.py fits to the model's share of the time left (measured after the warm-up epochs); the
# lr is annealed by the clock as well, so every model ends its cycle, evaluates and exports by its deadline.
# Writes $OUT/<name>.onnx, $OUT/<name>.log and $OUT/train_on_gpu.log (7 files: the device tool returns 8).
# Every model trains with Cutout (--cutout 16; what it gained is in models/README.md).
# Options: --device cuda|cpu, --seconds N (whole script), --models "a b c", and after "--" extra train.py flags.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
TOTAL=530
MODELS="resnet56 resnet20 mobilenetv2"
EXTRA=()
while (($#)); do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --seconds) TOTAL=$2; shift 2 ;;
    --models) MODELS=$2; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

weight() {  # share of the time: ResNet-56 and MobileNetV2 are the slow ones and the furthest from their targets
  case "$1" in resnet56) echo 4 ;; resnet20) echo 2 ;; mobilenetv2) echo 4 ;; *) echo 3 ;; esac
}

OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
CACHE=${CACHE:-/tmp/onnxprune-cache}
DATA=${DATA:-}
if [[ -z $DATA ]]; then  # carried into the checkout (models/README.md), or beside it on the development machines
  for d in .data/cifar10 ../shared/data/cifar10; do [[ -f $d/train.tar.gz ]] && DATA=$d && break; done
fi
export PYTHONUNBUFFERED=1
start=$(date +%s)
deadline=$((start + TOTAL))
log=$OUT/train_on_gpu.log
: >"$log"
say() { echo "$*" | tee -a "$log"; }

say "train_on_gpu.sh: device $DEVICE, $TOTAL s for $MODELS, data ${DATA:-none}, out $OUT"
if [[ $DEVICE == cuda ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$log" || true
fi
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' 2>&1 | tee -a "$log"

if [[ " ${EXTRA[*]} " != *" --train-npz "* ]]; then  # decode the JPEGs once, in parallel, before any model
  [[ -n $DATA ]] || { say "no CIFAR-10 tarballs: set DATA or carry .data/cifar10"; exit 1; }
  "$PY" -c "
import sys, time; from pathlib import Path; sys.path.insert(0, '.')
from models.train import load_split
t = time.time()
for split in ('train', 'test'):
    x, _ = load_split(Path('$DATA'), split, Path('$CACHE'), workers=16)
    print(split, x.shape, flush=True)
print(f'decoded in {time.time() - t:.1f} s')" 2>&1 | tee -a "$log"
fi

read -ra queue <<<"$MODELS"
for i in "${!queue[@]}"; do
  model=${queue[$i]}
  left=$((deadline - $(date +%s)))
  total_weight=0
  for m in "${queue[@]:$i}"; do total_weight=$((total_weight + $(weight "$m"))); done
  budget=$((left * $(weight "$model") / total_weight - 5))  # 5 s: python and torch start before train.py's clock
  if ((budget < 10)); then
    say "$model: skipped, $left s left"
    continue
  fi
  say "$model: $budget s of the $left s left"
  # A hard stop 45 s past the budget: SIGINT makes train.py export what it has.
  timeout -s INT -k 15 $((budget + 45)) "$PY" models/train.py "$model" --device "$DEVICE" --time-budget "$budget" \
    --reserve 15 --data "${DATA:-.}" --cache "$CACHE" --out "$OUT" --log-dir "$OUT" --eval-every 10 --workers 16 \
    --cutout 16 \
    ${EXTRA[@]+"${EXTRA[@]}"} 2>&1 | grep --line-buffered -v -e Warning -e warnings.warn -e "torch.onnx.export(" | tee -a "$log" || say "$model: failed"
done

"$PY" - "$OUT" $MODELS <<'EOF' 2>&1 | tee -a "$log"
import json, sys
from pathlib import Path
import onnx
out = Path(sys.argv[1])
print("| model | epochs | cycle | this run | test acc | minutes |")
print("| --- | --- | --- | --- | --- | --- |")
for name in sys.argv[2:]:
    path = out / f"{name}.onnx"
    if not path.exists():
        print(f"| {name} | no file | | | | |")
        continue
    meta = {e.key: e.value for e in onnx.load(str(path)).metadata_props}
    rec = json.loads(meta["onnxprune.training"])
    run = rec["history"][-1]
    print(f"| {name} | {rec['epochs']} | {rec['cycle']['index']}: {rec['cycle']['done']}/{rec['cycle']['length']} "
          f"| {run['to'] - run['from']} epochs, batch {run['batch']}, lr {run['lr']:.3g}, {run['device']} "
          f"| {run['test_acc']:.4f} ({run['test_images']} images) | {run['minutes']} |")
EOF
say "total $(($(date +%s) - start)) s"

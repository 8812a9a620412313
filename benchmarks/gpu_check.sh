#!/usr/bin/env bash
# The GPU check (docs/scaling.md), within 8 minutes on one GPU; run where a GPU is lent:
#   benchmarks/gpu_check.sh [DATA=../shared/data/kermany224] [OUT=/tmp/gpu_check]
# 1. lite0 and VGG16 (random init: no VGG16 weights install offline) at 224 px, one epoch
#    each of stage 1 with trainer=auto; 2. images/s of the data path (the preprocessed cache,
#    the loader the run uses) against the GPU training step; 3. the occlusion engine on the GPU
#    (seconds per exact map, lite0 and VGG16); 4. trainer=ddp with every GPU there is, one epoch of lite0.
# Prints one table: step, seconds, figure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data/kermany224}
OUT=${OUT:-/tmp/gpu_check}
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" = 0 ]; then
  echo "gpu_check: no CUDA GPU here; nothing to check" >&2
  exit 2
fi
rm -rf "$OUT" && mkdir -p "$OUT"
ROWS=()
row() { ROWS+=("$(printf '| %s | %s | %s |' "$1" "$2" "$3")"); }
timed() {  # timed <name> <command...>: seconds into $SECONDS_TAKEN, output into $OUT/<name>.log
  local name=$1 start
  shift
  start=$(date +%s.%N)
  "$@" >"$OUT/$name.log" 2>&1 || { echo "gpu_check: $name failed:"; tail -20 "$OUT/$name.log"; exit 1; }
  SECONDS_TAKEN=$(echo "$(date +%s.%N) - $start" | bc)
}
COMMON=(stage=binary data.root="$DATA" trainer.max_epochs=1 logger=none model.input_size=224
        data.num_workers=8 paths.cache_dir="$OUT/cache")
for model in efficientnet_lite0 vgg16; do
  pretrained=$([ $model = vgg16 ] && echo false || echo true)
  timed "train_$model" $PY train.py model=$model model.pretrained=$pretrained trainer=auto \
    "${COMMON[@]}" hydra.run.dir="$OUT/train_$model"
  auroc=$(grep -oP 'val/auroc\s+\K[0-9.]+' "$OUT/train_$model.log" | head -1)
  row "$model, 1 epoch, trainer=auto ($(grep -oP 'Hardware: \K.*' "$OUT/train_$model.log" | head -1))" \
      "$SECONDS_TAKEN" "val AUROC ${auroc:-?}"
done
timed data_path $PY -m benchmarks.data_path --full-size 64 --workers 8 --batch 64 \
  --workdir "$OUT/bench"
row "data path: 224 px, preprocessed cache, 8 workers" "$SECONDS_TAKEN" \
    "$(grep -m1 'preprocessed cache' "$OUT/data_path.log" | tr -s ' ')"
timed step $PY -m benchmarks.train_step --models vgg16 tf_efficientnet_lite0 --device cuda \
  --batch 64
row "GPU training step (frozen backbone: plain graph)" "$SECONDS_TAKEN" \
    "$(grep -i 'plain' "$OUT/step.log" | tr -s ' ' | tr '\n' ';')"
cat >"$OUT/occlusion.py" <<'EOF'
import time, torch
from pneumonia.explain.occlusion import incremental_occlusion_map
from pneumonia.models import build_network
for name in ("tf_efficientnet_lite0", "vgg16"):  # the engine's speed: random-init networks
    net = build_network(name, adapter="none", head="linear", input_size=224).eval().cuda()
    image, target = torch.randn(1, 1, 224, 224).cuda(), torch.ones(1, dtype=torch.long).cuda()
    incremental_occlusion_map(net, image, target, 15, 10, 0.0, 32, "exact", 1.0)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        incremental_occlusion_map(net, image, target, 15, 10, 0.0, 32, "exact", 1.0)
    torch.cuda.synchronize()
    print(f"{name}: {(time.perf_counter() - start) / 3:.2f} s/map")
EOF
timed occlusion $PY "$OUT/occlusion.py"
row "occlusion engine, 224 px, window 15, stride 10, exact, device=cuda" "$SECONDS_TAKEN" \
    "$(tr '\n' ' ' <"$OUT/occlusion.log")"
timed ddp $PY train.py model=efficientnet_lite0 trainer=ddp trainer.devices="$GPUS" \
  "${COMMON[@]}" hydra.run.dir="$OUT/ddp"
row "efficientnet_lite0, 1 epoch, trainer=ddp on $GPUS GPU(s)" "$SECONDS_TAKEN" \
    "val AUROC $(grep -oP 'val/auroc\s+\K[0-9.]+' "$OUT/ddp.log" | head -1)"
echo "GPU: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1) x $GPUS"
echo "| step | seconds | figure |"
echo "|---|---|---|"
printf '%s\n' "${ROWS[@]}"

#!/usr/bin/env bash
# Issue 15 on one lent GPU: train the leave-one-source-out folds and the all-sources model with
# configs/field_gpu.yaml (full fine-tuning), score nothing there; bring back each model.pt and a
# tarball of the small run files, to be scored on any machine with
#   python experiments/loso.py --runs rissbilder=DIR gaps=DIR pavement=DIR all=DIR --mendeley-test SPLIT_CSV
# usage: experiments/gpu_field.sh DATA OUT [SECONDS_BUDGET] [FOLDS] [-- extra loso.py --set pairs]
#   DATA holds mendeley/{Positive,Negative} (only train/val patches of the Mendeley split that scores
#   the models: tools/pack_data.py --from-split) and field/<source>/{images,masks}.
set -u
DATA=${1:?data folder with mendeley/ and field/}
OUT=${2:?output folder}
BUDGET=${3:-420}
FOLDS=${4:-rissbilder gaps pavement all}
shift $(( $# < 4 ? $# : 4 )); [ "${1:-}" = "--" ] && shift
SET=("$@")
START=$SECONDS
export PYTHONUNBUFFERED=1
SMALL=$(mktemp -d)/small  # logs and small run files: one tarball in OUT (a device call returns <= 8 files)
RUNS=$(mktemp -d)/runs
mkdir -p "$OUT" "$SMALL"
left() { echo $((BUDGET - (SECONDS - START))); }
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"; nproc; } | tee "$SMALL/host.txt"
n=0; for f in $FOLDS; do n=$((n + 1)); done
for fold in $FOLDS; do
    cap=$(( $(left) / n )); n=$((n - 1))
    if [ "$cap" -lt 30 ]; then echo "skip $fold: $(left) s left"; continue; fi
    timeout "$cap" python3 experiments/loso.py --train-only --folds "$fold" --config configs/field_gpu.yaml \
        --mendeley "$DATA/mendeley" --field "$DATA/field" --mendeley-per-class 1000000 \
        --output-dir "$RUNS" --set "${SET[@]}" > "$SMALL/train_$fold.log" 2>&1
    echo "$fold rc=$? at $((SECONDS - START)) s (cap $cap s)"; tail -2 "$SMALL/train_$fold.log"
    run=$(ls -d "$RUNS/${fold}_"* 2>/dev/null | tail -1)
    if [ -n "$run" ] && [ -f "$run/model.pt" ]; then cp "$run/model.pt" "$OUT/${fold}_model.pt"; fi
done
# the small files of every run (configs, splits, metrics, logs, test predictions): one tarball
(cd "$(dirname "$RUNS")" && find runs -type f ! -name '*.pt' ! -name '*.ckpt' ! -name '*.onnx' -print0 \
    | tar czf "$SMALL/runs_small.tgz" --null -T - )
tar czf "$OUT/small.tgz" -C "$(dirname "$SMALL")" small
ls -la "$OUT"

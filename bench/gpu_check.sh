#!/usr/bin/env bash
# GPU check: measures this package on a CUDA GPU in one unattended command, from a clone of the
# repository:
#
#   bash bench/gpu_check.sh [--data-dir DIR] [--out DIR] [--epochs N] [--deadline SECONDS]
#
# (bash bench/gpu_check.sh --help prints the options and their defaults.) The steps, in order
# (each one function, called from main at the end of this script):
#   1. environment: nvidia-smi (when installed), Python, PyTorch and its CUDA build, the GPU(s).
#      Without a usable CUDA GPU it says so and exits 1.
#   2. requirements: torch, torchvision, numpy and tqdm must import; if one does not, it asks for
#      `pip install -r requirements.txt` and exits 1 (matplotlib is optional: without it there
#      is no curves.png).
#   3. data: CIFAR-10 in --data-dir, downloaded there (as main.py does) when it is absent.
#   4. benchmark: bench/bench.py on cuda: training-loader images/s, train-step images/s of the
#      teacher and the student in fp32 and in the default precision, and one KD + baseline epoch,
#      each against the reference way.
#   5. many students: bench/stack_bench.py on cuda: seconds per step of one KD student, of a grid
#      of 7 students one after another, and of the same 7 stacked into one vmapped computation.
#   6. the fast recipe's workflow on all of CIFAR-10: bench/fast_bench.py on cuda, each step a
#      timed process: the airbench94 teacher (all training images, then the default split), KD +
#      baseline students over 5 seeds, and a T x alpha grid; test accuracies with and without
#      test-time augmentation, and the paired KD - baseline differences.
#   7. a short real schedule on all of CIFAR-10: `main.py --train-teacher --epochs N`, then
#      `main.py --epochs N` (the KD and the baseline student), each followed by its per-epoch
#      table (seconds, images/s, train / validation / test accuracy).
#   8. a summary: each step ok / FAILED / TIMED OUT with its seconds, the benchmark's numbers,
#      the epoch times, the final accuracies and the files written.
#
# Deadline: the whole check ends within --deadline seconds (default 480). Every step runs under
# `timeout` with at most the time left; a step that fails or times out is reported, and the check
# goes on with the steps that do not depend on it (the students need the teacher).
#
# Everything goes to the --out folder (default ./gpu_check_out; files of an earlier check there
# are replaced):
#   gpu_check.log                 everything printed
#   bench.json                    the benchmark's results
#   stack.json                    the many-students timings
#   fast.json                     the fast recipe's workflow: times and accuracies
#   results.json, results.md      the short runs' results, as main.py writes them
#   log_teacher.csv, log_student_kd.csv, log_student_base.csv   one row per epoch
#   curves.png                    accuracy and loss per epoch (needs matplotlib)
# main.py runs with --out-dir OUT/run; at the end these small files are moved from there to OUT.
# The checkpoints (best_*.pth, last_*.pt, about 170 MB, with any other files the runs left in
# OUT/run) are not kept in OUT: they are moved to a new temporary folder (mktemp -d) whose path
# the summary prints; delete it when done.
#
# Exit status: 0 when every step succeeded, 1 when a step failed or timed out (or no GPU, missing
# requirements, no data), 2 for bad usage, 130 / 143 when interrupted.
# The PYTHON environment variable names the interpreter (default: python, else python3).
# Needs bash 4 or newer and `timeout` (GNU coreutils).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROG="bench/gpu_check.sh"

DATA_DIR=./data
OUT=./gpu_check_out
EPOCHS=15
DEADLINE=480

usage() {
  cat <<EOF
Usage: bash $PROG [--data-dir DIR] [--out DIR] [--epochs N] [--deadline SECONDS]

Checks this package on a CUDA GPU in one unattended command: the environment, the benchmark
(bench/bench.py on cuda) and a short real schedule (teacher, then the KD and baseline
students, N epochs each on all of CIFAR-10), then a summary.

Options:
  --data-dir DIR        CIFAR-10 root holding cifar-10-batches-py; downloaded there when
                        absent, as main.py does (default: $DATA_DIR)
  --out DIR             where everything is written: gpu_check.log, bench.json, results.json,
                        results.md, log_*.csv, curves.png (default: $OUT)
  --epochs N            epochs of each short training run (default: $EPOCHS)
  --deadline SECONDS    the whole check ends within this many seconds (default: $DEADLINE)
  -h, --help            print this help and exit

Relative paths are taken from the current directory. The checkpoints of the short runs
are moved to a temporary folder, whose path the summary prints.
Environment: PYTHON names the Python interpreter (default: python, else python3).
Exit status: 0 all steps ok; 1 a step failed or timed out, or no CUDA GPU; 2 bad usage.
EOF
}

usage_error() {
  echo "$PROG: $* (see --help)" >&2
  exit 2
}

positive_int() {  # positive_int OPTION VALUE: VALUE as a number, or a usage error
  if [[ ! $2 =~ ^[0-9]{1,9}$ ]] || (( 10#$2 == 0 )); then
    usage_error "$1 must be a positive integer, got '$2'"
  fi
  echo $(( 10#$2 ))
}

parse_args() {
  local opt value
  while (( $# )); do
    opt=$1
    case $opt in
      -h|--help) usage; exit 0 ;;
      --data-dir|--out|--epochs|--deadline)
        (( $# >= 2 )) || usage_error "option $opt needs a value"
        value=$2; shift 2 ;;
      --data-dir=*|--out=*|--epochs=*|--deadline=*)
        value=${opt#*=}; opt=${opt%%=*}; shift ;;
      *) usage_error "unknown option '$opt'" ;;
    esac
    case $opt in
      --data-dir) [[ -n $value ]] || usage_error "--data-dir needs a folder"; DATA_DIR=$value ;;
      --out) [[ -n $value ]] || usage_error "--out needs a folder"; OUT=$value ;;
      --epochs) EPOCHS=$(positive_int "$opt" "$value") ;;
      --deadline) DEADLINE=$(positive_int "$opt" "$value") ;;
    esac
  done
}

abspath() {  # an absolute path for $1, relative to the current directory
  case $1 in
    /*) printf '%s\n' "$1" ;;
    *) printf '%s\n' "$PWD/${1#./}" ;;
  esac
}

# ---------------------------------------------------------------------------------------------
# Steps and the deadline

KILL_AFTER=10   # seconds between SIGTERM and SIGKILL when a step runs out of time
RESERVE=30      # seconds kept for the reports and the summary at the end
START=$SECONDS
declare -a STEP_LINES=()
FAILED=0
STEP_PID=""      # the running step's `timeout` process
STEP_RC=0
SIGNAL_COUNT=0
STOP_SIGNAL=""   # INT or TERM once the check is being interrupted
STOP_RC=0

say() { printf '%s\n' "$@"; }  # one line per argument

elapsed() { echo $(( SECONDS - START )); }

time_left() {  # seconds a step may still take, SIGKILL grace and final reports set aside
  echo $(( DEADLINE - (SECONDS - START) - KILL_AFTER - RESERVE ))
}

record() {  # record NAME RESULT: one line of the summary
  STEP_LINES+=("$(printf '%-14s %s' "$1" "$2")")
}

# run_step NAME LIMIT CMD...: run CMD under `timeout`, for at most LIMIT seconds and never past
# the deadline, with its output in the log; record ok / FAILED rc / TIMED OUT and the seconds.
# Returns CMD's exit status (124 when it timed out, 125 when it was skipped for lack of time).
# CMD runs in the background so that a Ctrl-C or SIGTERM reaches this script at once: the step
# is then stopped with SIGTERM (main.py saves its state), and the summary is printed.
run_step() {
  local name=$1 limit=$2 left t0 secs rc arg
  local -a shown=()
  shift 2
  left=$(time_left)
  if (( left < 5 )); then
    say "" "== $name: skipped, the ${DEADLINE}s deadline is reached"
    record "$name" "SKIPPED (deadline reached)"
    FAILED=1
    return 125
  fi
  (( limit > left )) && limit=$left
  (( limit < 1 )) && limit=1
  for arg in "$@"; do  # a Python program given with -c is shown as <code>
    [[ $arg == *$'\n'* ]] && arg='<code>'
    shown+=("$arg")
  done
  say "" "== $name (limit ${limit}s, $(elapsed)s elapsed): ${shown[*]}"
  t0=$SECONDS
  timeout --kill-after="$KILL_AFTER" "$limit" "$@" </dev/null 2>&1 &
  STEP_PID=$!
  wait_step
  STEP_PID=""
  rc=$STEP_RC
  secs=$(( SECONDS - t0 ))
  if [[ -n $STOP_SIGNAL ]]; then
    record "$name" "INTERRUPTED (SIG$STOP_SIGNAL) after ${secs}s, rc=$rc"
  elif (( rc == 124 || rc == 137 )); then
    record "$name" "TIMED OUT after ${secs}s (limit ${limit}s)"
    rc=124
  elif (( rc != 0 )); then
    record "$name" "FAILED rc=$rc after ${secs}s"
  else
    record "$name" "ok in ${secs}s"
  fi
  (( rc == 0 )) || FAILED=1
  say "== $name: rc=$rc, ${secs}s"
  if [[ -n $STOP_SIGNAL ]]; then
    say "" "gpu_check.sh: interrupted by SIG$STOP_SIGNAL"
    finish "$STOP_RC"
  fi
  return "$rc"
}

wait_step() {  # wait for STEP_PID, also through trapped signals; its exit status in STEP_RC
  local seen
  while :; do
    seen=$SIGNAL_COUNT
    STEP_RC=0
    wait "$STEP_PID" || STEP_RC=$?
    (( SIGNAL_COUNT == seen )) && break
  done
}

# py_report LIMIT CODE ARGS...: a short report in Python (not a step): a failure is a warning.
py_report() {
  local limit=$1 code=$2 left
  shift 2
  left=$(( DEADLINE - (SECONDS - START) - 2 ))
  (( limit > left )) && limit=$left
  if (( limit < 1 )); then
    say "(report skipped: deadline reached)"
    return 0
  fi
  timeout --kill-after=2 "$limit" "$PY" -c "$code" "$@" </dev/null 2>&1 \
    || say "(report failed or timed out, rc=$?)"
}

# ---------------------------------------------------------------------------------------------
# Python snippets

read -r -d '' PY_ENV <<'EOF' || true
import sys
try:
    import torch
except Exception as e:
    print(f'cannot import torch: {type(e).__name__}: {e}')
    sys.exit(4)
print(f'python {sys.version.split()[0]} ({sys.executable})')
print(f'torch {torch.__version__}, built for CUDA {torch.version.cuda}')
if not torch.cuda.is_available():
    print('torch.cuda.is_available() is False')
    sys.exit(3)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f'GPU {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability '
          f'{p.major}.{p.minor}')
print(f'bf16: {torch.cuda.is_bf16_supported()}, cuDNN {torch.backends.cudnn.version()}')
EOF

read -r -d '' PY_REQUIREMENTS <<'EOF' || true
import importlib, sys
missing = []
for name in ('torch', 'torchvision', 'numpy', 'tqdm'):
    try:
        module = importlib.import_module(name)
        print(f'{name} {getattr(module, "__version__", "?")}')
    except Exception as e:
        missing.append(name)
        print(f'{name}: cannot import ({type(e).__name__}: {e})')
try:
    import matplotlib
    print(f'matplotlib {matplotlib.__version__}')
except Exception:
    print('matplotlib: not installed (optional: there will be no curves.png)')
sys.exit(1 if missing else 0)
EOF

read -r -d '' PY_DATA <<'EOF' || true
import os, sys, time
sys.path.insert(0, os.getcwd())
from utils import load_cifar10
t0 = time.time()
try:
    train_x, train_y, test_x, test_y = load_cifar10(sys.argv[1])
except Exception as e:
    print(f'error: {e}')
    sys.exit(1)
print(f'CIFAR-10 in {sys.argv[1]}: {len(train_y)} training and {len(test_y)} test images '
      f'({time.time() - t0:.1f}s)')
EOF

# argv: RUN_DIR MODEL...: the per-epoch table of each model's log_<model>.csv
read -r -d '' PY_EPOCH_TABLE <<'EOF' || true
import csv, os, sys

def num(row, key, fmt):
    try:
        return format(float(row.get(key) or ''), fmt)
    except ValueError:
        return '-'

run_dir = sys.argv[1]
for name in sys.argv[2:]:
    path = os.path.join(run_dir, f'log_{name}.csv')
    if not os.path.exists(path):
        print(f'{name}: no {os.path.basename(path)}')
        continue
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    print(f'\n{name}')
    print(f"{'epoch':>6} {'seconds':>8} {'images/s':>9} {'train_acc':>10} {'val_acc':>8} "
          f"{'test_acc':>9}")
    for r in rows:
        print(f"{r.get('epoch', '?'):>6} {num(r, 'seconds', '.1f'):>8} "
              f"{num(r, 'images_per_s', '.0f'):>9} {num(r, 'train_acc', '.2f'):>10} "
              f"{num(r, 'val_acc', '.2f'):>8} {num(r, 'test_acc', '.2f'):>9}")
EOF

# argv: OUT: the benchmark, the epoch times and the final accuracies, compactly
read -r -d '' PY_SUMMARY <<'EOF' || true
import csv, json, os, statistics, sys
out = sys.argv[1]

def load(name):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        print(f'  (no {name})')
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        print(f'  ({name} unreadable: {e})')
        return None

print('benchmark (bench.json):')
b = load('bench.json')
if b:
    m = b.get('machine', {})
    print(f"  device {b.get('device')}, GPU {m.get('gpu')}, torch {m.get('torch')}, "
          f"torchvision {m.get('torchvision')}, {m.get('cpu_count')} CPU cores; "
          f"{b.get('total_seconds', '?')}s")
    a = b.get('loader')
    if a:
        print(f"  loader images/s: project {a['project']['images_per_s']:,.0f}, "
              f"reference {a['reference']['images_per_s']:,.0f} ({a['speedup']:.1f}x)")
    rows = b.get('train_step') or []
    for r in rows:
        base = next((q for q in rows if q['model'] == r['model'] and q['mode'] == 'fp32 NCHW'), r)
        print(f"  train step {r['model']:<8} {r['mode']:<32} {r['images_per_s']:>10,.0f} "
              f"images/s ({r['images_per_s'] / base['images_per_s']:.2f}x fp32, "
              f"{r['steps']} steps)")
    c = b.get('epoch')
    if c:
        p, ref = c['project'], c['reference']
        print(f"  one KD + baseline epoch of {p['images']} images: project {p['seconds']:.1f}s, "
              f"reference {ref['seconds']:.1f}s ({c['speedup']:.2f}x)")

print('epoch times (log_*.csv):')
for name in ('teacher', 'student_kd', 'student_base'):
    path = os.path.join(out, f'log_{name}.csv')
    if not os.path.exists(path):
        print(f'  {name:<13} (no log_{name}.csv)')
        continue
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    try:
        secs = [float(r['seconds']) for r in rows]
        ips = [float(r['images_per_s']) for r in rows]
    except (KeyError, ValueError) as e:
        print(f'  {name:<13} (unreadable: {e})')
        continue
    if not rows:
        print(f'  {name:<13} no epoch finished')
        continue
    later = secs[1:] or secs
    print(f'  {name:<13} {len(rows)} epochs in {sum(secs):.1f}s: first {secs[0]:.1f}s, then '
          f'median {statistics.median(later):.1f}s per epoch; '
          f'median {statistics.median(ips[1:] or ips):,.0f} images/s')

print('final accuracies (results.json, test set):')
r = load('results.json')
if r:
    for name, e in (r.get('models') or {}).items():
        def pct(key):
            v = e.get(key)
            return f'{v:.2f}%' if isinstance(v, (int, float)) else '-'
        best = e.get('best_epoch')
        best = best[0] if isinstance(best, list) and len(best) == 1 else best
        print(f"  {name:<13} {pct('test_acc'):>7} selected on validation (epoch {best}), "
              f"{pct('last_test_acc'):>7} last epoch; {e.get('precision')}")
    g = r.get('kd_gain')
    if g and g.get('mean') is not None:
        print(f"  KD - baseline: {g['mean']:+.2f} points")
    for phase, v in (r.get('phases') or {}).items():
        secs = v.get('train_seconds') or {}
        print(f"  {phase} phase: {', '.join(f'{float(s):.0f}s' for s in secs.values())} "
              f"of training on {(r.get('run') or {}).get('device')}")
EOF

# ---------------------------------------------------------------------------------------------
# The steps: each is one function, called once from main

check_environment() {
  local rc=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    run_step nvidia-smi 30 nvidia-smi || true
  else
    say "" "nvidia-smi: not installed"
  fi
  run_step environment 90 "$PY" -c "$PY_ENV" || rc=$?
  case $rc in
    0) ;;
    3) record cuda "NO CUDA GPU"
       say "" "gpu_check.sh: no CUDA GPU was found: torch.cuda.is_available() is False for $PY." \
           "This check needs an NVIDIA GPU, its driver and a CUDA build of PyTorch" \
           "(https://pytorch.org/get-started/locally/)."
       finish 1 ;;
    4) say "" "gpu_check.sh: PyTorch cannot be imported by $PY: pip install -r requirements.txt"
       finish 1 ;;
    *) say "" "gpu_check.sh: the environment check failed (rc=$rc); see above"
       finish 1 ;;
  esac
}

check_requirements() {
  if ! run_step requirements 90 "$PY" -c "$PY_REQUIREMENTS"; then
    say "" "gpu_check.sh: a required package is missing (see above). Install them with" \
        "  $PY -m pip install -r requirements.txt" "and run the check again."
    finish 1
  fi
}

get_data() {
  if ! run_step data 300 "$PY" -c "$PY_DATA" "$DATA_DIR"; then
    say "" "gpu_check.sh: no CIFAR-10 in $DATA_DIR (see above); stopping"
    finish 1
  fi
}

run_benchmark() {
  local limit=$(( DEADLINE / 3 < 150 ? DEADLINE / 3 : 150 ))
  run_step bench "$limit" "$PY" bench/bench.py --data-dir "$DATA_DIR" --device cuda \
    --subset 10000 --batches 100 --json "$OUT/bench.json" || true
}

run_stack_benchmark() {
  run_step stacking 60 "$PY" bench/stack_bench.py --device cuda --json "$OUT/stack.json" || true
}

run_fast_workflow() {  # its runs write under OUT/run/fast (kept with the run's folders)
  local limit=$(( $(time_left) / 3 < 180 ? $(time_left) / 3 : 180 ))
  rm -rf "${RUN:?}/fast"  # an earlier check's runs
  run_step fast "$limit" "$PY" bench/fast_bench.py --data-dir "$DATA_DIR" --device cuda \
    --seeds 0 1 2 3 4 --work-dir "$RUN/fast" --json "$OUT/fast.json" || true
}

TEACHER_OK=0
train_teacher() {
  # the teacher's epochs cost about 1.5 times the students' (both at once): 3/5 of the time left
  if run_step teacher $(( $(time_left) * 3 / 5 )) "$PY" main.py --train-teacher \
      --epochs "$EPOCHS" --data-dir "$DATA_DIR" --out-dir "$RUN" --device cuda; then
    TEACHER_OK=1
  fi
  py_report 30 "$PY_EPOCH_TABLE" "$RUN" teacher
}

train_students() {
  if (( ! TEACHER_OK )); then
    say "" "== students: skipped, the teacher did not finish"
    record students "SKIPPED (no teacher)"
    FAILED=1
    return 0
  fi
  run_step students "$(time_left)" "$PY" main.py --epochs "$EPOCHS" --data-dir "$DATA_DIR" \
    --out-dir "$RUN" --device cuda || true
  py_report 30 "$PY_EPOCH_TABLE" "$RUN" student_kd student_base
}

# Files: the small ones to OUT; the checkpoints (and whatever else the runs left at the top of
# OUT/run, such as their side files) to a temporary folder
SMALL_FILES=(results.json results.md log_teacher.csv log_student_kd.csv log_student_base.csv
             curves.png)
CHECKPOINT_DIR=""
COLLECTED=0

clean_previous() {  # the files of an earlier check
  local f
  for f in bench.json stack.json fast.json "${SMALL_FILES[@]}"; do rm -f "${OUT:?}/$f"; done
  for f in "${SMALL_FILES[@]}"; do rm -f "${RUN:?}/$f"; done
  for f in "$RUN"/best_* "$RUN"/last_*; do
    [[ -f $f ]] && rm -f "$f"
  done
  return 0
}

collect_files() {
  local f
  (( COLLECTED )) && return 0
  COLLECTED=1
  [[ -d $RUN ]] || return 0
  for f in "${SMALL_FILES[@]}"; do
    if [[ -f $RUN/$f ]]; then mv -f "$RUN/$f" "$OUT/$f"; fi
  done
  for f in "$RUN"/*; do
    [[ -f $f ]] || continue
    if [[ -z $CHECKPOINT_DIR ]]; then
      CHECKPOINT_DIR=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_checkpoints.XXXXXX") || return 0
    fi
    mv -f "$f" "$CHECKPOINT_DIR/"
  done
  rmdir "$RUN" 2>/dev/null || true
}

summary() {
  local line f
  say "" "== summary: $(elapsed)s in all (deadline ${DEADLINE}s), --epochs $EPOCHS"
  for line in ${STEP_LINES[@]+"${STEP_LINES[@]}"}; do say "  $line"; done
  if [[ -f $OUT/bench.json || -f $OUT/results.json ]]; then
    py_report 20 "$PY_SUMMARY" "$OUT"
  fi
  say "files written to $OUT:"
  for f in "$OUT"/*; do
    [[ -f $f ]] && say "$(printf '  %-22s %12s bytes' "${f##*/}" "$(wc -c <"$f" | tr -d ' ')")"
  done
  if [[ -d $RUN ]]; then
    say "  run/ (folders the runs left)"
  fi
  if [[ -n $CHECKPOINT_DIR ]]; then
    say "checkpoints (not in $OUT): $CHECKPOINT_DIR (delete it when done)"
  fi
}

finish() {  # finish RC: collect the files, print the summary, exit
  local rc=$1
  trap - INT TERM
  collect_files
  summary
  (( rc == 0 && FAILED )) && rc=1
  say "" "gpu_check.sh: exit $rc ($( (( rc == 0 )) && echo 'all steps ok' || echo 'see above'))"
  exit "$rc"
}

on_signal() {  # on_signal NAME RC: stop the running step, or finish now
  SIGNAL_COUNT=$(( SIGNAL_COUNT + 1 ))
  if [[ -z $STOP_SIGNAL ]]; then
    STOP_SIGNAL=$1
    STOP_RC=$2
  fi
  if [[ -n $STEP_PID ]] && kill -0 "$STEP_PID" 2>/dev/null; then
    say "" "gpu_check.sh: SIG$1: stopping the running step"
    kill -TERM "$STEP_PID" 2>/dev/null || true
    return 0
  fi
  say "" "gpu_check.sh: interrupted by SIG$1"
  record interrupted "SIG$1 after $(elapsed)s"
  finish "$2"
}

# The check: one function call per step. A new step is a function that calls
#   run_step NAME LIMIT_SECONDS COMMAND...
# (which applies the deadline, logs, and records the step for the summary), added here.
main() {
  trap 'on_signal INT 130' INT
  trap 'on_signal TERM 143' TERM
  say "gpu_check.sh  $(date '+%Y-%m-%dT%H:%M:%S%z')  commit $(git -C "$ROOT" rev-parse \
      --short HEAD 2>/dev/null || echo unknown)"
  say "python $PY; data $DATA_DIR; out $OUT; epochs $EPOCHS; deadline ${DEADLINE}s"
  check_environment
  check_requirements
  get_data
  run_benchmark
  run_stack_benchmark
  run_fast_workflow
  train_teacher
  train_students
  finish 0
}

parse_args "$@"
DATA_DIR=$(abspath "$DATA_DIR")
OUT=$(abspath "$OUT")
RUN=$OUT/run
PY=${PYTHON:-$(command -v python || command -v python3 || true)}
[[ -n $PY ]] || { echo "$PROG: no python or python3 on PATH; set PYTHON" >&2; exit 1; }
[[ $PY == */* ]] && PY=$(abspath "$PY")  # the steps run from the repository root
command -v timeout >/dev/null 2>&1 || { echo "$PROG: needs 'timeout' (GNU coreutils)" >&2; exit 1; }
mkdir -p "$OUT" || { echo "$PROG: cannot create $OUT" >&2; exit 1; }
clean_previous
LOG=$OUT/gpu_check.log
: >"$LOG"
cd "$ROOT"
export PYTHONUNBUFFERED=1

# All output goes to the terminal and to the log; the log keeps going after a Ctrl-C.
main 2>&1 | { trap '' INT TERM; tee -a "$LOG"; }

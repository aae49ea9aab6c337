#!/usr/bin/env bash
# Start or resume the flagship ResNet34 training run in the background (issue 20).
#
#   scripts/flagship-train.sh start  COMMIT   clone the repo at COMMIT into $FLAGSHIP_TREE, install it, start the run
#   scripts/flagship-train.sh resume          continue the run from its last checkpoint (one every $EVERY minutes)
#   scripts/flagship-train.sh pin COMMIT      move the stopped run's checkout to COMMIT (changes that keep the recipe)
#   scripts/flagship-train.sh status          epochs done, last line of the log, whether it runs
#   scripts/flagship-train.sh pause|cont      SIGSTOP / SIGCONT the run (for timing benchmarks on a shared machine)
#   scripts/flagship-train.sh stop            Ctrl-C the run and wait for it to exit (its checkpoints stay)
#
# The run trains from its own checkout ($FLAGSHIP_TREE, default ../flagship), pinned at the commit
# that holds the recipe, so later changes to training/ in the main checkout cannot change a resumed
# run. A clone, not a `git worktree`: this project's main checkout is laid anew each session, which
# would leave a worktree pointing at a git folder that is gone. The run folder ($FLAGSHIP_RUN,
# default ../flagship-runs/resnet34) is outside every checkout, so it is never committed.
#
# The process gets its own session (setsid), hence its own scheduler autogroup, whose nice value is
# lowered so that the run keeps the cores when tests or helpers run beside it: on Linux with
# autogroups, a plain `nice` only ranks processes inside one autogroup.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
TREE=${FLAGSHIP_TREE:-$here/../flagship}
RUN=${FLAGSHIP_RUN:-$here/../flagship-runs/resnet34}
DATA=${FLAGSHIP_DATA:-$here/../shared/data/cifar10}
NICE=${FLAGSHIP_AUTOGROUP_NICE:--10}
EVERY=${FLAGSHIP_CHECKPOINT_MINUTES:-10}
LOG=$RUN.log
PIDFILE=$RUN.pid

# The recipe (fixed for the whole run; `train --resume` refuses to change it):
# airbench's ResNet-18 baseline schedule on ResNet34: batch 500, Nesterov SGD, peak lr 0.2,
# triangular (one-cycle) learning rate peaking at 20 % of the steps (warm-up 5.2 of 26 epochs),
# weight decay 5e-4 (coupled L2), flip + 4-pixel reflect translate + 12-pixel cutout, and the
# trainer's default label smoothing 0.1. float32: this run's CPU has no bf16 hardware.
RECIPE=(--arch resnet34 --epochs 26 --batch-size 500 --lr 0.2 --schedule onecycle --warmup-epochs 5.2
        --cutout 12 --pad 4 --weight-decay 5e-4 --label-smoothing 0.1 --seed 0 --precision float32)

running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

launch() {
  mkdir -p "$(dirname "$RUN")"
  # oneDNN: TensorFlow turns its oneDNN kernels on by itself only on CPUs with AVX-512 VNNI or newer;
  # on an AVX2-only EPYC, ResNet34 trains at 12.5 images/s with them and 6.1 without (batch 128).
  # tcmalloc, where installed, removes most of the system time spent on large allocations.
  local preload=""
  for lib in /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4; do
    [ -e "$lib" ] && preload=$lib
  done
  {
    echo "=== $(date -u +%FT%TZ) $* (tree $(git -C "$TREE" rev-parse HEAD), preload '${preload}')"
  } >>"$LOG"
  # setsid: the run is the leader of its own session and process group (so pause/cont reach every
  # thread and child) and of its own autogroup; the pid file holds the process that becomes Python.
  (cd "$TREE" && setsid bash -c 'echo $$ >"$0"; p=$1; shift; exec env TF_ENABLE_ONEDNN_OPTS=1 LD_PRELOAD="$p" PYTHONUNBUFFERED=1 "$@"' \
     "$PIDFILE" "$preload" .venv/bin/resnet-deploy train "$@" --out "$RUN" --data "$DATA" >>"$LOG" 2>&1 </dev/null &)
  sleep 2
  echo "$NICE" >"/proc/$(cat "$PIDFILE")/autogroup" 2>/dev/null || echo "(could not set the autogroup nice value)"
  echo "started pid $(cat "$PIDFILE"), log $LOG"
}

case "${1:-}" in
  start)
    commit=${2:?"start needs the commit that holds the recipe"}
    running && { echo "the run is already going (pid $(cat "$PIDFILE"))"; exit 1; }
    if [ ! -d "$TREE/.git" ]; then git clone -q --no-hardlinks "$here" "$TREE"; fi
    git -C "$TREE" fetch -q "$here" "+refs/heads/*:refs/remotes/main/*"
    git -C "$TREE" checkout -q --detach "$commit"
    [ -x "$TREE/.venv/bin/resnet-deploy" ] || make -C "$TREE" install
    launch "${RECIPE[@]}"
    ;;
  resume)
    running && { echo "the run is already going (pid $(cat "$PIDFILE"))"; exit 1; }
    [ -x "$TREE/.venv/bin/resnet-deploy" ] || make -C "$TREE" install
    launch --resume --checkpoint-every "$EVERY"
    ;;
  pin)
    commit=${2:?"pin needs a commit"}
    running && { echo "stop the run first (kill -INT -- -\$(cat $PIDFILE)); it resumes from its last checkpoint"; exit 1; }
    git -C "$TREE" fetch -q "$here" "+refs/heads/*:refs/remotes/main/*"
    old=$(git -C "$TREE" rev-parse HEAD)
    git -C "$TREE" checkout -q --detach "$commit"
    echo "=== $(date -u +%FT%TZ) checkout moved from $old to $(git -C "$TREE" rev-parse HEAD); training/ changes:" >>"$LOG"
    git -C "$TREE" diff --stat "$old" HEAD -- resnet_deploy/training >>"$LOG"
    tail -n 12 "$LOG"
    ;;
  status)
    if running; then echo "running: pid $(cat "$PIDFILE")"; else echo "not running"; fi
    echo "tree: $TREE at $(git -C "$TREE" rev-parse --short HEAD 2>/dev/null || echo '?')"
    [ -f "$RUN/log.csv" ] && tail -n 3 "$RUN/log.csv"
    [ -f "$LOG" ] && tail -n 2 "$LOG"
    ;;
  stop)
    running || { echo "not running"; exit 0; }
    pid=$(cat "$PIDFILE"); kill -CONT -- "-$pid" 2>/dev/null; kill -INT -- "-$pid"
    for _ in $(seq 120); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    if kill -0 "$pid" 2>/dev/null; then echo "still running after 120 s (pid $pid)"; exit 1; fi
    tail -n 2 "$LOG"
    ;;
  pause) running && kill -STOP -- "-$(cat "$PIDFILE")" && echo paused ;;
  cont) running && kill -CONT -- "-$(cat "$PIDFILE")" && echo continued ;;
  *) sed -n '2,10p' "$0"; exit 2 ;;
esac

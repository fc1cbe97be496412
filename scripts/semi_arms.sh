#!/usr/bin/env bash
# The semi-supervised comparison: every arm x embedding dim x seed as its own run, then
# one markdown table (scripts/semi_table.py). Every arm but "preset" has the same steps
# (10 epochs of 100), the same labeled training images per seed (10 per class) and the
# same labeled validation split (10 per class) for model selection; "preset" is the
# shipped experiment=semi_propagation (30 epochs); the semi_propagation arms run its
# 1,000-step recipe (experiment=semi_propagation_1k, which semi_propagation_64d is in 64-D).
#
#   bash scripts/semi_arms.sh OUT_DIR [PARALLEL_RUNS] [DIMS] [SEEDS]
#   e.g. bash scripts/semi_arms.sh runs/semi 2 "2 64" "0 1 2"
# EXTRA="<overrides>" is added to every run (e.g. a smaller dataset for a quick check);
# ARMS="<arm> ..." runs only those arms.
set -euo pipefail
out=${1:?usage: semi_arms.sh OUT_DIR [PARALLEL_RUNS] [DIMS] [SEEDS]}
parallel=${2:-1}
dims=${3:-"2 64"}
seeds=${4:-"0 1 2"}
python=${PYTHON:-python}
arms=(  # the semi-supervised methods first, should a call be cut short
  "preset experiment=semi_propagation"  # the 2-D preset as shipped, also run in 64-D
  "semi_propagation experiment=semi_propagation_1k"  # the 1,000-step recipe
  "semi_views experiment=semi_views"
  "semi_propagation_weighted experiment=semi_propagation_1k semi.method.weights=true"
  "labeled_only experiment=labeled_only"
  "labeled_only_aug experiment=labeled_only augment=affine"
  "supervised_same_budget experiment=supervised_same_budget"
  "supervised_same_budget_noaug experiment=supervised_same_budget augment=none"
  "semi_kmeans experiment=semi_kmeans"
)
mkdir -p "$out/logs"
jobs=()
for dim in $dims; do
  for arm in "${arms[@]}"; do
    read -r tag overrides <<<"$arm"
    [[ -n ${ARMS:-} && " $ARMS " != *" $tag "* ]] && continue
    for seed in $seeds; do
      dir="$out/$tag/d${dim}_s${seed}"
      [[ -f $dir/summary.json ]] && continue  # done in an earlier call
      where="hydra.run.dir=$dir"
      [[ -f $dir/checkpoints/last.pt ]] && where="trainer.resume=$dir"  # interrupted
      jobs+=("$out/logs/${tag}_d${dim}_s${seed}.log|$overrides model.embedding_dim=$dim seed=$seed tag=$tag trainer.progress_bar=false $where ${EXTRA:-}")
    done
  done
done
echo "${#jobs[@]} runs, $parallel at a time"
# each job is "<log file>|<overrides>"
printf '%s\n' "${jobs[@]}" | xargs -d '\n' -n 1 -P "$parallel" sh -c \
  'log=${1%%|*}; $0 -m dmlrun ${1#*|} > "$log" 2>&1 || echo "failed (see $log): ${1#*|}"' \
  "$python"
"$python" "$(dirname "$0")/semi_table.py" "$out" | tee "$out/table.md"

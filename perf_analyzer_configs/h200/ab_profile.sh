# A/B on one GPU: workload T (gpu_profile, dummy weights) at the baseline commit (.base) and at HEAD.
source perf_analyzer_configs/h200/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
ab() {  # label dir
  for part in backend kernels client; do ln -sfn "$PWD/$2/$part" "$SITE/pagetron/$part"; done
  timeout ${SIDE_TIMEOUT:-280} python3 -m pagetron.backend.benchmarks.gpu_profile --shape llama3-8b --requests ${REQUESTS:-512} --json "$OUT/$1.json" > "$OUT/$1.log" 2>&1
  echo "$1 rc=$?"
  python3 -c "
import json; d=json.load(open('$OUT/$1.json'))
print('$1', d['seconds'], 's', d['output_tok_s'], 'tok/s', {k: (v['steps'], v['ms_per_step']) for k, v in d['steps'].items()})" || tail -20 "$OUT/$1.log"
}
ab base .base
ab head .

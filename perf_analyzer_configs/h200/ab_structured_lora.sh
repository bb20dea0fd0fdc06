# A/B on one GPU for the structured-output and multi-LoRA goals: `pagetron bench structured` (8B shape,
# concurrency 64 and 1) and `pagetron bench lora` (8B shape, 1 / 8 / 32 adapters and concurrency 1) with a
# base tree and this one, in the same call. BASE names the base: a folder holding `backend`, `kernels` and
# `client` of an older commit (default .base_e13: `git archive e13b888 backend kernels client | tar -x -C
# .base_e13`); carry it with .whl (xgrammar and jsonschema wheels, smollm2-tokenizer/). The kernel tests of
# this tree run compiled first. Results and logs in $OUT (each log's last lines, indented detail such as
# bench structured's host time by phase included); a short table last.
# Usage: [SIDES=head] [LEVELS=64] bash perf_analyzer_configs/h200/ab_structured_lora.sh [parts: kernels,structured,lora,sweep]
# (sweep: this tree's LoRA kernel launch sweep, lora_kernel_sweep.py, after the other parts)
# (SIDES=head: this tree alone, the ratios being within one run; LEVELS: the structured concurrencies;
#  FILL_MODES="auto off": this tree's structured runs also with the masks filled on the engine thread)
source perf_analyzer_configs/h200/env.sh
PARTS=${1:-kernels,structured,lora}
BASE=${BASE:-.base_e13}
SIDES=${SIDES:-base head}
LEVELS=${LEVELS:-64 1}
FILL_MODES=${FILL_MODES:-auto}
TOKENIZER=.whl/smollm2-tokenizer
summary=()
use() { for part in backend kernels client; do ln -sfn "$PWD/$1/$part" "$SITE/pagetron/$part"; done; }
run() {  # name, command...
  local name=$1; shift
  local start=$SECONDS
  local limit=${PART_TIMEOUT:-240}
  [[ $name == lora-* ]] && limit=${LORA_TIMEOUT:-480}  # four engines on workload T, 32 adapters written
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-22s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - start))" "$(grep -v '^    ' "$OUT/$name.log" | tail -n 1 | cut -c1-110)")")
}
nvidia-smi --query-gpu=name --format=csv,noheader
git log -1 --format=%h 2>/dev/null || true
if [[ $PARTS == *kernels* ]]; then
  use .
  run kernels python3 -m pytest -q -p no:cacheprovider tests/kernels/test_kernel_token_bitmask.py \
    tests/kernels/test_kernel_lora.py tests/kernels/test_kernel_rms_norm.py tests/kernels/test_kernel_silu_and_mul.py \
    tests/test_lora.py -k "kernel or cuda or graph or side_stream or delta"
fi
for side in $SIDES; do
  if [[ $side == base ]]; then use "$BASE"; else use .; fi
  if [[ $PARTS == *structured* ]]; then
    for level in $LEVELS; do
      requests=$(( level == 1 ? 6 : 6 * level ))
      for fill in $FILL_MODES; do
        [[ $fill != auto && $side == base ]] && continue  # the base tree has no --fill-on-thread
        name="structured-c$level-$side"; [[ $fill != auto ]] && name="$name-fill-$fill"
        flag=(); [[ $fill != auto ]] && flag=(--fill-on-thread "$fill")
        run "$name" python3 -m pagetron.backend.cli bench structured --shape llama3-8b \
          --tokenizer "$TOKENIZER" --concurrency "$level" --requests "$requests" --max-tokens 128 \
          "${flag[@]}" --json "$OUT/$name.json"
      done
    done
  fi
  if [[ $PARTS == *lora* ]]; then
    # this tree: workload T (the issue's workload) and a kernel table; the base tree has neither option
    if [[ $side == head ]]; then load="--workload-t --profile"; else load="--requests 256 --prompt-len 512 --max-tokens 128"; fi
    run "lora-$side" python3 -m pagetron.backend.cli bench lora --shape llama3-8b --adapters 1,8,32 \
      $load --max-num-seqs 128 --kv-cache-memory-gb 16 --json "$OUT/lora-$side.json"
  fi
done
use .
if [[ $PARTS == *sweep* ]]; then
  run sweep-lora python3 -m pagetron.backend.benchmarks.lora_kernel_sweep --json "$OUT/lora-sweep.json"
fi
for f in "$OUT"/*.log; do echo "== $f"; tail -n 12 "$f"; done
printf '%s\n' "${summary[@]}"

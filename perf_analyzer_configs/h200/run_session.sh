# One H200 call: the CUDA kernel tests, workload T with a per-step profile (13B shape; bf16, then fp8 KV),
# and workload L through tritonserver (13B shape). Results land in $OUT; a short table prints last.
# Usage (device tool, carrying .whl and .whl_ptt): bash perf_analyzer_configs/h200/run_session.sh [parts]
# parts (comma-separated): tests, profile, fp8, served, bench-llama2-13b, bench-llama3-8b, openai
source perf_analyzer_configs/h200/env.sh
PARTS=${1:-tests,profile,fp8,served}
summary=()
run() {  # name, command...: runs one part with its log under $OUT
  local name=$1; shift
  local start=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-22s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - start))" "$(tail -n 1 "$OUT/$name.log" | cut -c1-90)")")
}
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader
if [[ $PARTS == *tests* ]]; then
  for t in tests/kernels/test_*.py; do
    run "cuda-$(basename "$t" .py)" python3 -m pytest -q -p no:cacheprovider -k cuda "$t"
  done
fi
if [[ $PARTS == *profile* ]]; then
  run profile-13b-bf16 python3 -m pagetron.backend.benchmarks.gpu_profile --shape llama2-13b --json "$OUT/profile-13b-bf16.json"
fi
if [[ $PARTS == *fp8* ]]; then
  run profile-13b-fp8 python3 -m pagetron.backend.benchmarks.gpu_profile --shape llama2-13b \
    --engine-args '{"kv_cache_dtype": "fp8"}' --json "$OUT/profile-13b-fp8.json"
fi
for shape in llama2-13b llama3-8b; do  # parts bench-llama2-13b, bench-llama3-8b: workloads T, P and HF baselines
  if [[ $PARTS == *bench-$shape* ]]; then
    run "bench-$shape" python3 -m pagetron.backend.cli bench gpu --shape "$shape" --json "$OUT/bench-$shape.json"
  fi
done
if [[ $PARTS == *served* ]]; then
  run served-13b python3 -m pagetron.backend.cli bench gpu-served --shape llama2-13b --json "$OUT/served-13b.json"
fi
if [[ $PARTS == *openai* ]]; then  # the OpenAI frontend's overhead, dummy weights with SmolLM2's tokenizer
  python3 - <<'PY'
import json, pathlib, shutil
src, dst = pathlib.Path(".whl_ptt/models/smollm2"), pathlib.Path("/tmp/llama3-8b-v49k")
shutil.copytree(src, dst, dirs_exist_ok=True)
config = json.loads((src / "config.json").read_text())
config.update(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
              intermediate_size=14336, head_dim=128, tie_word_embeddings=False)
(dst / "config.json").write_text(json.dumps(config))
PY
  for run in ${OPENAI_RUNS:-llama3-8b-v49k:stream llama3-8b-v49k:no-stream smollm2:stream smollm2:no-stream}; do
    name=${run%%:*} mode=${run##*:}
    model=$([ "$name" = smollm2 ] && echo .whl_ptt/models/smollm2 || echo "/tmp/$name")
    {
      flag=$([ "$mode" = no-stream ] && echo --no-stream)
      run "openai-$name-$mode" python3 -m pagetron.backend.cli bench openai-overhead --model "$model" \
        --load-format dummy --concurrency 32 --num-requests ${OPENAI_REQUESTS:-256} --output-len 128 --rounds ${OPENAI_ROUNDS:-3} $flag \
        --json "$OUT/openai-$name-$mode.json"
    }
  done
fi
for f in "$OUT"/profile-*.json; do
  [ -e "$f" ] && python3 -c "
import json, sys
d = json.load(open('$f'))
print('$(basename "$f")', d['seconds'], 's', d['output_tok_s'], 'tok/s preempt', d['preemptions'], 'blocks', d['kv_blocks'],
      {k: (v['steps'], v['ms_per_step']['step'], v['ms_per_step']['forward']) for k, v in d['steps'].items()})"
done
[ -e "$OUT/served-13b.log" ] && tail -n 8 "$OUT/served-13b.log"
for f in "$OUT"/bench-*.log; do [ -e "$f" ] && tail -n 12 "$f"; done
for f in "$OUT"/openai-*.log; do [ -e "$f" ] && echo "$(basename "$f")" && tail -n 5 "$f"; done
printf '%s\n' "${summary[@]}"

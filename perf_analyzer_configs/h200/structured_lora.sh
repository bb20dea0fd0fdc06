# One GPU call for the structured-output and multi-LoRA issues: the LoRA kernel tests compiled (and in a
# CUDA graph), `pagetron bench structured` and `pagetron bench lora` on the Llama-3-8B shape (dummy
# weights). Carry .whl (xgrammar, apache-tvm-ffi, jsonschema, pydantic wheels for cp312). Results in $OUT.
# Usage: bash perf_analyzer_configs/h200/structured_lora.sh [parts: kernels,structured,lora]
source perf_analyzer_configs/h200/env.sh
PARTS=${1:-kernels,structured,lora}
summary=()
run() {  # name, command...
  local name=$1; shift
  local start=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-16s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - start))" "$(tail -n 1 "$OUT/$name.log" | cut -c1-100)")")
}
nvidia-smi --query-gpu=name --format=csv,noheader
git log -1 --format=%h 2>/dev/null || true
if [[ $PARTS == *kernels* ]]; then
  run kernel-lora python3 -m pytest -q -p no:cacheprovider tests/kernels/test_kernel_lora.py
fi
if [[ $PARTS == *structured* ]]; then
  run structured-8b python3 -m pagetron.backend.cli bench structured --shape llama3-8b --concurrency 1,64 \
    --requests 64 --max-tokens 64 --json "$OUT/structured-8b.json"
fi
if [[ $PARTS == *lora* ]]; then
  run lora-8b python3 -m pagetron.backend.cli bench lora --shape llama3-8b --adapters 1,8,32 --requests 64 \
    --max-num-seqs 32 --json "$OUT/lora-8b.json"
fi
for f in "$OUT"/*.log; do echo "== $f"; tail -n 6 "$f"; done
printf '%s\n' "${summary[@]}"

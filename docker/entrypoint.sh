#!/usr/bin/env bash
# Serves $MODEL (a Hugging Face folder, a .gguf file, or a folder holding one .gguf) as Triton model `llm`.
# ENGINE_ARGS, a JSON object, is merged over model_repository/llm/1/engine_args.json (the model rejects
# unknown keys when it loads). Arguments to this script are passed on to tritonserver.
set -euo pipefail

if [[ ! -e "$MODEL" ]]; then
    echo "pagetron: MODEL=$MODEL does not exist; mount the model there (docker run -v /path:/models ...)" >&2
    exit 2
fi

repository="$(mktemp -d /tmp/pagetron-repository.XXXXXX)"
cp -r /opt/pagetron/model_repository/. "$repository/"
python3 - "$repository/llm/1/engine_args.json" "$MODEL" "$ENGINE_ARGS" <<'PY'
import json
import sys

path, model, overrides = sys.argv[1:]
try:
    extra = json.loads(overrides)
except json.JSONDecodeError as error:
    sys.exit(f"pagetron: ENGINE_ARGS is not valid JSON: {error}")
if not isinstance(extra, dict):
    sys.exit("pagetron: ENGINE_ARGS must be a JSON object")
if "model" in extra:
    sys.exit("pagetron: set the model with MODEL, not ENGINE_ARGS")
with open(path) as f:
    args = json.load(f)
args.update(extra, model=model)
with open(path, "w") as f:
    json.dump(args, f, indent=2)
print(f"pagetron: engine arguments {json.dumps(args)}", file=sys.stderr)
PY

# Port 8000 is nginx, Pagetron's HTTP guard (backend/serving/http_guard.py): it refuses request bodies over
# MAX_REQUEST_BYTES (default: 1 MiB + 128 bytes per token of max_model_len) with 413 before reading them,
# and never hands Triton a form-urlencoded body (tritonserver 2.51 segfaults on a large one); everything
# else passes through unchanged. Triton's own HTTP listener stays on 127.0.0.1:8010. The guard runs
# tritonserver as its child: SIGTERM goes to tritonserver, its exit code is the container's, and nginx
# and the stubs go down with it.
if [[ -n "${MAX_REQUEST_BYTES:-}" ]]; then
    limit=(--max-request-bytes "$MAX_REQUEST_BYTES")
else
    limit=(--engine-args-file "$repository/llm/1/engine_args.json")
fi
guard_dir="$(mktemp -d /tmp/pagetron-http-guard.XXXXXX)"

# Explicit model control lets an engine that stopped making progress unload itself, so readiness is honest.
exec python3 -m pagetron.backend.serving.http_guard \
    --host 0.0.0.0 --port 8000 --upstream-port 8010 --workdir "$guard_dir" "${limit[@]}" -- \
    tritonserver \
    --model-repository="$repository" \
    --model-control-mode=explicit \
    --load-model=llm \
    --http-address=127.0.0.1 \
    --http-port=8010 \
    --grpc-port=8001 \
    --metrics-port=8002 \
    "$@"

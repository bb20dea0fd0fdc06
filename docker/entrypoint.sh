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

# Explicit model control lets an engine that stopped making progress unload itself, so readiness is honest.
exec tritonserver \
    --model-repository="$repository" \
    --model-control-mode=explicit \
    --load-model=llm \
    --http-port=8000 \
    --grpc-port=8001 \
    --metrics-port=8002 \
    "$@"

"""The readiness probe of docker/k8s/deployment.yaml, run against the real tritonserver: it passes only
when the model generates a token, and fails naming why once the model is gone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

DEPLOYMENT = Path(__file__).resolve().parents[2] / "docker" / "k8s" / "deployment.yaml"


def probe_script(port: int) -> str:
    docs = yaml.safe_load_all(DEPLOYMENT.read_text())
    deployment = next(d for d in docs if d and d["kind"] == "Deployment")
    [container] = [c for c in deployment["spec"]["template"]["spec"]["containers"] if "readinessProbe" in c]
    python, flag, script = container["readinessProbe"]["exec"]["command"]
    assert (python, flag) == ("python3", "-c") and "127.0.0.1:8000" in script
    return script.replace("127.0.0.1:8000", f"127.0.0.1:{port}")


def run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)


def test_the_readiness_probe_generates_a_token_on_the_real_server(triton_server):
    port = int(triton_server.http_url.rsplit(":", 1)[1])
    done = run(probe_script(port))
    assert done.returncode == 0, done.stderr
    missing = run(probe_script(port).replace("/models/llm/", "/models/no_such_model/"))
    assert missing.returncode != 0 and "HTTP Error 404" in missing.stderr, missing.stderr

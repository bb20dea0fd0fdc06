"""docker/k8s/ manifests: valid Kubernetes objects, and in agreement with the code and image they deploy.

There is no cluster here, so this offline check is their only one, as hadolint is the Dockerfile's
(test_docker_lint.py). Core objects are validated with kubernetes-validate in strict mode (an unknown or
misspelt field fails, as it does under kubectl's default --validate=strict). The LeaderWorkerSet, a custom
resource, is validated against its CRD's schema (tests/data/, trimmed from LWS v0.10.0) with jsonschema,
and its pod templates as core/v1 PodTemplateSpecs. The cross-checks below fail for real mistakes: a
selector that matches nothing, a probe on a missing port, engine arguments the engine would refuse,
`pagetron worker` flags that do not parse or disagree with the leader's engine.

A missing kubernetes-validate fails the test: CI installs it, and a skipped check would look like a pass.
"""

from __future__ import annotations

import copy
import http.server
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import jsonschema
import pytest
import yaml

try:
    import kubernetes_validate
except ImportError:
    pytest.fail(
        "kubernetes-validate not installed: pip install kubernetes-validate (pinned in requirements.txt)",
        pytrace=False,
    )

from pagetron.backend.core.config import EngineConfig

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "docker" / "k8s"
# The oldest release the manifests are meant for (nothing newer may be needed) and the newest that
# kubernetes-validate 1.37.0 ships (nothing since removed may be used).
K8S_VERSIONS = ("1.35", "1.37")
LWS_SCHEMA = REPO / "tests" / "data" / "lws-v0.10.0-leaderworkerset.schema.json"
IMAGE_UID = 1000  # docker/Dockerfile: USER 1000:1000
TRITON_EXIT_TIMEOUT_S = 30  # tritonserver's default --exit-timeout-secs
GPU = "nvidia.com/gpu"
VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def load(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def one(name: str, kind: str) -> dict:
    (doc,) = [d for d in load(name) if d["kind"] == kind]
    return doc


def all_documents() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in sorted(K8S.glob("*.yaml")) for doc in load(path.name)]


DEPLOYMENT = one("deployment.yaml", "Deployment")
SERVICE = one("service.yaml", "Service")
HPA = one("hpa.yaml", "HorizontalPodAutoscaler")
LWS = one("leaderworkerset.yaml", "LeaderWorkerSet")
LEADER_SERVICE = one("leaderworkerset.yaml", "Service")
LWS_SIZE = LWS["spec"]["leaderWorkerTemplate"]["size"]
LEADER = LWS["spec"]["leaderWorkerTemplate"]["leaderTemplate"]
WORKER = LWS["spec"]["leaderWorkerTemplate"]["workerTemplate"]
# every pod template, with the variables LWS puts first in each container's env (pod index 0 = leader)
POD_TEMPLATES = {"deployment": DEPLOYMENT["spec"]["template"], "lws leader": LEADER, "lws worker": WORKER}


def lws_env(index: int) -> dict[str, str]:
    """What the LWS webhook injects (pkg/utils/pod/pod_utils.go AddLWSVariables), for group 0."""
    name = LWS["metadata"]["name"]
    return {
        "LWS_LEADER_ADDRESS": f"{name}-0.{name}.default",
        "LWS_GROUP_SIZE": str(LWS_SIZE),
        "LWS_WORKER_INDEX": str(index),
    }


def injected_env(template: str, index: int = 0) -> dict[str, str]:
    return lws_env(index) if template.startswith("lws") else {}


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion; an unknown name would be left as is, silently, so it fails here."""

    def value(m: re.Match) -> str:
        assert m[1] in env, f"$({m[1]}) in {text!r} names no variable defined before it"
        return env[m[1]]

    return VAR_REF.sub(value, text)


def container_env(container: dict, injected: dict[str, str]) -> dict[str, str]:
    env = dict(injected)
    for var in container.get("env", []):
        env[var["name"]] = expand(var["value"], env)  # only variables defined earlier expand
    return env


def is_triton(container: dict) -> bool:
    """Runs the image's entrypoint (tritonserver), as opposed to another command of the image."""
    return "command" not in container


def triton_containers() -> list[tuple[str, dict]]:
    return [(name, c) for name, t in POD_TEMPLATES.items() for c in t["spec"]["containers"] if is_triton(c)]


def effective_engine_args(container: dict, injected: dict[str, str]) -> dict:
    """What docker/entrypoint.sh hands the model: engine_args.json, ENGINE_ARGS over it, MODEL."""
    env = container_env(container, injected)
    extra = json.loads(env["ENGINE_ARGS"])
    assert isinstance(extra, dict) and "model" not in extra  # the entrypoint refuses both
    args = json.loads((REPO / "model_repository" / "llm" / "1" / "engine_args.json").read_text())
    args.update(extra, model=env["MODEL"])
    return args


# ---- schema validation ---------------------------------------------------------------------------------
CORE = [(f, d) for f, d in all_documents() if d["kind"] != "LeaderWorkerSet"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("doc", [d for _, d in CORE], ids=[f"{f}:{d['kind']}" for f, d in CORE])
def test_core_objects_validate_strictly(doc, version):
    assert kubernetes_validate.validate(doc, version, strict=True) == version


def strict(schema):
    """additionalProperties: false on every object that lists its properties, as the API server's strict
    field validation rejects unknown fields of a custom resource (structural schemas prune them)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def lws_validator():
    schema = strict(json.loads(LWS_SCHEMA.read_text()))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def pod_template(metadata: dict, template: dict) -> dict:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": metadata, "template": template}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_leaderworkerset_validates(lws_validator, version):
    assert LWS["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    lws_validator.validate(LWS)
    # the object's metadata and both pod templates, as core/v1 sees them
    for template in (LEADER, WORKER):
        kubernetes_validate.validate(pod_template(LWS["metadata"], template), version, strict=True)


def test_validators_catch_mistakes(lws_validator):
    # guards against a validation that passes because it checks nothing
    bad = copy.deepcopy(DEPLOYMENT)
    container = bad["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    kubernetes_validate.validate(bad, K8S_VERSIONS[0])  # not strict: an unknown field passes
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)
    bad = copy.deepcopy(DEPLOYMENT)
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)

    bad = copy.deepcopy(LWS)
    bad["spec"]["leaderWorkerTemplate"]["sise"] = bad["spec"]["leaderWorkerTemplate"].pop("size")
    with pytest.raises(jsonschema.ValidationError, match="sise"):
        lws_validator.validate(bad)
    bad = copy.deepcopy(LWS)
    bad["spec"]["startupPolicy"] = "LeaderStarted"
    with pytest.raises(jsonschema.ValidationError, match="LeaderStarted"):
        lws_validator.validate(bad)
    bad = copy.deepcopy(WORKER)
    bad["spec"]["containers"][0]["args"] = "--node-rank=1"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod_template(LWS["metadata"], bad), K8S_VERSIONS[0], strict=True)


# ---- selectors, ports, probes ----------------------------------------------------------------------------
def selects(selector: dict, template: dict) -> bool:
    labels = template["metadata"].get("labels", {})
    return all(labels.get(k) == v for k, v in selector.items())


def container_ports(template: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}


def test_services_select_the_right_pods_and_ports():
    template = DEPLOYMENT["spec"]["template"]
    assert selects(DEPLOYMENT["spec"]["selector"]["matchLabels"], template)
    assert HPA["spec"]["scaleTargetRef"] == {
        "apiVersion": DEPLOYMENT["apiVersion"],
        "kind": "Deployment",
        "name": DEPLOYMENT["metadata"]["name"],
    }
    for service, pods in ((SERVICE, "deployment"), (LEADER_SERVICE, "lws leader")):
        selector = service["spec"]["selector"]
        assert [n for n, t in POD_TEMPLATES.items() if selects(selector, t)] == [pods]
        ports = container_ports(POD_TEMPLATES[pods])
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{service['metadata']['name']}: no container port {port}"
            assert ports[port["targetPort"]] == port["port"]  # same numbers inside and out
    # LWS names its own headless Service (the pods' DNS, LWS_LEADER_ADDRESS) after the LeaderWorkerSet
    assert LEADER_SERVICE["metadata"]["name"] != LWS["metadata"]["name"]


def probes(container: dict) -> dict[str, dict]:
    return {k: container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in container}


@pytest.mark.parametrize("name", POD_TEMPLATES)
def test_probes_use_ports_that_exist(name):
    for container in POD_TEMPLATES[name]["spec"]["containers"]:
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        for kind, probe in probes(container).items():
            for handler in ("httpGet", "tcpSocket", "grpc"):
                if handler in probe:
                    port = probe[handler]["port"]
                    assert port in ports or port in ports.values(), f"{name} {kind}: no port {port!r}"
            if "exec" in probe:
                command = " ".join(probe["exec"]["command"])
                if re.search(r"pagetron(\.backend\.cli)? probe", command):
                    # the gRPC probe imports tritonclient; a probe that cannot run never passes
                    assert "tritonclient" in (REPO / "docker" / "Dockerfile").read_text()


def test_triton_pods_are_probed_and_drained():
    assert [n for n, _ in triton_containers()] == ["deployment", "lws leader"]
    for name, container in triton_containers():
        assert set(probes(container)) == {"startupProbe", "readinessProbe", "livenessProbe"}, name
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, name  # first load, warm-up
        pause = container["lifecycle"]["preStop"]["exec"]["command"]
        assert pause[0] == "sleep"
        grace = POD_TEMPLATES[name]["spec"]["terminationGracePeriodSeconds"]
        assert grace > int(pause[1]) + TRITON_EXIT_TIMEOUT_S, name
    assert "readinessProbe" not in WORKER["spec"]["containers"][0]  # no Triton there


class StubTriton(http.server.BaseHTTPRequestHandler):
    answer: tuple[int, dict] = (200, {})
    seen: list[tuple[str, dict]] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, body))
        status, reply = self.answer
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def stub_triton():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StubTriton)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("name", ["deployment", "lws leader"])
def test_readiness_probe_generates_one_token(stub_triton, name):
    (container,) = [c for n, c in triton_containers() if n == name]
    probe = container["readinessProbe"]
    command = probe["exec"]["command"]
    assert command[:2] == ["python3", "-c"]
    script = command[2]
    url = "http://127.0.0.1:8000/v2/models/llm/generate"
    assert url in script and container_ports(POD_TEMPLATES[name])["http"] == 8000
    timeout = int(re.search(r"timeout=(\d+)", script)[1])
    assert probe["timeoutSeconds"] > timeout  # the script says why it failed before the kubelet gives up
    script = script.replace("127.0.0.1:8000", f"127.0.0.1:{stub_triton.server_port}")

    def run(status: int, reply: dict) -> subprocess.CompletedProcess:
        StubTriton.answer, StubTriton.seen = (status, reply), []
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
        (path, body) = StubTriton.seen[0]
        assert path == "/v2/models/llm/generate"
        assert json.loads(body["sampling_parameters"])["max_tokens"] == 1
        assert body["return_num_output_tokens"] is True
        return done

    assert run(200, {"text_output": "!", "num_output_tokens": [1]}).returncode == 0
    assert run(200, {"text_output": "!", "num_output_tokens": 1}).returncode == 0
    failed = run(200, {"text_output": "", "num_output_tokens": [0]})
    assert failed.returncode == 1 and "expected 1 generated token" in failed.stderr
    assert run(400, {"error": "model 'llm' is not ready"}).returncode != 0
    assert run(200, {"text_output": "no count"}).returncode != 0


# ---- the image, the engine and the metrics the manifests rely on ------------------------------------------
def test_triton_env_is_what_the_entrypoint_reads():
    entrypoint = (REPO / "docker" / "entrypoint.sh").read_text()
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["/opt/pagetron/entrypoint.sh"]' in dockerfile
    assert f"USER {IMAGE_UID}:{IMAGE_UID}" in dockerfile
    read = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", entrypoint))
    assert {"MODEL", "ENGINE_ARGS", "MAX_REQUEST_BYTES"} <= read
    for name, container in triton_containers():
        names = {v["name"] for v in container["env"]}
        assert {"MODEL", "ENGINE_ARGS"} <= names <= read, f"{name}: {names - read} unknown to the entrypoint"


@pytest.mark.parametrize("name", POD_TEMPLATES)
def test_pods_run_as_the_image_user_with_shared_memory(name):
    spec = POD_TEMPLATES[name]["spec"]
    context = spec["securityContext"]
    assert context["runAsNonRoot"] and context["runAsUser"] == IMAGE_UID
    shm = [v["name"] for v in spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
    for container in spec["containers"]:
        assert any(m["name"] in shm and m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])


@pytest.mark.parametrize("name", ["deployment", "lws leader"])
def test_engine_args_are_real_engine_arguments(name):
    (container,) = [c for n, c in triton_containers() if n == name]
    config = EngineConfig.from_dict(effective_engine_args(container, injected_env(name)))
    gpus = container["resources"]["limits"][GPU]
    assert container["resources"]["requests"][GPU] == gpus  # Kubernetes requires them equal
    assert gpus == config.tensor_parallel_size // config.nnodes  # one GPU per rank of this host


def test_metrics_the_hpa_scales_on_are_exported():
    source = (REPO / "backend" / "serving" / "triton_metrics.py").read_text()
    exported = set(re.findall(r'"(vllm:[a-z_]+)"', source))
    names = [m["pods"]["metric"]["name"] for m in HPA["spec"]["metrics"]]
    assert names == ["vllm_num_requests_waiting", "vllm_gpu_cache_usage_perc"]
    for metric in names:  # prometheus-adapter's rule renames vllm:<rest> to vllm_<rest>
        assert metric.replace("vllm_", "vllm:", 1) in exported
    spec = HPA["spec"]
    assert 1 <= spec["minReplicas"] <= spec["maxReplicas"]
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


# ---- multi-host tensor parallelism ------------------------------------------------------------------------
def run_pagetron(monkeypatch, argv: list[str]) -> tuple[object, dict]:
    """Parse argv with the real `pagetron` command line; returns what `pagetron worker` would run with."""
    import pagetron.backend.cli.worker as worker_cli
    from pagetron.backend.cli import main

    got = {}
    monkeypatch.setattr(worker_cli, "run_worker", lambda ns, args: got.update(ns=ns, args=args) or 0)
    assert main(argv) == 0
    return got["ns"], got["args"]


def test_lws_workers_join_the_leaders_engine(monkeypatch):
    # with LeaderReady, the workers would wait for a leader that waits for them
    assert LWS["spec"]["startupPolicy"] == "LeaderCreated"
    assert LWS["spec"]["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"
    (leader,) = LEADER["spec"]["containers"]
    leader_args = effective_engine_args(leader, lws_env(0))
    leader_config = EngineConfig.from_dict(leader_args)
    assert leader_config.nnodes == LWS_SIZE >= 2
    host, _, port = leader_config.dist_init_addr.rpartition(":")
    assert host == lws_env(0)["LWS_LEADER_ADDRESS"]
    assert int(port) in container_ports(LEADER).values()

    (worker,) = WORKER["spec"]["containers"]
    assert worker["command"] == ["python3", "-m", "pagetron.backend.cli", "worker"]
    for index in range(1, LWS_SIZE):
        env = container_env(worker, lws_env(index))
        argv = [expand(a, env) for a in worker["command"][3:] + worker["args"]]
        ns, args = run_pagetron(monkeypatch, argv)
        assert ns.node_rank == index
        # its ranks build the model and KV cache from these: they must be the leader's
        assert EngineConfig.from_dict(args) == leader_config, f"worker flags {args} != leader's {leader_args}"
        gpus = worker["resources"]["limits"][GPU]
        assert worker["resources"]["requests"][GPU] == gpus
        assert gpus == leader_config.tensor_parallel_size // leader_config.nnodes


def test_the_ingress_refuses_the_bodies_the_http_guard_refuses():
    """Both limits are one number: ingress-nginx's proxy-body-size and the pods' MAX_REQUEST_BYTES."""
    ingress = one("ingress.yaml", "Ingress")
    size = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    number, unit = re.fullmatch(r"(\d+)([kKmMgG]?)", size).groups()
    limit = int(number) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[unit.lower()]
    for name, container in triton_containers():
        assert int(container_env(container, injected_env(name))["MAX_REQUEST_BYTES"]) == limit, name
    [rule] = ingress["spec"]["rules"]
    [path] = rule["http"]["paths"]
    backend = path["backend"]["service"]
    assert backend["name"] == SERVICE["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in SERVICE["spec"]["ports"]}

"""The deployment files, checked offline: no Docker engine, no cluster, no network.

- docker-compose.yml: `docker compose config` (or Debian's `docker-compose config`) validates
  it against the Compose schema; then its wiring is read with PyYAML (replicas, ports, mounts,
  the proxy's flags parsed by batchproxy's own command line).
- Dockerfile and .dockerignore: the build context is computed the way Docker computes it, and
  the package is built from exactly that context (what `COPY` takes), without Docker.
- deploy/kubernetes: every manifest against the Kubernetes OpenAPI schemas that
  kubernetes-validate bundles (strict: unknown fields fail), then their wiring.
- deploy/prometheus: `promtool check config`.
- deploy/grafana: the dashboard's PromQL parses (`promtool check rules`) and queries only
  series and labels that `batchproxy.metrics.ProxyMetrics` exports; every series it exports
  has a panel.
- deploy/export_demo_model.py: the SavedModel it writes has the classic MNIST signature and
  answers like the reference replica's demo model (in a subprocess: TensorFlow's protobuf
  classes share names with batchproxy's).

Tools that come from Debian (docker-compose, promtool) are installed by .ci/run; without them
a test is skipped locally and fails in CI."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
import zipfile
from functools import cache
from pathlib import Path

import pytest
import yaml
from prometheus_client import Gauge
from prometheus_client.metrics import MetricWrapperBase

from batchproxy import cli
from batchproxy.config import ProxyConfig
from batchproxy.metrics import ProxyMetrics
from batchproxy.readiness import Readiness

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = ROOT / "docker-compose.yml"
K8S_DIR = DEPLOY / "kubernetes"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "batchproxy.json"
GRAFANA_PROVISIONING = DEPLOY / "grafana" / "provisioning"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
TFS_MONITORING = DEPLOY / "tfs" / "monitoring.config"
MODEL_NAME = "my_mnist_model"
TFS_SERVICES = ("tfs-a", "tfs-b")

# Kubernetes versions the manifests must validate against: the oldest we claim (autoscaling/v2,
# policy/v1 and everything else used are GA there) and the newest whose schemas are bundled.
K8S_OLDEST = "1.27.0"


def require_tool(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path is not None:
            return path
    message = f"{' or '.join(names)} not installed"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; .ci/run installs it")
    pytest.skip(message)


def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False,
                          **kwargs)  # type: ignore[call-overload]


def parse_serve_args(argv: list[str]) -> ProxyConfig:
    """Parses a container's arguments with batchproxy's own command line: an unknown or
    misspelt flag fails here, not at start-up in a cluster. Abbreviations, which argparse
    would accept, are refused too: a new flag can make one ambiguous."""
    assert argv[0] == "serve", argv
    exact = argparse.ArgumentParser(allow_abbrev=False)
    cli.add_serve_arguments(exact)
    _, unknown = exact.parse_known_args(argv[1:])
    assert not unknown, f"not batchproxy serve's flags (abbreviated?): {unknown}"
    return cli.proxy_config(cli.build_parser().parse_args(argv))


def duration_s(text: str | int | float) -> float:
    """A Compose duration (30s, 1m30s, 500ms) or a plain number of seconds."""
    if isinstance(text, int | float):
        return float(text)
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text, text
    return sum(float(n) * units[u] for n, u in parts)


def health_paths() -> set[str]:
    return {route.path for route in Readiness(None).routes()}  # type: ignore[arg-type]


def metrics_paths() -> set[str]:
    return {route.path for route in ProxyMetrics().routes()}


def tfs_monitoring_path(text: str) -> str:
    assert re.search(r"enable\s*:\s*true", text)
    match = re.search(r'path\s*:\s*"([^"]+)"', text)
    assert match, text
    return match.group(1)


# -- docker-compose.yml ---------------------------------------------------------------------


def compose_command() -> list[str]:
    """Compose v2 (the docker CLI plugin) when it is there, else Debian's docker-compose 1.29;
    `config` needs no Docker engine with either."""
    docker = shutil.which("docker")
    if docker and run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    return [require_tool("docker-compose")]


@cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def bind_mounts(service: dict) -> dict[str, str]:
    """container path -> host path (relative to the repository) of a service's bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        mounts[target] = posixpath.normpath(source)
    return mounts


def test_compose_file_is_valid() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    result = run([*compose_command(), "-f", str(COMPOSE_FILE), "config", "-q"], cwd=ROOT,
                 env=env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_test_override_is_valid_and_all_on_the_host_network(tmp_path: Path) -> None:
    """tests/docker/compose.override.yml, which `make test-docker` layers on
    docker-compose.yml: valid together, and every service on the host's network (that test's
    Docker daemon has no bridge)."""
    override = ROOT / "tests" / "docker" / "compose.override.yml"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    env.update({name: "1" for name in ("BP_REPLICA_A_PORT", "BP_REPLICA_B_PORT",
                                       "BP_GRPC_PORT", "BP_REST_PORT", "BP_PROMETHEUS_PORT")})
    env.update(BP_EMPTY_DIR=str(tmp_path), BP_PROMETHEUS_CONFIG=str(tmp_path / "p.yml"))
    result = run([*compose_command(), "-f", str(COMPOSE_FILE), "-f", str(override), "config"],
                 cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert {name: s.get("network_mode") for name, s in services.items()} == {
        name: "host" for name in services}
    assert services["tfs-a"]["image"] == services["batchproxy"]["image"]


def test_compose_tfs_replicas_serve_the_model_directory() -> None:
    services = compose()["services"]
    assert set(services) == {*TFS_SERVICES, "batchproxy", "prometheus", "grafana"}
    for name in TFS_SERVICES:
        tfs = services[name]
        assert "tensorflow/serving:" in tfs["image"]
        assert tfs["environment"]["MODEL_NAME"] == MODEL_NAME
        mounts = bind_mounts(tfs)
        # The image serves $MODEL_BASE_PATH/$MODEL_NAME with MODEL_BASE_PATH=/models.
        assert mounts["/models"] == "models"
        flags = dict(arg.split("=", 1) for arg in tfs["command"])
        config_path = flags["--monitoring_config_file"]
        assert (ROOT / mounts[config_path]).resolve() == TFS_MONITORING
        assert "ports" not in tfs, "clients reach the replicas only through the proxy"


def test_compose_proxy_fronts_the_replicas() -> None:
    proxy = compose()["services"]["batchproxy"]
    assert proxy["build"] == "."
    assert (ROOT / "Dockerfile").is_file()
    config = parse_serve_args(proxy["command"])
    assert set(config.replicas) == {f"{name}:8500" for name in TFS_SERVICES}
    assert config.health_check_models == (MODEL_NAME,)
    assert (config.port, config.rest_api_port) == (8500, 8501)
    assert set(proxy["ports"]) == {"8500:8500", "8501:8501"}
    assert set(proxy["depends_on"]) == set(TFS_SERVICES)
    # Docker's SIGKILL must come after the drain.
    assert duration_s(proxy["stop_grace_period"]) > config.drain_timeout_s
    probe = " ".join(proxy["healthcheck"]["test"])
    assert f"127.0.0.1:{config.rest_api_port}/readyz" in probe
    assert "/readyz" in health_paths()


def test_compose_mounts_exist() -> None:
    for name, service in compose()["services"].items():
        for target, source in bind_mounts(service).items():
            if source == "models":  # the user's SavedModels (README.md, "Deploying")
                continue
            assert (ROOT / source).exists(), f"{name}: {source} (for {target}) is missing"


def test_compose_prometheus_scrapes_proxy_and_tfs() -> None:
    services = compose()["services"]
    mounts = bind_mounts(services["prometheus"])
    assert (ROOT / mounts["/etc/prometheus/prometheus.yml"]).resolve() == PROMETHEUS_CONFIG
    jobs = {job["job_name"]: job for job in yaml.safe_load(
        PROMETHEUS_CONFIG.read_text())["scrape_configs"]}
    proxy = parse_serve_args(services["batchproxy"]["command"])

    def targets(job: dict) -> set[str]:
        return {t for static in job["static_configs"] for t in static["targets"]}

    assert targets(jobs["batchproxy"]) == {f"batchproxy:{proxy.rest_api_port}"}
    assert jobs["batchproxy"]["metrics_path"] in metrics_paths()
    assert targets(jobs["tfs"]) == {f"{name}:8501" for name in TFS_SERVICES}
    assert jobs["tfs"]["metrics_path"] == tfs_monitoring_path(TFS_MONITORING.read_text())


def test_compose_grafana_provisioning() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = bind_mounts(grafana)
    assert (ROOT / mounts["/etc/grafana/provisioning"]).resolve() == GRAFANA_PROVISIONING
    dashboards_dir = mounts["/var/lib/grafana/dashboards"]
    assert (ROOT / dashboards_dir).resolve() == DASHBOARD.parent

    providers = yaml.safe_load(
        (GRAFANA_PROVISIONING / "dashboards" / "batchproxy.yml").read_text())["providers"]
    assert [p["options"]["path"] for p in providers] == ["/var/lib/grafana/dashboards"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"/var/lib/grafana/dashboards/{DASHBOARD.name}"

    (datasource,) = yaml.safe_load(
        (GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert "9090:9090" in compose()["services"]["prometheus"]["ports"]
    scrape = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["global"]["scrape_interval"]
    assert datasource["jsonData"]["timeInterval"] == scrape


# -- Prometheus -----------------------------------------------------------------------------


def test_prometheus_config_is_valid() -> None:
    result = run([require_tool("promtool"), "check", "config", str(PROMETHEUS_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr


# -- Dockerfile and its build context -------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def dockerignore_patterns() -> list[tuple[re.Pattern[str], bool, str]]:
    """(regex, is_exception, pattern) per line, as Docker reads .dockerignore."""
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        text = posixpath.normpath(line.lstrip("!").strip().lstrip("/"))
        regex, i = "", 0
        while i < len(text):
            if text.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif text.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif text[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif text[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(text[i]), i + 1
        patterns.append((re.compile(regex), exception, text))
    return patterns


def docker_excludes(path: str, patterns: list[tuple[re.Pattern[str], bool, str]]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for regex, exception, _ in patterns:
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not exception
    return excluded


def build_context() -> list[str]:
    """The files `docker build .` sends to the daemon, relative to the repository."""
    patterns = dockerignore_patterns()
    exceptions = [text for _, exception, text in patterns if exception]
    files = []
    for directory, dirs, names in os.walk(ROOT):
        rel = Path(directory).relative_to(ROOT).as_posix()
        prefix = "" if rel == "." else rel + "/"
        # Skip excluded folders unless an exception pattern reaches inside them (Docker
        # does the same), so .venv and the like are never walked.
        dirs[:] = [d for d in dirs if not docker_excludes(prefix + d, patterns)
                   or any(e.startswith(prefix + d + "/") for e in exceptions)]
        files += [prefix + n for n in names if not docker_excludes(prefix + n, patterns)]
    return sorted(files)


def test_dockerfile_runs_the_proxy() -> None:
    instructions = dockerfile_instructions()
    entrypoint = json.loads(next(a for k, a in instructions if k == "ENTRYPOINT"))
    cmd = json.loads([a for k, a in instructions if k == "CMD"][-1])
    assert entrypoint == ["batchproxy"]
    config = parse_serve_args(cmd)
    exposed = {int(p) for k, a in instructions if k == "EXPOSE" for p in a.split()}
    assert exposed == {config.port, config.rest_api_port}
    # A numeric user: Kubernetes' runAsNonRoot can only verify a number.
    assert [a for k, a in instructions if k == "USER"][-1].isdigit()


def test_docker_context_holds_the_sources_and_no_local_builds() -> None:
    context = build_context()
    for needed in ("pyproject.toml", "setup.py", "README.md", "src/batchproxy/_core.pyx",
                   "src/batchproxy/protos/predict.proto",
                   "src/batchproxy/replica/demo_weights.npz"):
        assert needed in context
    for path in context:
        assert not re.search(r"(\.so|\.c|_pb2(_grpc)?\.pyi?)$", path), path
        assert not path.startswith((".venv/", ".git/", "models/", "tests/")), path


def test_docker_build_stage_builds_the_package(tmp_path: Path) -> None:
    """Does what the build stage does, from exactly what its COPY lines take out of the
    context: the package builds, with the compiled core and freshly generated protos."""
    if importlib.util.find_spec("Cython") is None or importlib.util.find_spec(
            "grpc_tools") is None:
        pytest.skip("build tools (cython, grpcio-tools) not installed")
    context = build_context()
    workdir = tmp_path / "src"
    instructions = dockerfile_instructions()
    stages = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    copies = [a.split() for k, a in instructions[stages[0]:stages[1]] if k == "COPY"]
    assert copies
    for *sources, dest in copies:
        assert not any(s.startswith("--") for s in sources)
        for source in sources:
            matched = [f for f in context if f == source or f.startswith(source + "/")]
            assert matched, f"COPY {source}: not in the build context"
            for path in matched:
                if path == source:  # a file: into dest/ or as dest
                    inner = dest + posixpath.basename(path) if dest.endswith("/") else dest
                else:  # a folder: its contents go into dest
                    inner = posixpath.join(dest, posixpath.relpath(path, source))
                target = workdir / inner
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / path, target)
    env = {**os.environ}
    env.pop("BATCHPROXY_NO_EXTENSIONS", None)
    result = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                  "--no-build-isolation", "-w", str(tmp_path / "wheels"), "."],
                 cwd=workdir, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "wheels").glob("batchproxy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(re.fullmatch(r"batchproxy/_core\..*\.so", n) for n in names)
    assert "batchproxy/protos/predict_pb2.py" in names
    assert "batchproxy/protos/services_pb2_grpc.py" in names
    assert "batchproxy/replica/demo_weights.npz" in names


# -- Kubernetes -----------------------------------------------------------------------------


@cache
def k8s_documents() -> tuple[tuple[str, dict], ...]:
    docs = []
    # Subfolders too: manifests applied on their own (tools/models-loader.yaml) are checked alike.
    for path in sorted(K8S_DIR.rglob("*.yaml")):
        name = str(path.relative_to(K8S_DIR))
        docs += [(name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return tuple(docs)


def k8s(kind: str, name: str) -> dict:
    (doc,) = [d for _, d in k8s_documents()
              if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def test_k8s_manifests_present() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in k8s_documents()}
    assert {("Deployment", "tfs"), ("Service", "tfs-headless"), ("Deployment", "batchproxy"),
            ("Service", "batchproxy"), ("HorizontalPodAutoscaler", "batchproxy"),
            ("PodDisruptionBudget", "batchproxy")} <= kinds


def claim_volumes(pod_spec: dict, claim: str) -> list[str]:
    return [v["name"] for v in pod_spec["volumes"]
            if v.get("persistentVolumeClaim", {}).get("claimName") == claim]


def test_k8s_models_claim_binds_on_kind() -> None:
    # kind's default StorageClass (rancher local-path) provisions ReadWriteOnce only; a
    # ReadOnlyMany claim stays Pending there and no TFS pod ever starts.
    claim = k8s("PersistentVolumeClaim", "tfs-models")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert "storageClassName" not in claim["spec"]  # the cluster's default class
    # TFS only reads it; the loader pod, applied on its own, is the one writer.
    tfs = k8s("Deployment", "tfs")["spec"]["template"]["spec"]
    (volume,) = claim_volumes(tfs, "tfs-models")
    (mount,) = [m for m in container(k8s("Deployment", "tfs"))["volumeMounts"]
                if m["name"] == volume]
    assert mount["readOnly"] is True
    loader = k8s("Pod", "tfs-models-loader")["spec"]
    (volume,) = claim_volumes(loader, "tfs-models")
    (mount,) = loader["containers"][0]["volumeMounts"]
    assert mount["name"] == volume and not mount.get("readOnly")
    (applied,) = [name for name, d in k8s_documents() if d["kind"] == "Pod"]
    assert "/" in applied, "the loader must stay out of `kubectl apply -f deploy/kubernetes/`"


def test_readme_kubernetes_section_names_files_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### On Kubernetes"):]
    section = section[:section.index("\n### ", 1)]
    paths = set(re.findall(r"deploy/kubernetes/[\w./-]+\.yaml", section))
    assert "deploy/kubernetes/tools/models-loader.yaml" in paths
    for path in paths:
        assert (ROOT / path).is_file(), path
    assert "ReadWriteOnce" in section  # the access mode the manifest asks for


@pytest.mark.parametrize("version", [K8S_OLDEST, "latest"])
def test_k8s_manifests_match_the_schemas(version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    if version == "latest":
        version = kubernetes_validate.latest_version()
    for filename, doc in k8s_documents():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            name = f"{doc['kind']}/{doc['metadata']['name']}"
            pytest.fail(f"{filename} {name} (Kubernetes {version}): {err.message} "
                        f"at {'.'.join(map(str, err.path))}")


def container(deployment: dict) -> dict:
    (main,) = deployment["spec"]["template"]["spec"]["containers"]
    return main


def port_number(ctr: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in ctr["ports"] if p["name"] == port]
    return number


def selects(selector: dict, deployment: dict) -> bool:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in selector.items())


def test_k8s_one_namespace() -> None:
    (namespace,) = [d for _, d in k8s_documents() if d["kind"] == "Namespace"]
    name = namespace["metadata"]["name"]
    for _, doc in k8s_documents():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == name, doc["metadata"]["name"]


def test_k8s_proxy_discovers_tfs_through_the_headless_service() -> None:
    tfs, headless = k8s("Deployment", "tfs"), k8s("Service", "tfs-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert selects(headless["spec"]["selector"], tfs)
    assert selects(tfs["spec"]["selector"]["matchLabels"], tfs)
    tfs_ctr = container(tfs)
    env = {e["name"]: e["value"] for e in tfs_ctr["env"]}
    assert env["MODEL_NAME"] == MODEL_NAME
    grpc_port = next(p for p in headless["spec"]["ports"] if p["name"] == "grpc")
    assert port_number(tfs_ctr, grpc_port["targetPort"]) == 8500

    config = parse_serve_args(container(k8s("Deployment", "batchproxy"))["args"])
    namespace = headless["metadata"]["namespace"]
    assert config.replicas_dns == (
        f"tfs-headless.{namespace}.svc.cluster.local:{grpc_port['port']}",)
    assert config.replicas == ()
    assert config.health_check_models == (MODEL_NAME,)


def test_k8s_tfs_monitoring_config_matches_compose() -> None:
    config_map = k8s("ConfigMap", "tfs-config")
    text = config_map["data"]["monitoring.config"]
    assert tfs_monitoring_path(text) == tfs_monitoring_path(TFS_MONITORING.read_text())
    tfs_ctr = container(k8s("Deployment", "tfs"))
    flag = dict(a.split("=", 1) for a in tfs_ctr["args"])["--monitoring_config_file"]
    (mount,) = [m for m in tfs_ctr["volumeMounts"] if m["name"] == "config"]
    assert flag == posixpath.join(mount["mountPath"], "monitoring.config")


def test_k8s_proxy_probes_ports_and_shutdown() -> None:
    deployment = k8s("Deployment", "batchproxy")
    pod = deployment["spec"]["template"]["spec"]
    ctr = container(deployment)
    config = parse_serve_args(ctr["args"])
    assert port_number(ctr, "grpc") == config.port
    assert port_number(ctr, "rest") == config.rest_api_port

    readiness, liveness = ctr["readinessProbe"]["httpGet"], ctr["livenessProbe"]["httpGet"]
    assert (readiness["path"], liveness["path"]) == ("/readyz", "/healthz")
    assert {readiness["path"], liveness["path"]} <= health_paths()
    for probe in (readiness, liveness):
        assert port_number(ctr, probe["port"]) == config.rest_api_port

    # The kubelet's SIGKILL comes terminationGracePeriodSeconds after the preStop hook
    # starts: the hook's sleep plus the drain must fit in it.
    pre_stop = ctr["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + config.drain_timeout_s

    assert pod["securityContext"]["runAsNonRoot"] is True
    user = [a for k, a in dockerfile_instructions() if k == "USER"][-1]
    assert pod["securityContext"]["runAsUser"] == int(user)
    prometheus = deployment["spec"]["template"]["metadata"]["annotations"]
    assert prometheus["prometheus.io/path"] in metrics_paths()
    assert int(prometheus["prometheus.io/port"]) == config.rest_api_port


def test_k8s_service_hpa_and_pdb_target_the_proxy() -> None:
    deployment = k8s("Deployment", "batchproxy")
    ctr = container(deployment)
    service = k8s("Service", "batchproxy")
    assert selects(service["spec"]["selector"], deployment)
    assert {p["port"] for p in service["spec"]["ports"]} == {8500, 8501}
    for port in service["spec"]["ports"]:
        assert port_number(ctr, port["targetPort"]) == port["port"]

    hpa = k8s("HorizontalPodAutoscaler", "batchproxy")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", "batchproxy")
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    resources = {m["resource"]["name"] for m in hpa["spec"]["metrics"]
                 if m["type"] == "Resource"}
    for resource in resources:  # utilization is a share of the request
        assert resource in ctr["resources"]["requests"]

    pdb = k8s("PodDisruptionBudget", "batchproxy")
    assert selects(pdb["spec"]["selector"]["matchLabels"], deployment)
    # A PDB that allows no disruption at the autoscaler's minimum would block node drains.
    assert pdb["spec"].get("maxUnavailable", 0) >= 1 or (
        pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"])


def test_k8s_containers_have_requests_and_limits() -> None:
    for _, doc in k8s_documents():
        if doc["kind"] != "Deployment":
            continue
        for ctr in doc["spec"]["template"]["spec"]["containers"]:
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(ctr["resources"][kind]), ctr["name"]


# -- Grafana --------------------------------------------------------------------------------

# Labels Prometheus attaches to every scraped series (the target's), beside a series' own.
TARGET_LABELS = frozenset({"instance", "job"})
# PromQL words that are neither metrics nor followed by "(": aggregations take "by (...)"
# before their parentheses.
AGGREGATIONS = frozenset({"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
                          "count_values", "bottomk", "topk", "quantile", "limitk",
                          "limit_ratio"})
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})
GRAFANA_RANGE_VARIABLES = ("$__rate_interval", "$__interval", "$__range")
PROMQL_TOKEN = re.compile(r"""
      (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    | (?P<matchers>\{[^}]*\})
    | (?P<range>\[[^\]]*\])
    | (?P<grouping>\b(?:by|without|on|ignoring|group_left|group_right)\s*\((?P<labels>[^)]*)\))
    | (?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?\b)
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)(?P<call>\s*\()?
    | (?P<other>.)
""", re.VERBOSE | re.DOTALL)
MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")


@cache
def exported_series() -> dict[str, tuple[str, frozenset[str]]]:
    """Every sample name a ProxyMetrics registry exports -> (its family, its labels).

    A labelled metric has no samples until a child exists, so one child of each is made
    first (prometheus-client keeps label names in `_labelnames`). Counters come out as
    _total and _created, histograms as _bucket (with le), _count, _sum and _created."""
    metrics = ProxyMetrics()
    pid_label: set[str] = set()
    for metric in vars(metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        if metric._labelnames:
            metric.labels(*["x"] * len(metric._labelnames))
        # Multiprocess gauges of mode all/liveall keep one series per process: a pid label.
        if isinstance(metric, Gauge) and metric._multiprocess_mode in {"all", "liveall"}:
            pid_label.add(metric._name)
    series = {}
    for family in metrics.registry.collect():
        extra = {"pid"} if family.name in pid_label else set()
        for sample in family.samples:
            series[sample.name] = (family.name, frozenset(sample.labels) | extra)
    return series


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict]:
    panels = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels += panel.get("panels", [])  # panels of collapsed rows
    return panels


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target."""
    return [(f"panel {p['id']} {p['title']!r} target {t['refId']}", t["expr"])
            for p in dashboard_panels() for t in p.get("targets", [])]


def concrete_promql(expr: str) -> str:
    """The query Grafana sends: its range variables become durations, other variables (all
    used in label matchers here) a match-anything regex."""
    for variable in GRAFANA_RANGE_VARIABLES:
        expr = expr.replace(variable, "1m")
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def promql_names(expr: str) -> tuple[list[tuple[str, set[str]]], set[str]]:
    """([(metric, label names in its matchers)], label names in by/without/on/... clauses)."""
    selectors: list[tuple[str, set[str]]] = []
    grouping: set[str] = set()
    metric_end = -1  # where the last metric name ended: its {matchers} follow right there
    for match in PROMQL_TOKEN.finditer(concrete_promql(expr)):
        kind = match.lastgroup
        if kind == "grouping":
            grouping |= {label.strip() for label in match.group("labels").split(",")
                         if label.strip()}
        elif kind == "matchers":
            labels = set(MATCHER_LABEL.findall(match.group()))
            if match.start() == metric_end:
                selectors[-1][1].update(labels)
            else:  # a selector without a metric name: reported as the metric ""
                selectors.append(("", labels))
        elif kind == "ident":  # not followed by "(": a metric, an aggregation or a keyword
            name = match.group("ident")
            if name not in AGGREGATIONS and name not in KEYWORDS:
                selectors.append((name, set()))
                metric_end = match.end()
    return selectors, grouping


def test_promql_names_extraction() -> None:
    selectors, grouping = promql_names(
        'histogram_quantile(0.99, sum by (le, transport) (rate(batchproxy_request_duration_'
        'seconds_bucket{instance=~"$instance", method="Predict"}[$__rate_interval]))) / '
        "sum without (code) (batchproxy_queued_rows) or vector(0)")
    assert selectors == [("batchproxy_request_duration_seconds_bucket", {"instance", "method"}),
                         ("batchproxy_queued_rows", set())]
    assert grouping == {"le", "transport", "code"}


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] and board["title"]
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for source in [panel["datasource"], *(t["datasource"] for t in panel["targets"])]:
            # Portable: the datasource is the dashboard's variable, not a fixed uid.
            assert source == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """promtool parses every query as a recording rule's expression."""
    promtool = require_tool("promtool")
    rules = [{"record": f"dashboard:query_{n}", "expr": concrete_promql(expr)}
             for n, (_, expr) in enumerate(dashboard_queries())]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_only_exported_series() -> None:
    series = exported_series()
    queries = dashboard_queries()
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", text)
            assert match, f"variable {variable['name']}: {text}"
            metric, label = match.groups()
            assert metric in series, f"variable {variable['name']}: {metric}"
            assert label in series[metric][1] | TARGET_LABELS
    for where, expr in queries:
        selectors, grouping = promql_names(expr)
        assert selectors, f"{where}: no series in {expr}"
        labels = set(TARGET_LABELS)
        for metric, matchers in selectors:
            assert metric in series, f"{where}: {metric!r} is not exported by the proxy"
            known = series[metric][1] | TARGET_LABELS
            assert matchers <= known, f"{where}: {metric} has no label {matchers - known}"
            labels |= known
        assert grouping <= labels, f"{where}: no label {grouping - labels} to group by"


def test_dashboard_shows_every_exported_series() -> None:
    series = exported_series()
    shown = {series[metric][0] for _, expr in dashboard_queries()
             for metric, _ in promql_names(expr)[0]}
    families = {family for family, _ in series.values()}
    assert families - shown == set(), "series without a panel"


# -- the demo SavedModel --------------------------------------------------------------------

CHECK_EXPORT = """
import json, runpy, sys
import numpy as np
script, out, weights = sys.argv[1:]
sys.argv = [script, "--out", out]
runpy.run_path(script, run_name="__main__")
import tensorflow as tf
serve = tf.saved_model.load(out).signatures["serving_default"]
images = np.random.default_rng(0).random((5, 28, 28), dtype=np.float32)
got = serve(flatten_input=tf.constant(images))["dense_1"].numpy()
with np.load(weights) as w:
    logits = images.reshape(5, -1) @ w["kernel"] + w["bias"]
want = np.exp(logits - logits.max(1, keepdims=True))
want /= want.sum(1, keepdims=True)
inputs = serve.structured_input_signature[1]
print(json.dumps({
    "inputs": {k: [v.dtype.name, v.shape.as_list()] for k, v in inputs.items()},
    "outputs": {k: [v.dtype.name, v.shape.as_list()]
                for k, v in serve.structured_outputs.items()},
    "max_error": float(np.abs(got - want).max()),
}))
"""


def test_export_demo_model_writes_a_tfs_savedmodel(tmp_path: Path) -> None:
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("TensorFlow not installed (the interop extra brings it)")
    out = tmp_path / "models" / MODEL_NAME / "0001"
    weights = ROOT / "src" / "batchproxy" / "replica" / "demo_weights.npz"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    result = run([sys.executable, "-c", CHECK_EXPORT, str(DEPLOY / "export_demo_model.py"),
                  str(out), str(weights)], env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # TFS's layout: MODEL_BASE_PATH/MODEL_NAME/<version>/saved_model.pb + variables/.
    assert (out / "saved_model.pb").is_file()
    assert (out / "variables").is_dir()
    assert report["inputs"] == {"flatten_input": ["float32", [None, 28, 28]]}
    assert report["outputs"] == {"dense_1": ["float32", [None, 10]]}
    assert report["max_error"] < 1e-5

"""The image and the compose topology, run for real: `make test-docker` (tests/docker/run.sh)
starts a Docker daemon of its own, imports a base made from Debian's packages, then runs this
module. Skipped in `make test`, which has no daemon.

Every container uses the host's network (the daemon has no bridge), on free loopback ports
chosen here; the clients are the README's own examples, run from this process."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from load import UNMATCHED_AT_SHUTDOWN, error_code_of
from procs import free_port

pytestmark = pytest.mark.skipif(
    os.environ.get("BATCHPROXY_DOCKER_TEST") != "1",
    reason="needs the Docker daemon that tests/docker/run.sh starts (make test-docker)")

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DOCKER = os.environ.get("BATCHPROXY_DOCKER", "docker")
BASE = os.environ.get("BATCHPROXY_DOCKER_BASE", "")
BUILD_BASE = os.environ.get("BATCHPROXY_DOCKER_BUILD_BASE", BASE)
WORK = Path(os.environ.get("BATCHPROXY_DOCKER_WORK", "/tmp"))
IMAGE = "batchproxy:0.1.0"
PROMETHEUS_IMAGE = "batchproxy-prometheus:test"
MODEL = "my_mnist_model"
# Each demo batch takes this long on a replica, so that calls are surely in flight when the
# proxy is told to stop.
BATCH_COST_MS = 40
DRAIN_S = 20
GRACE_S = 30


def docker(*args: str, timeout: float = 120, check: bool = True,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout,
                            env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {shlex.join(args)}: {result.returncode}\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def wait_ready(rest_port: int, timeout_s: float = 90) -> list[int]:
    """Poll /readyz until it answers 200; the statuses seen on the way."""
    seen: list[int] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{rest_port}/readyz",
                                        timeout=2) as reply:
                seen.append(reply.status)
                return seen
        except urllib.error.HTTPError as err:
            seen.append(err.code)
        except OSError:
            seen.append(0)  # not listening yet
        time.sleep(0.3)
    raise AssertionError(f"/readyz never answered 200: {seen[-10:]}")


# -- the pip configuration the build stage gets, as secrets -----------------------------------

URL_KEYS = {"index-url", "extra-index-url", "trusted-host"}
PLAIN_KEYS = {"timeout", "default-timeout", "retries"}


def pip_secrets() -> list[str]:
    """`--secret` arguments that let pip inside the build reach the package index the way
    this machine's pip does: its index settings and its CA bundle. Local paths (file://
    indexes, find-links folders, constraint files) do not exist inside the build: left out."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                            capture_output=True, text=True, timeout=60).stdout
    settings: dict[str, str] = {}
    cert = os.environ.get("PIP_CERT", "")
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        name = key.rpartition(".")[2]
        value = value.strip().strip("'\"")
        if name == "cert":
            cert = value
        elif name in URL_KEYS:
            kept = [v for v in value.split() if not v.startswith("file:")]
            if kept:
                settings[name] = " ".join(kept)
        elif name in PLAIN_KEYS:
            settings[name] = value
    lines = ["[global]", *(f"{k} = {v}" for k, v in sorted(settings.items()))]
    args = []
    if cert and Path(cert).is_file():
        lines.append("cert = /run/secrets/pip-ca")
        args += ["--secret", f"id=pip-ca,src={cert}"]
    conf = WORK / "pip.conf"
    conf.write_text("\n".join(lines) + "\n")
    return [*args, "--secret", f"id=pip.conf,src={conf}"]


def build(tag: str, dockerfile: Path, *extra: str) -> None:
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    docker("build", "--network", "host", "--progress", "plain", "--build-arg", f"BASE={BASE}",
           "-f", str(dockerfile), "-t", tag, *extra, str(ROOT), timeout=900, env=env)


@pytest.fixture(scope="module")
def image() -> str:
    assert BASE, "BATCHPROXY_DOCKER_BASE names the imported base image"
    build(IMAGE, ROOT / "Dockerfile", "--build-arg", f"BUILD_BASE={BUILD_BASE}", *pip_secrets())
    return IMAGE


# -- the image itself ----------------------------------------------------------------------


def in_image(image: str, script: str) -> subprocess.CompletedProcess[str]:
    return docker("run", "--rm", "--network", "host", "--entrypoint", "sh", image, "-c", script,
                  check=False)


def test_image_runs_as_non_root(image: str) -> None:
    user = docker("image", "inspect", "-f", "{{.Config.User}}", image).stdout.strip()
    assert user == "10001"
    assert in_image(image, "id -u").stdout.strip() == "10001"


def test_image_has_no_compiler(image: str) -> None:
    tools = "cc gcc g++ c++ cpp make ld as x86_64-linux-gnu-gcc"
    found = in_image(image, f"for t in {tools}; do command -v $t; done; true").stdout.split()
    assert found == []
    headers = in_image(image, "ls /usr/include/python3*/Python.h /usr/local/include/python3*/"
                              "Python.h 2>/dev/null; true").stdout.split()
    assert headers == []


def test_image_has_no_test_dependencies_and_no_tensorflow(image: str) -> None:
    modules = ["tensorflow", "tensorflow_serving", "pytest", "hypothesis", "mypy", "ruff",
               "sklearn", "requests", "yaml", "Cython", "grpc_tools", "matplotlib"]
    script = ("import importlib.util, json; "
              f"print(json.dumps([m for m in {modules!r} if importlib.util.find_spec(m)]))")
    result = in_image(image, f"python -c {shlex.quote(script)}")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
    # What it does have: the compiled core and the runtime.
    check = "import batchproxy.codec as c, grpc, numpy, aiohttp; print(c.IMPLEMENTATION)"
    assert in_image(image, f"python -c {shlex.quote(check)}").stdout.strip() == "cython"


# -- proxy container in front of a replicas container -------------------------------------


def replica_command(port: int) -> str:
    return shlex.join(["batchproxy", "replica", "--model", "demo", "--model_name", MODEL,
                       "--host", "127.0.0.1", "--port", str(port), "--rest_api_port", "0",
                       "--batch_cost_ms", str(BATCH_COST_MS)])


class Fleet:
    def __init__(self, image: str) -> None:
        self.image = image
        self.replica_ports = (free_port(), free_port())
        self.grpc_port, self.rest_port = free_port(), free_port()

    def start_replicas(self) -> None:
        a, b = self.replica_ports
        docker("run", "-d", "--name", "replicas", "--network", "host", "--entrypoint", "sh",
               self.image, "-c", f"{replica_command(a)} & exec {replica_command(b)}")

    def start_proxy(self) -> None:
        a, b = self.replica_ports
        docker("run", "-d", "--name", "proxy", "--network", "host",
               "--stop-timeout", str(GRACE_S), self.image, "serve", "--host", "127.0.0.1",
               "--port", str(self.grpc_port), "--rest_api_port", str(self.rest_port),
               "--replica", f"127.0.0.1:{a}", "--replica", f"127.0.0.1:{b}",
               "--health_check_model", MODEL, "--max_batch_size", "32",
               "--batch_timeout_micros", "2000", "--drain_timeout_s", str(DRAIN_S))


@pytest.fixture(scope="module")
def fleet(image: str) -> Iterator[Fleet]:
    fleet = Fleet(image)
    try:
        fleet.start_replicas()
        fleet.start_proxy()
        yield fleet
    finally:
        for name in ("proxy", "replicas"):
            logs = docker("logs", "--tail", "30", name, check=False)
            print(f"--- {name}\n{logs.stdout}{logs.stderr}")
            docker("rm", "-f", name, check=False)


def readme_block(marker: str) -> str:
    """The README's ```python block that contains `marker`."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (block,) = [b for b in blocks if marker in b]
    return block


def run_readme_client(marker: str, fleet: Fleet) -> dict[str, object]:
    code = (readme_block(marker)
            .replace("localhost:8500", f"127.0.0.1:{fleet.grpc_port}")
            .replace("localhost:8501", f"127.0.0.1:{fleet.rest_port}"))
    assert str(fleet.grpc_port) in code or str(fleet.rest_port) in code
    namespace: dict[str, object] = {}
    exec(compile(code, f"README.md ({marker})", "exec"), namespace)
    return namespace


def direct_answers(port: int, images: object) -> object:
    """The replica's own answer to the same images, without the proxy."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = MODEL
        request.inputs["flatten_input"].CopyFrom(tf.make_tensor_proto(images))
        response = stub.Predict(request, timeout=10.0)
        return tf.make_ndarray(response.outputs["dense_1"])


def test_readyz_turns_200(fleet: Fleet) -> None:
    statuses = wait_ready(fleet.rest_port)
    assert statuses[-1] == 200


def test_readme_clients_get_right_answers(fleet: Fleet) -> None:
    import numpy as np

    wait_ready(fleet.rest_port)
    for marker in ("grpc.insecure_channel", "requests.post"):
        namespace = run_readme_client(marker, fleet)
        probabilities = np.asarray(namespace["probabilities"])
        assert probabilities.shape == (3, 10), marker
        expected = direct_answers(fleet.replica_ports[0], namespace["images"])
        np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-6,
                                   err_msg=marker)


def test_proxy_process_runs_as_non_root(fleet: Fleet) -> None:
    wait_ready(fleet.rest_port)
    assert docker("exec", "proxy", "id", "-u").stdout.strip() == "10001"
    # The serving process itself, as the host sees it.
    top = docker("top", "proxy", "-o", "pid,uid,args").stdout.splitlines()[1:]
    assert top and all(line.split()[1] == "10001" for line in top), top


class Load:
    """Threads sending the README's gRPC call in a loop, each on its own channel, until told
    to stop; bounded in count and in time."""

    def __init__(self, port: int, threads: int = 8, max_calls: int = 4000,
                 max_s: float = 120) -> None:
        import grpc
        import numpy as np
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

        self.grpc, self.np, self.tf = grpc, np, tf
        self.port, self.max_calls, self.max_s = port, max_calls, max_s
        self.images = np.random.default_rng(1).random((2, 28, 28), dtype=np.float32)
        self.request = predict_pb2.PredictRequest()
        self.request.model_spec.name = MODEL
        self.request.inputs["flatten_input"].CopyFrom(tf.make_tensor_proto(self.images))
        self.stub_class = prediction_service_pb2_grpc.PredictionServiceStub
        self.stop = threading.Event()
        # Set once the proxy is told to stop: a thread then ends at its first refusal.
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        # (finished at, status name, details, answer or None)
        self.results: list[tuple[float, str, str, object]] = []
        self.threads = [threading.Thread(target=self.loop, daemon=True) for _ in range(threads)]

    def ok_count(self) -> int:
        with self.lock:
            return sum(1 for r in self.results if r[1] == "OK")

    def loop(self) -> None:
        deadline = time.monotonic() + self.max_s
        with self.grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = self.stub_class(channel)
            for _ in range(self.max_calls):
                if self.stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    reply = stub.Predict(self.request, timeout=GRACE_S)
                    result = ("OK", "", self.tf.make_ndarray(reply.outputs["dense_1"]))
                except self.grpc.RpcError as err:
                    result = (err.code().name, err.details() or "", None)
                with self.lock:
                    self.results.append((time.monotonic(), *result))
                if result[0] != "OK" and self.stopping.is_set():
                    return


def test_docker_stop_drains_every_accepted_call(fleet: Fleet) -> None:
    import numpy as np

    wait_ready(fleet.rest_port)
    load = Load(fleet.grpc_port)
    expected = direct_answers(fleet.replica_ports[0], load.images)
    for thread in load.threads:
        thread.start()
    try:
        deadline = time.monotonic() + 60
        while load.ok_count() < 100 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert load.ok_count() >= 100, load.results[-5:]
        stop_at = time.monotonic()
        load.stopping.set()
        docker("stop", "-t", str(GRACE_S), "proxy", timeout=GRACE_S + 30)
        stop_s = time.monotonic() - stop_at
    finally:
        load.stop.set()
        for thread in load.threads:
            thread.join(timeout=GRACE_S + 10)
    state = json.loads(docker("inspect", "-f", "{{json .State}}", "proxy").stdout)
    logs = docker("logs", "proxy").stderr
    assert stop_s < GRACE_S, stop_s
    assert state["ExitCode"] == 0 and not state["OOMKilled"], state
    assert "stopping: draining" in logs
    codes: dict[str, int] = {}
    for _, code, details, _ in load.results:
        code = error_code_of(code, details)
        codes[code] = codes.get(code, 0) + 1
    # Accepted calls are answered; once the proxy refuses new calls (its gRPC server stops
    # taking them, then its port closes) clients see UNAVAILABLE, which they may retry. An
    # accepted call given up on would read "batchproxy is shutting down". grpc's core ends
    # a call that reached the port but no handler yet as CANCELLED with exactly these
    # details (grpc/grpc#41785): never accepted, so allowed; any other CANCELLED is not.
    assert set(codes) <= {"OK", "UNAVAILABLE", UNMATCHED_AT_SHUTDOWN}, codes
    assert not [r for r in load.results if "shutting down" in r[2]], codes
    answered_in_drain = [r for r in load.results if r[1] == "OK" and r[0] > stop_at]
    assert answered_in_drain, codes
    for _, code, _, answer in load.results:
        if code == "OK":
            np.testing.assert_allclose(answer, expected, rtol=1e-5, atol=1e-6)
    print(f"docker stop: {stop_s:.1f} s; calls {codes}; answered while draining "
          f"{len(answered_in_drain)}")


# -- docker-compose.yml with this test's override ------------------------------------------


PROMETHEUS_CONFIG = """\
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: batchproxy
    metrics_path: /metrics
    static_configs:
      - targets: ["127.0.0.1:{rest_port}"]
"""


def prometheus_query(port: int, query: str) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as reply:
        body = json.load(reply)
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def test_compose_topology_with_prometheus(image: str) -> None:
    build(PROMETHEUS_IMAGE, HERE / "prometheus.Dockerfile")
    empty = WORK / "empty"
    empty.mkdir(exist_ok=True)
    ports = {"BP_REPLICA_A_PORT": free_port(), "BP_REPLICA_B_PORT": free_port(),
             "BP_GRPC_PORT": free_port(), "BP_REST_PORT": free_port(),
             "BP_PROMETHEUS_PORT": free_port()}
    config = WORK / "prometheus.yml"
    config.write_text(PROMETHEUS_CONFIG.format(rest_port=ports["BP_REST_PORT"]))
    config.chmod(0o644)
    env = {**os.environ, **{k: str(v) for k, v in ports.items()},
           "BP_IMAGE": image, "BP_PROMETHEUS_IMAGE": PROMETHEUS_IMAGE,
           "BP_PROMETHEUS_CONFIG": str(config), "BP_EMPTY_DIR": str(empty),
           "BP_BATCH_COST_MS": str(BATCH_COST_MS)}
    layered = ["docker-compose", "-f", str(ROOT / "docker-compose.yml"),
               "-f", str(HERE / "compose.override.yml")]
    compose = ["docker-compose", "-p", "bptest", "-f", str(WORK / "compose.yml")]

    def run(*args: str, timeout: float = 180,
            command: list[str] = compose) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*command, *args], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=timeout)
        assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
        return result

    # docker-compose 1.29 refuses published ports on the host network, and an override
    # cannot remove docker-compose.yml's: they are dropped from the merged configuration.
    merged = yaml.safe_load(run("config", command=layered).stdout)
    for service in merged["services"].values():
        service.pop("ports", None)
    (WORK / "compose.yml").write_text(yaml.safe_dump(merged))
    try:
        # Grafana is not in Debian (so not in this test): everything else comes up.
        run("up", "-d", "--no-build", "tfs-a", "tfs-b", "batchproxy", "prometheus")
        wait_ready(ports["BP_REST_PORT"])
        sent = 25
        body = json.dumps({"instances": [[[0.5] * 28] * 28]}).encode()
        url = f"http://127.0.0.1:{ports['BP_REST_PORT']}/v1/models/{MODEL}:predict"
        for _ in range(sent):
            request = urllib.request.Request(url, data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as reply:
                assert len(json.load(reply)["predictions"][0]) == 10
        query = f'sum(batchproxy_requests_total{{model="{MODEL}",code="OK"}})'
        seen: list[dict[str, object]] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                seen = prometheus_query(ports["BP_PROMETHEUS_PORT"], query)
            except OSError:
                seen = []
            if seen and float(seen[0]["value"][1]) == sent:  # type: ignore[index]
                break
            time.sleep(1)
        assert seen and float(seen[0]["value"][1]) == sent, seen  # type: ignore[index]
        targets = prometheus_query(ports["BP_PROMETHEUS_PORT"], 'up{job="batchproxy"}')
        assert [t["value"][1] for t in targets] == ["1"], targets  # type: ignore[index]
    finally:
        logs = subprocess.run([*compose, "logs", "--tail", "20"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
        print(logs.stdout[-6000:])
        subprocess.run([*compose, "down", "-t", str(GRACE_S)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)

"""The TFS tutorial's second half, on a fleet, as real processes: three reference replicas
serve my_mnist_model/0001 under load (gRPC and REST); a canary of 0002 on one replica takes
10 % of `latest` calls; removing the weight moves everything back within a second; 0002
then rolls out replica by replica under a `share` policy, and is rolled back by removing
the folder. No call fails, and every answer's version is the one that computed it (0002
adds 1 to every output), as the policy says. A shadow version is compared and never seen.

Loads are bounded in calls and time; waits are bounded and poll, so a busy machine only
makes the test slower."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import requests
from grpc_client import float_tensor, to_array
from model_dirs import add_version, remove_version
from procs import Process, start_replica
from proxy_procs import start_proxy

from batchproxy.protos import predict_pb2, services_pb2_grpc

NAME = "my_mnist_model"
WAIT_S = 30.0
MOVE_S = 1.0  # a reload or a roll-back moves traffic within this


@dataclass
class Answer:
    started: float
    version: int  # 0: failed
    error: str = ""


@dataclass
class Load:
    """Closed-loop callers over gRPC and REST until stopped (or max_calls)."""

    proxy: Process
    threads: int = 4
    max_calls: int = 40000
    answers: list[Answer] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _record(self, answer: Answer) -> None:
        with self.lock:
            self.answers.append(answer)
            if len(self.answers) >= self.max_calls:
                self.stop.set()

    def _grpc(self, seed: int) -> None:
        channel = grpc.insecure_channel(self.proxy.address)
        stub = services_pb2_grpc.PredictionServiceStub(channel)
        rng = np.random.default_rng(seed)
        try:
            while not self.stop.is_set():
                x = rng.random((1, 3), dtype=np.float32)
                request = predict_pb2.PredictRequest()
                request.model_spec.name = NAME
                request.inputs["x"].CopyFrom(float_tensor(x))
                started = time.monotonic()
                try:
                    response = stub.Predict(request, timeout=30)
                except grpc.RpcError as err:
                    self._record(Answer(started, 0, f"{err.code()} {err.details()}"))
                    continue
                version = response.model_spec.version.value
                y = to_array(response.outputs["y"])
                self._record(Answer(started, version if _computed_by(version, x, y) else -1))
        finally:
            channel.close()

    def _rest(self, seed: int) -> None:
        session = requests.Session()
        rng = np.random.default_rng(seed)
        url = f"{self.proxy.rest_url}/v1/models/{NAME}:predict"
        while not self.stop.is_set():
            x = rng.random((1, 3), dtype=np.float32)
            started = time.monotonic()
            try:
                reply = session.post(url, json={"instances": x.tolist()}, timeout=30)
            except requests.RequestException as err:
                self._record(Answer(started, 0, str(err)))
                continue
            if reply.status_code != 200:
                self._record(Answer(started, 0, f"{reply.status_code} {reply.text}"))
                continue
            y = np.asarray(reply.json()["predictions"], dtype=np.float32)
            # REST answers carry no model_spec: the value tells the version.
            offset = float(np.round(np.mean(y - x)))
            self._record(Answer(started, 2 if offset == 1.0 else 1 if offset == 0.0 else -1))

    @contextmanager
    def running(self) -> Iterator[Load]:
        workers = [threading.Thread(target=self._grpc if i % 2 == 0 else self._rest,
                                    args=(i,), daemon=True) for i in range(self.threads)]
        for worker in workers:
            worker.start()
        try:
            yield self
        finally:
            self.stop.set()
            for worker in workers:
                worker.join(timeout=60)

    def since(self, start: float, end: float = float("inf")) -> list[Answer]:
        with self.lock:
            return [a for a in self.answers if start <= a.started < end]

    def wait_for(self, calls: int, since: float) -> None:
        deadline = time.monotonic() + WAIT_S * 4
        while len(self.since(since)) < calls:
            assert time.monotonic() < deadline, "the load stalled"
            assert not self.stop.is_set(), "the load reached its bound early"
            time.sleep(0.05)


def _computed_by(version: int, x: np.ndarray, y: np.ndarray) -> bool:
    """Version 2 adds 1 to every output, version 1 nothing: the answer's model_spec.version
    must be the version whose values it holds (a batch computed by one version)."""
    expected = x + (1.0 if version == 2 else 0.0)
    return version in (1, 2) and bool(np.allclose(y, expected, atol=1e-5))


def eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def available_on(proxy: Process, version: int) -> int:
    """Replicas the proxy sees holding `version` AVAILABLE (GET /v1/batchproxy/models)."""
    models = requests.get(f"{proxy.rest_url}/v1/batchproxy/models", timeout=10).json()
    return len(models.get(NAME, {}).get("versions", {}).get(str(version), {})
               .get("AVAILABLE", []))


def write_settings(path: Path, proxy: Process, text: str) -> float:
    """Rewrite the proxy's own config and SIGHUP it; returns when the reload was asked."""
    path.write_text(f"[models.{NAME}]\n{text}\n")
    asked = time.monotonic()
    proxy.signal(signal.SIGHUP)
    return asked


def failures(answers: list[Answer]) -> list[str]:
    return [a.error or "answer not computed by the version it names"
            for a in answers if a.version <= 0]


@contextmanager
def tutorial_fleet(tmp_path: Path, settings: str) -> Iterator[tuple[list[Path], Process, Path]]:
    bases = [tmp_path / f"replica{i}" / NAME for i in range(3)]
    for base in bases:
        add_version(base, 1, batch_cost_ms=2)
    proxy_file = tmp_path / "proxy.toml"
    proxy_file.write_text(f"[models.{NAME}]\n{settings}\n")
    with ExitStack() as stack:
        replicas = [stack.enter_context(start_replica(
            "identity", model_name=NAME, model_base_path=base,
            file_system_poll_wait_seconds=0.1)) for base in bases]
        proxy = stack.enter_context(start_proxy(
            replicas, proxy_config_file=proxy_file, health_interval_ms=200,
            max_batch_size=8, batch_timeout_micros=2000))
        eventually(lambda: available_on(proxy, 1) == 3, "version 1 on every replica")
        yield bases, proxy, proxy_file


def test_canary_roll_out_and_roll_back_under_load(tmp_path: Path) -> None:
    with tutorial_fleet(tmp_path, 'latest = "pinned:1"\nweights = { "2" = 10 }') as (
            bases, proxy, proxy_file), Load(proxy).running() as load:
        start = time.monotonic()
        load.wait_for(100, start)
        # Canary: 0002 on one replica (TFS's default policy unloads 0001 there).
        add_version(bases[0], 2, batch_cost_ms=2, output_offset=1.0)
        eventually(lambda: available_on(proxy, 2) == 1, "0002 on the first replica")
        canary = time.monotonic()
        load.wait_for(2000, canary)
        sample = load.since(canary)[:2000]
        share = sum(a.version == 2 for a in sample) / len(sample)
        assert abs(share - 0.10) <= 0.02, share
        # Removing the weight moves every latest call back to 0001 within a second.
        asked = write_settings(proxy_file, proxy, 'latest = "pinned:1"')
        load.wait_for(200, asked + MOVE_S)
        assert {a.version for a in load.since(asked + MOVE_S)} == {1}
        # Roll-out under share:0.6: 0002 serves once it is on 2 of the 3 replicas.
        asked = write_settings(proxy_file, proxy, 'latest = "share:0.6"')
        load.wait_for(200, asked + MOVE_S)
        assert {a.version for a in load.since(asked + MOVE_S)} == {1}  # 1 of 3 only
        add_version(bases[1], 2, batch_cost_ms=2, output_offset=1.0)
        eventually(lambda: available_on(proxy, 2) == 2, "0002 on the second replica")
        seen = time.monotonic()
        load.wait_for(200, seen + MOVE_S)
        assert {a.version for a in load.since(seen + MOVE_S)} == {2}
        add_version(bases[2], 2, batch_cost_ms=2, output_offset=1.0)
        eventually(lambda: available_on(proxy, 2) == 3, "0002 everywhere")
        # Roll-back: remove 0002; replicas load 0001 again before unloading it.
        removed = time.monotonic()
        for base in bases:
            remove_version(base, 2)
        eventually(lambda: available_on(proxy, 1) == 3, "0001 back everywhere")
        back = max(time.monotonic(), removed + MOVE_S)
        load.wait_for(200, back)
        assert {a.version for a in load.since(back)} == {1}
    assert not failures(load.answers), failures(load.answers)[:5]
    assert {a.version for a in load.answers} == {1, 2}


def metric(proxy: Process, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    text = requests.get(f"{proxy.rest_url}/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == name
               and all(sample.labels.get(k) == v for k, v in labels.items()))


def test_a_shadow_version_gives_divergence_metrics_and_changes_no_answer(
        tmp_path: Path) -> None:
    settings = ('latest = "pinned:1"\n'
                'shadow = { version = 2, sample = 0.5, max_inflight = 1 }')
    with tutorial_fleet(tmp_path, settings) as (bases, proxy, _):
        # 0002 beside 0001 on one replica: the shadow needs somewhere to run.
        add_version(bases[0], 2, batch_cost_ms=2, output_offset=1.0)
        eventually(lambda: available_on(proxy, 2) >= 1 or available_on(proxy, 1) < 3,
                   "0002 seen")
        with Load(proxy, max_calls=4000).running() as load:
            start = time.monotonic()
            eventually(lambda: metric(proxy, "batchproxy_shadow_batches_total",
                                      model=NAME, outcome="compared") >= 20,
                       "shadow batches compared")
            load.wait_for(100, start)
        compared = metric(proxy, "batchproxy_shadow_batches_total", model=NAME,
                          outcome="compared")
        # Every compared batch differed by the offset, 1.0 (give or take float32's last
        # bit): nothing in the buckets below it, all of them by 10.
        below = metric(proxy, "batchproxy_shadow_max_abs_difference_bucket", model=NAME,
                       le="0.1")
        by_ten = metric(proxy, "batchproxy_shadow_max_abs_difference_bucket", model=NAME,
                        le="10.0")
        assert compared >= 20 and below == 0 and by_ten >= compared
        # The fleet's versions, as the gauge has them: 0002 on the first replica, 0001 on
        # the other two (TFS's default policy unloaded 0001 where 0002 arrived).
        eventually(lambda: metric(proxy, "batchproxy_model_version_replicas", model=NAME,
                                  version="2", state="AVAILABLE") == 1
                   and metric(proxy, "batchproxy_model_version_replicas", model=NAME,
                              version="1", state="AVAILABLE") == 2, "the version gauge")
    answers = [a for a in load.answers if a.started >= start]
    assert not failures(load.answers), failures(load.answers)[:5]
    assert {a.version for a in answers} == {1}  # callers only ever saw the primary

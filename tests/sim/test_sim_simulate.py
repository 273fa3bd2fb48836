"""Whole simulations: the real engine beside the baselines, exact where the script is tiny,
and repeatable to the byte."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from batchproxy.sim import SimConfig, parse_fault, run_virtual, simulate
from batchproxy.sim.simulate import UnansweredCalls, drive, sweep
from batchproxy.sim.workloads import Arrival

# 10 ms a batch + 0.2 ms a row, no jitter: times below are exact.
EXACT = dict(replicas=2, batch_cost_ms=10.0, row_cost_us=200.0, batch_timeout_micros=2000)


def trace(tmp_path: Path, lines: list[str]) -> str:
    path = tmp_path / "trace.csv"
    path.write_text("time_s,rows,model,deadline_ms\n" + "\n".join(lines) + "\n")
    return str(path)


def test_same_seed_same_bytes():
    config = SimConfig(replicas=3, loads=(0.4, 0.8), duration_s=2.0, jitter=0.2,
                       models="a:2,b", rows="1-4", deadline_ms=150,
                       faults=(parse_fault("errors:1:0-2:0.05"), parse_fault("hang:2:0.5-0.7")),
                       seed=11)
    first = simulate(config).to_json()
    assert first == simulate(config).to_json()
    assert first != simulate(SimConfig(**{**config.__dict__, "seed": 12})).to_json()


def test_one_call_waits_the_batch_timeout_then_its_cost(tmp_path):
    # Under the fixed rule, as under TFS; the adaptive policy sends it to an idle replica
    # at once, as a direct call goes.
    config = SimConfig(**EXACT, workload="trace", trace=trace(tmp_path, ["0.1,1,m,"]),
                       systems=("direct", "tfs", "proxy:fixed", "proxy:adaptive"))
    report = simulate(config)
    assert report.run("direct").p50_ms == pytest.approx(10.2, abs=1e-9)
    assert report.run("tfs").p50_ms == pytest.approx(12.2, abs=1e-9)
    assert report.run("proxy:fixed").p50_ms == pytest.approx(12.2, abs=1e-9)
    assert report.run("proxy:adaptive").p50_ms == pytest.approx(10.2, abs=1e-9)


def test_a_full_batch_leaves_at_once(tmp_path):
    config = SimConfig(**EXACT, workload="trace",
                       trace=trace(tmp_path, ["0.1,1,m,"] * 32), systems=("proxy",))
    result = simulate(config).run("proxy")
    assert result.batch_rows == {"32": 1}
    assert result.p50_ms == result.p999_ms == pytest.approx(16.4, abs=1e-9)


def test_the_proxy_batches_under_load_and_keeps_up():
    config = SimConfig(replicas=4, loads=(0.7,), duration_s=1.5, jitter=0.1,
                       deadline_ms=500)
    report = simulate(config)
    proxy, direct = report.run("proxy"), report.run("direct")
    assert proxy.requests == direct.requests > 0
    assert proxy.errors == {}
    assert proxy.mean_batch_rows > 10
    assert proxy.goodput_per_s > 0.95 * proxy.requests / 1.5
    # One call per replica call cannot keep up at 70 % of the batched capacity.
    assert direct.errors.get("DEADLINE_EXCEEDED", 0) > direct.requests / 2
    assert all(0 < u <= 1 for u in proxy.utilization)


def test_inside_slo_counts_measured_calls_answered_in_time(tmp_path):
    # Three calls in the warm-up are not counted. Of the two measured ones, the first is
    # answered after 12.2 ms; the second, 5 ms later, waits for the first's batch to end
    # (at 1.0122 s) and then takes its own 10.2 ms: 17.4 ms, past a 15 ms SLO.
    lines = ["0.01,1,m,", "0.02,1,m,", "0.03,1,m,", "1.0,1,m,", "1.005,1,m,"]
    config = SimConfig(**{**EXACT, "replicas": 1}, workload="trace", warmup_s=0.5,
                       trace=trace(tmp_path, lines), slo_ms=15.0, systems=("tfs",))
    result = simulate(config).run("tfs")
    assert result.requests == 2
    assert result.inside_slo == 0.5


def test_a_crashed_replica_costs_the_proxy_little(tmp_path):
    config = SimConfig(replicas=3, rates=(300.0,), duration_s=4.0, deadline_ms=1000,
                       faults=(parse_fault("crash:0:1-3"),), health_interval_ms=200)
    report = simulate(config)
    direct, proxy = report.run("direct"), report.run("proxy")
    # Round robin sends a third of the calls to the dead replica while it is down.
    assert direct.errors["UNAVAILABLE"] == pytest.approx(direct.requests / 3 / 2, rel=0.2)
    # The proxy retries what failed there and stops sending to it.
    assert sum(proxy.errors.values()) < direct.errors["UNAVAILABLE"] / 10
    assert proxy.utilization[0] < proxy.utilization[1]


def test_a_hung_replica_with_deadlines():
    config = SimConfig(replicas=2, rates=(200.0,), duration_s=3.0, deadline_ms=100,
                       faults=(parse_fault("hang:1:1-2"),), systems=("direct", "proxy"))
    report = simulate(config)
    direct, proxy = report.run("direct"), report.run("proxy")
    assert direct.errors["DEADLINE_EXCEEDED"] > 0.3 * direct.requests / 3
    assert sum(proxy.errors.values()) < direct.errors["DEADLINE_EXCEEDED"]


def test_ten_virtual_seconds_end_where_the_last_call_is_answered(tmp_path):
    config = SimConfig(**EXACT, workload="trace",
                       trace=trace(tmp_path, ["0,1,m,", "9.99,1,m,"]), duration_s=10.0,
                       systems=("direct", "proxy:fixed", "proxy:adaptive"))
    report = simulate(config)
    assert report.run("direct").end_s == pytest.approx(9.99 + 0.0102, abs=1e-9)
    # The last call's batch timeout (the fixed rule; adaptive: none), then its cost.
    assert report.run("proxy:fixed").end_s == pytest.approx(9.99 + 0.0122, abs=1e-9)
    assert report.run("proxy:adaptive").end_s == pytest.approx(9.99 + 0.0102, abs=1e-9)


def test_loads_are_fractions_of_capacity():
    config = SimConfig(replicas=4, concurrency=2, max_batch_size=32, batch_cost_ms=10,
                       row_cost_us=200, rows="1:1,3:1", loads=(0.5, 1.0))
    capacity = 4 * 2 * 32 / (0.010 + 32 * 0.0002)
    assert config.capacity_rows_per_s() == pytest.approx(capacity)
    assert sweep(config) == [(pytest.approx(capacity / 2 / 2), 0.5),
                             (pytest.approx(capacity / 2), 1.0)]


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="unknown system"):
        SimConfig(systems=("nginx",))
    with pytest.raises(ValueError, match="trace file"):
        SimConfig(workload="trace")
    with pytest.raises(ValueError, match="network_ms"):
        SimConfig(network_ms=-1.0)


def test_a_slow_replica_hurts_round_robin_more_than_the_proxy():
    config = SimConfig(replicas=3, loads=(0.5,), duration_s=2.0, slow_replica=4.0,
                       systems=("tfs", "proxy"))
    report = simulate(config)
    tfs, proxy = report.run("tfs"), report.run("proxy")
    # Round robin gives every replica a third of the calls, so the slow one falls behind.
    assert tfs.p99_ms > 2 * proxy.p99_ms
    assert proxy.errors == {}


def test_bursts_run_through_every_system():
    config = SimConfig(replicas=2, workload="bursts", rates=(500.0,), duration_s=2.0,
                       burst_on_s=0.25, burst_off_s=0.75)
    report = simulate(config)
    assert {r.system for r in report.runs} == {"direct", "tfs", "proxy"}
    assert len({r.requests for r in report.runs}) == 1
    assert report.run("proxy").requests == pytest.approx(1000, rel=0.15)


class Stuck:
    """A system that loses every call, or fails with a bug."""

    name = "stuck"

    def __init__(self, bug: bool = False) -> None:
        self.bug = bug

    def start(self) -> None:
        pass

    async def submit(self, arrival: Arrival) -> None:
        if self.bug:
            raise KeyError("a bug")
        await asyncio.get_running_loop().create_future()

    async def close(self) -> None:
        pass


def test_a_lost_call_ends_the_run_with_an_error():
    arrivals = [Arrival(0.5, 0, None), Arrival(1.0, 0, None)]
    with pytest.raises(UnansweredCalls, match="2 of 2 calls still unanswered 60 virtual"):
        run_virtual(drive(Stuck(), arrivals, drain_limit_s=60))
    with pytest.raises(KeyError, match="a bug"):
        run_virtual(drive(Stuck(bug=True), arrivals))

"""Workloads: seeded arrivals, bursts, weighted mixes, CSV traces."""

from __future__ import annotations

import pytest

from batchproxy import codec
from batchproxy.sim import workloads
from batchproxy.sim.workloads import Mix, ShapeTable


def test_poisson_is_seeded_and_near_its_rate():
    table = ShapeTable(4)
    first = workloads.poisson(1000, 10, Mix(), table, seed=3)
    assert first == workloads.poisson(1000, 10, Mix(), ShapeTable(4), seed=3)
    assert first != workloads.poisson(1000, 10, Mix(), ShapeTable(4), seed=4)
    assert len(first) == pytest.approx(10_000, rel=0.05)
    times = [a.time_s for a in first]
    assert times == sorted(times) and times[0] > 0 and times[-1] < 10


def test_bursts_arrive_only_while_on_at_the_same_mean_rate():
    arrivals = workloads.bursts(500, 20, Mix(), ShapeTable(4), seed=1, on_s=0.5, off_s=1.5)
    assert all(a.time_s % 2.0 < 0.5 for a in arrivals)
    assert len(arrivals) == pytest.approx(500 * 20, rel=0.05)


def test_mix_of_models_rows_and_deadline():
    mix = Mix(models=workloads.parse_weighted("a:3,b", str),
              rows=workloads.parse_weighted("1-4", int), deadline_s=0.25)
    table = ShapeTable(2)
    arrivals = workloads.poisson(2000, 5, mix, table, seed=0)
    shapes = [table.shapes[a.shape] for a in arrivals]
    share_a = sum(s.model == "a" for s in shapes) / len(shapes)
    assert share_a == pytest.approx(0.75, abs=0.03)
    assert {s.rows for s in shapes} == {1, 2, 3, 4}
    assert {a.deadline_s for a in arrivals} == {0.25}
    assert mix.mean_rows() == 2.5
    # One request per shape, and it decodes to that shape.
    assert len(table.shapes) == 8
    for shape in table.shapes:
        call = codec.decode_predict_request(shape.request)
        assert (call.model_name, call.rows) == (shape.model, shape.rows)
        assert call.inputs["x"].shape == (shape.rows, 2)


def test_weighted_choices_are_checked():
    assert workloads.parse_weighted("1:4,8", int) == ((1, 4.0), (8, 1.0))
    for bad in ("", "0", "1:-1"):
        with pytest.raises(ValueError):
            workloads.parse_weighted(bad, int)


def test_trace_replay(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("time_s,rows,model,deadline_ms\n"
                    "0.5,2,b,\n"
                    "0.1,1,a,100\n"
                    "0.1,3,a,0\n")
    table = ShapeTable(4)
    arrivals = workloads.read_trace(path, table)
    got = [(a.time_s, table.shapes[a.shape].model, table.shapes[a.shape].rows, a.deadline_s)
           for a in arrivals]
    assert got == [(0.1, "a", 1, 0.1), (0.1, "a", 3, None), (0.5, "b", 2, None)]


def test_trace_errors(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("time_s,model\n0,a\n")
    with pytest.raises(ValueError, match="missing columns"):
        workloads.read_trace(path, ShapeTable(1))
    path.write_text("time_s,rows,model\n0,x,a\n")
    with pytest.raises(ValueError, match="line 2"):
        workloads.read_trace(path, ShapeTable(1))

"""Spot traces: read as shipped, bad lines named, and cut the way the Lazarus paper replays them."""

from pathlib import Path

import pytest

from data_contracts import ContractError, validate
from data_contracts.shipped import read_headerless_csv
from infra.errors import InputError
from infra.traces import SpotTrace, TraceEvent, busiest_segment, load_spot_trace

P3 = Path(__file__).resolve().parents[2] / "data" / "spot-traces" / "bamboo-p3-trace.csv"


def test_shipped_p3_trace_loads_in_time_order():
    trace = load_spot_trace(P3)
    assert len(trace.events) == 344
    times = [e.time_s for e in trace.events]
    assert times == sorted(times)
    assert max(n for _, n in trace.node_counts()) == 32


def test_busiest_segment_is_eighty_minutes_capped_at_ten_nodes():
    segment = busiest_segment(load_spot_trace(P3), minutes=80, max_nodes=10)
    counts = [n for _, n in segment.node_counts()]
    assert max(counts) <= 10
    assert segment.duration_s < 80 * 60
    assert segment.preemptions() >= 10  # a segment worth replaying: many preemptions


def test_window_starts_with_the_nodes_alive_at_its_start():
    trace = SpotTrace((TraceEvent(0, "add", "a"), TraceEvent(1, "add", "b"), TraceEvent(5, "remove", "a"),
                       TraceEvent(9, "add", "c")))
    window = trace.window(2.0, 5.0)
    assert [(e.time_s, e.kind, e.node) for e in window.events] == [(0, "add", "a"), (0, "add", "b"), (3, "remove", "a")]


def test_cap_declines_grants_and_their_later_preemptions():
    trace = SpotTrace((TraceEvent(0, "add", "a"), TraceEvent(0, "add", "b"), TraceEvent(1, "remove", "b"),
                       TraceEvent(2, "add", "c")))
    capped = trace.capped(1)
    assert [(e.kind, e.node) for e in capped.events] == [("add", "a")]


def test_scaled_squeezes_time():
    trace = SpotTrace((TraceEvent(0, "add", "a"), TraceEvent(100, "remove", "a")))
    assert trace.scaled(0.01).events[-1].time_s == pytest.approx(1.0)


@pytest.mark.parametrize("line, field", [
    ("10,crash,node1", "line 2: event"),
    ("-5,add,node2", "line 2: time_ms"),
    ("x,add,node2", "line 2: time_ms"),
    ("10,remove,node9", "line 2: node"),
    ("10,add", "line 2"),
])
def test_bad_trace_line_is_named(tmp_path, line, field):
    path = tmp_path / "trace.csv"
    path.write_text("0,add,node1\n" + line + "\n")
    with pytest.raises(InputError) as err:
        load_spot_trace(path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_contract_reports_unknown_event_kinds(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("0,add,node1\n10,crash,node1\n")
    frame = read_headerless_csv(path, ["time_ms", "event", "node"], ["time_ms"])
    with pytest.raises(ContractError, match="crash"):
        validate(frame, "lazarus.spot_trace", str(path))

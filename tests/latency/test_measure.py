import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from onnxprune.graph.io import infer_shapes
from onnxprune.latency.backends import OwnClock, get_backend
from onnxprune.latency.measure import compare, random_feeds, time_in_rounds
from tests.builders import GraphBuilder


class FakeClock(OwnClock):
    """A row on a simulated machine: its run takes ``own`` seconds times the machine's current slowness."""

    def __init__(self, own, machine):
        self.own, self.machine, self.times = own, machine, []

    def __call__(self):
        self.times.append(self.own * self.machine["slowness"])

    def seconds(self):
        return self.times


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(1.0, 1.6), min_size=5, max_size=25), st.lists(st.floats(1e-5, 1e-2), min_size=1, max_size=6),
       st.floats(1.0, 1.3))
def test_rows_are_recovered_whatever_the_machine_does_between_rounds(spells, rows, profiler_cost):
    """A slow spell scales the whole run and the rows of its round alike; rows come out at their own
    seconds relative to the plain whole run, even when the reference runs under a costlier profiler."""
    machine = {"slowness": 1.0, "round": 0}
    whole_s = 0.01

    def whole():  # the first call of each round moves the machine into the round's spell
        machine["slowness"] = spells[machine["round"] % len(spells)]
        machine["round"] += 1
        return whole_s * machine["slowness"]

    reference = lambda: whole_s * profiler_cost * machine["slowness"]  # noqa: E731
    clocks = [FakeClock(r * profiler_cost, machine) for r in rows]
    median_whole, own = time_in_rounds(whole, reference, clocks, rounds=len(spells), warmup=2)
    assert own == pytest.approx([r * median_whole / whole_s for r in rows], rel=1e-9)


def stack(convs):
    g = GraphBuilder(("batch", 16, 16, 16), seed=1)
    x = g.input
    for _ in range(convs):
        x = g.relu(g.conv(x, 16))
    return infer_shapes(g.build([x]))


def test_compare_reads_a_model_eight_times_the_work_as_slower():
    light, heavy = stack(1), stack(8)
    measured = compare([light, heavy, light], get_backend("ort-cpu", threads=1), batch=2, rounds=5)
    assert measured.speedups[0] == 1.0 and measured.speedups[1] < 1.0 < measured.speedups[1] * 8 * 2
    assert measured.medians[1] > measured.medians[0] and measured.rounds == 5 and measured.runs_per_turn >= 1


def test_random_feeds_follow_the_model_input():
    feeds = random_feeds(stack(1), batch=3)
    (x,) = feeds.values()
    assert x.shape == (3, 16, 16, 16) and x.dtype == np.float32

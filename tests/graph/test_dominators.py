from hypothesis import given, settings, strategies as st

from onnxprune.graph.dominators import common_dominator, dominates, immediate_dominators


@st.composite
def dags(draw):
    n = draw(st.integers(1, 14))
    preds = [[]]
    for v in range(1, n):
        first = draw(st.integers(0, v - 1))
        extra = draw(st.lists(st.integers(0, v - 1), max_size=3))
        preds.append(sorted({first, *extra}))
    return preds


def brute_force_dominators(preds):
    """dom[v] = nodes on every root->v path, by removing each candidate and testing reachability."""
    n = len(preds)
    succs = [[] for _ in range(n)]
    for v, ps in enumerate(preds):
        for p in ps:
            succs[p].append(v)

    def reachable_without(removed):
        seen = set() if removed == 0 else {0}
        stack = [] if removed == 0 else [0]
        while stack:
            for s in succs[stack.pop()]:
                if s != removed and s not in seen:
                    seen.add(s)
                    stack.append(s)
        return seen

    return [{d for d in range(n) if d == v or v not in reachable_without(d)} for v in range(n)]


@settings(max_examples=200, deadline=None)
@given(dags())
def test_immediate_dominators_match_brute_force(preds):
    idom = immediate_dominators(preds)
    doms = brute_force_dominators(preds)
    for v in range(len(preds)):
        assert {d for d in range(len(preds)) if dominates(idom, d, v)} == doms[v]
        strict = doms[v] - {v}
        if v:
            assert idom[v] == max(strict)  # the nearest strict dominator has the highest index


@settings(max_examples=100, deadline=None)
@given(dags(), st.data())
def test_common_dominator_is_the_nearest_shared_one(preds, data):
    idom = immediate_dominators(preds)
    doms = brute_force_dominators(preds)
    a = data.draw(st.integers(0, len(preds) - 1))
    b = data.draw(st.integers(0, len(preds) - 1))
    assert common_dominator(idom, a, b) == max(doms[a] & doms[b])

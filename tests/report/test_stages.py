from onnxprune.graph.analysis import analyze_model
from onnxprune.plan import Plan, apply_plan
from onnxprune.report.stages import compare_stages, stages
from tests.importance.test_slp import classifier


def test_stages_are_runs_of_blocks_with_one_output_shape():
    structure = analyze_model(classifier(seed=1)).to_dict()  # 4 blocks at 8x12x12, then 2 at 16x6x6
    found = stages(structure)
    assert [(s.shape, len(s.blocks)) for s in found] == [((8, 12, 12), 4), ((16, 6, 6), 2)]
    assert [s.convs for s in found] == [8, 4] and found[0].label == "8×12×12"


def test_depth_before_and_after_a_removal():
    model = classifier(seed=1)
    before = analyze_model(model).to_dict()
    removed = [before["residual_blocks"][1]["join"]]
    after = analyze_model(apply_plan(model, Plan(remove_blocks=removed))[0]).to_dict()
    changes = compare_stages(before, after, removed)
    assert [(len(c.before.blocks), len(c.after.blocks), c.removed) for c in changes] == [(4, 3, removed), (2, 2, [])]
    assert [c.after.convs for c in changes] == [6, 4]
    assert all(c.after is None for c in compare_stages(before, None))


def test_a_plain_conv_chain_is_split_where_the_spatial_size_changes():
    def conv(index, shape, stride=1):
        return {"index": index, "output_shape": ["N", *shape], "stride": [stride, stride], "block": None}

    structure = {"residual_blocks": [], "convs": [conv(0, (8, 16, 16)), conv(1, (16, 16, 16)),
                                                  conv(2, (16, 8, 8), 2), conv(3, (32, 8, 8))]}
    assert [(s.shape, s.convs) for s in stages(structure)] == [((16, 16), 2), ((8, 8), 2)]

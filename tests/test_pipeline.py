import dataclasses

import pytest
from graphs import redundant_model
from hypothesis import given, settings
from hypothesis import strategies as st

import onnxpress
from onnxpress.errors import PassFailedError, UsageError
from onnxpress.pass_infra import Pass
from onnxpress.pipeline import Pipeline, parse_pipeline
from onnxpress.registry import registry


def test_parse_builds_the_same_objects_as_the_api():
    from onnxpress.passes.dedup import DeduplicateInitializers
    from onnxpress.passes.fold import FoldConstants

    text = "simplify,fold(max_input=64),dedup"
    assert Pipeline.parse(text) == Pipeline([registry()["simplify"](), FoldConstants(max_input=64), DeduplicateInitializers()])
    assert str(Pipeline.parse(text)) == text


@pytest.mark.parametrize(
    "text, message",
    [
        ("nosuchpass", "unknown pass 'nosuchpass' (valid passes:"),
        ("fold(bogus=1)", "unknown option 'bogus' (valid options: max_input, max_output)"),
        ("fold(max_input=1.5)", "expected an integer"),
        ("fold(max_input=-1)", "must be >= 0"),
        ("fold(max_input=1", "expected ')'"),
        ("simplify,,fold", "expected a pass name"),
        ("fold(max_input=1,max_input=2)", "given twice"),
        ("simplify(skip_fuse_bn=maybe)", "expected true or false"),
    ],
)
def test_bad_pipeline_text_is_one_line_usage_error(text, message):
    with pytest.raises(UsageError) as info:
        Pipeline.parse(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_whitespace_and_empty():
    assert str(Pipeline.parse(" simplify , fold( max_input = 3 ) ")) == "simplify,fold(max_input=3)"
    assert len(Pipeline.parse("")) == 0


def _value_strategy(field_type):
    if field_type is bool:
        return st.booleans()
    if field_type is int:
        return st.integers(min_value=0, max_value=2**40)
    return None


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_pipeline_text_round_trips(data):
    """For any pipeline built from the registry: parse(str(p)) == p and str is stable."""
    import typing

    from onnxpress.pass_infra import option_types

    passes = []
    table = registry()
    for name in data.draw(st.lists(st.sampled_from(sorted(table)), max_size=5)):
        cls = table[name]
        hints = option_types(cls.Options)
        kwargs = {}
        for field in dataclasses.fields(cls.Options):
            strategy = _value_strategy(hints[field.name])
            if strategy is not None and data.draw(st.booleans()):
                kwargs[field.name] = data.draw(strategy)
        try:
            passes.append(cls(**kwargs))
        except UsageError:
            continue  # values the pass's own validation refuses
    pipe = Pipeline(passes)
    text = str(pipe)
    again = Pipeline.parse(text)
    assert again == pipe
    assert str(again) == text
    _ = typing  # keep the import local to the property


class _Exploding(Pass):
    name = "explode"

    def call(self, model):
        raise RuntimeError("kaboom at node X")


def test_pass_failure_names_pass_and_predecessors():
    from onnxpress.passes.cse import CommonSubexpressionElimination
    from onnxpress.passes.dedup import DeduplicateInitializers

    pipe = Pipeline([DeduplicateInitializers(), CommonSubexpressionElimination(), _Exploding()])
    with pytest.raises(PassFailedError) as info:
        pipe.run(redundant_model())
    assert str(info.value) == "pass 'explode' failed after [dedup, cse]: RuntimeError: kaboom at node X"


def test_stats_and_verification_per_pass():
    pipe = Pipeline.parse(onnxpress.api.default_pipeline())
    model = redundant_model()
    result = pipe.run(model, verify_each=True)
    assert [s.name for s in result.stats] == [p.name for p in pipe]
    first = next(s for s in result.stats if s.name == "simplify")
    assert first.modified and first.verified is True
    assert first.after.nodes < first.before.nodes
    for s in result.stats:
        if not s.modified:
            assert s.verified is None  # skipped: nothing changed
    assert result.stats[-1].after.parameters <= result.stats[0].before.parameters


def test_a_pass_may_follow_sparsify():
    """sparsify only plans (sparse storage is applied at save), so any pass may run after it."""
    from onnxpress.passes.dedup import DeduplicateInitializers
    from onnxpress.passes.sparse import Sparsify

    pipe = Pipeline.parse("sparsify,dedup")
    assert [type(p) for p in pipe] == [Sparsify, DeduplicateInitializers]
    assert str(pipe) == "sparsify,dedup"


def test_registry_names_unique_and_documented():
    from onnxpress.passes import ALL

    names = [c.name for c in ALL]
    assert len(names) == len(set(names))
    for cls in ALL:
        assert cls.__doc__ and len(cls.__doc__.strip()) > 40, cls


def test_optimize_writes_metadata_and_keeps_input_untouched():
    model = redundant_model()
    before = [n.op_type for n in model.graph]
    out, report = onnxpress.optimize(model)
    assert [n.op_type for n in model.graph] == before
    assert out.metadata_props["onnxpress.pipeline"] == onnxpress.api.default_pipeline()
    assert out.metadata_props["onnxpress.version"] == onnxpress.__version__
    assert report.passed and report.validation.outputs[0].max_abs < 1e-5
    assert report.bytes_after < report.bytes_before + 200
    assert parse_pipeline(report.pipeline) == list(Pipeline.parse(onnxpress.api.default_pipeline()))

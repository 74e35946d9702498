"""Pipeline parallelism end to end: every schedule at pp 2 and 4 (interleaved with 2 chunks
per rank, uneven and balanced layer splits) reproduces single-process training over 20
steps: losses, gradient norms and validation losses within 1e-5 relative."""
import pytest

from support.layouts import PIPELINE, assert_matches


@pytest.mark.parametrize("layout", [l for w in sorted(PIPELINE) for l in PIPELINE[w]], ids=lambda l: l.name())
def test_pipeline_matches_single_process(layout, layout_results, layout_reference):
    assert_matches(layout_results(layout.world)[layout], layout_reference)

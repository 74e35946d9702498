"""2D / 3D parallelism on one mesh: dp x pp x tp compositions with ZeRO 0-3 on dp, sequence
parallelism and overlap, every pipeline schedule, uneven stage splits and a non-default
mesh order, up to 8 ranks, reproduce single-process training over 20 steps (losses,
gradient norms, validation losses within 1e-5 relative)."""
import pytest

from layout_cases import COMPOSED, PIPELINE, assert_matches

ALL = [l for w in sorted(COMPOSED) for l in COMPOSED[w]]


def test_matrix_covers_the_required_layouts():
    layouts = ALL + [l for w in PIPELINE for l in PIPELINE[w]]
    assert len(layouts) >= 12
    assert {(l.dp, l.pp, l.tp, l.zero) for l in layouts} >= {(2, 2, 2, 1), (2, 2, 2, 3)}
    assert any(l.sp and l.overlap for l in ALL) and any(l.pp_layout not in ("even", "balanced") for l in ALL)
    assert {l.schedule for l in ALL if l.pp > 1} >= {"interleaved", "zb", "1f1b"}


@pytest.mark.parametrize("layout", ALL, ids=lambda l: l.name())
def test_layout_matches_single_process(layout, layout_results, layout_reference):
    assert_matches(layout_results(layout.world)[layout], layout_reference(layout.micro_batch))

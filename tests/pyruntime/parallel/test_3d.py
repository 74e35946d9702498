"""2D / 3D parallelism on one mesh: dp x pp x tp compositions with ZeRO 0-3 on dp, sequence
parallelism and overlap, every pipeline schedule, uneven stage splits and a non-default
mesh order, up to 8 ranks, reproduce single-process training over 20 steps (losses,
gradient norms, validation losses within 1e-5 relative)."""
import pytest

from support.layouts import (COMPOSED, PIPELINE, RESHARD_AT, RESHARD_SAVER, RESHARD_STEPS, RESHARD_TARGETS,
                          RESHARD_WORLD, assert_matches)
from support.dp_cases import assert_losses_match

ALL = [l for w in sorted(COMPOSED) for l in COMPOSED[w]]


def test_matrix_covers_the_required_layouts():
    layouts = ALL + [l for w in PIPELINE for l in PIPELINE[w]]
    assert len(layouts) >= 12
    assert {(l.dp, l.pp, l.tp, l.zero) for l in layouts} >= {(2, 2, 2, 1), (2, 2, 2, 3)}
    assert any(l.sp and l.overlap for l in ALL) and any(l.pp_layout not in ("even", "balanced") for l in ALL)
    assert {l.schedule for l in ALL if l.pp > 1} >= {"interleaved", "zb", "1f1b"}


@pytest.mark.parametrize("layout", ALL, ids=lambda l: l.name())
def test_layout_matches_single_process(layout, layout_results, layout_reference):
    assert_matches(layout_results(layout.world)[layout], layout_reference)


def test_reshard_targets_change_every_axis():
    saver = RESHARD_SAVER
    assert (saver.dp, saver.pp, saver.tp) == (2, 2, 2)
    assert {(l.dp, l.pp, l.tp) for l in RESHARD_TARGETS} == {(4, 1, 2), (1, 2, 4), (8, 1, 1)}
    assert all(l.zero != saver.zero and l.world == RESHARD_WORLD for l in RESHARD_TARGETS)


@pytest.mark.parametrize("target", RESHARD_TARGETS, ids=lambda l: l.name())
def test_resharded_resume_continues_the_uninterrupted_run(target, layout_world):
    """Saved at (dp, pp, tp) = (2, 2, 2) ZeRO-1 after RESHARD_AT steps, loaded at another
    layout and ZeRO stage: the next losses are the uninterrupted run's."""
    world = layout_world(RESHARD_WORLD)
    uninterrupted = world["layouts"][RESHARD_SAVER].loss[RESHARD_AT:RESHARD_AT + RESHARD_STEPS]
    assert_losses_match(world["reshard"][target], uninterrupted)

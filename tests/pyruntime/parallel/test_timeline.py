"""pyruntime/parallel/pipeline/timeline.py: the Gantt chart's rows are pipeline stages, named
with the global rank that ran each (in a dp x pp x tp run stage 1 is not rank 1)."""
import pytest

from pyruntime.mesh import ParallelDims
from pyruntime.parallel.pipeline.schedule import simulate
from pyruntime.parallel.pipeline.timeline import draw_timeline, first_pipeline_ranks, stage_labels


def test_rows_name_the_stage_and_the_rank_that_ran_it():
    assert stage_labels(2) == ["stage 0", "stage 1"]
    assert stage_labels(2, [0, 2]) == ["stage 0 (rank 0)", "stage 1 (rank 2)"]
    with pytest.raises(ValueError, match="3 global ranks for 2 stages"):
        stage_labels(2, [0, 1, 2])


@pytest.mark.parametrize("dp, pp, tp, order, ranks", [
    (2, 2, 2, ("dp", "pp", "tp"), [0, 2]),   # the demo: tp innermost, so stage 1 starts at rank tp
    (1, 4, 1, ("dp", "pp", "tp"), [0, 1, 2, 3]),
    (2, 2, 2, ("pp", "dp", "tp"), [0, 4]),
    (2, 2, 1, ("pp", "tp", "dp"), [0, 2]),
])
def test_first_pipeline_ranks_follow_the_mesh_order(dp, pp, tp, order, ranks):
    assert first_pipeline_ranks(ParallelDims(dp, pp, tp, dp * pp * tp, order=order)) == ranks


def test_measured_style_chart_with_global_ranks_is_written(tmp_path):
    png = tmp_path / "p.png"
    draw_timeline(simulate("1f1b", 2, 4).events, png, pp=2, unit="s", global_ranks=[0, 2])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

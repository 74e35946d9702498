"""What the trainer prints from the plan: the predicted memory per pipeline rank at start-up,
and after the first step that prediction next to what rank 0 then measured (its model-state
bytes, exact; on CUDA also its peak allocated memory)."""
from __future__ import annotations

from pyruntime.config import Config
from pyruntime.plan.layout import Layout, Workload
from pyruntime.plan.memory import all_rank_memory


def workload_layout(cfg: Config) -> tuple[Workload, Layout]:
    """The planner's view of a training config."""
    p = cfg.parallel
    work = Workload(model=cfg.model, seq_len=cfg.data.seq_len, global_batch=cfg.data.global_batch)
    layout = Layout(dp=p.dp, tp=p.tp, pp=p.pp, zero=p.zero, sp=p.sequence_parallel, schedule=p.schedule,
                    virtual_stages=p.virtual_stages, pp_layout=p.pp_layout, micro_batch=cfg.data.micro_batch,
                    bucket_mb=p.bucket_mb, recompute=p.recompute, recompute_layers=p.recompute_layers,
                    recompute_ops=p.recompute_ops, offload=cfg.optim.offload, mesh_order=p.mesh_order)
    return work, layout


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f}"


def plan_line(cfg: Config, cuda: bool) -> str:
    work, layout = workload_layout(cfg)
    ranks = all_rank_memory(work, layout, cuda=cuda)
    states = " / ".join(_mb(r.states.held.total) for r in ranks)
    peaks = " / ".join(_mb(r.steady_peak) for r in ranks)
    return (f"plan (python -m pyruntime plan): per rank of pp {' / '.join(str(r.pp_rank) for r in ranks)}: "
            f"model state {states} MB, activations in flight "
            f"{' / '.join(_mb(r.activations) for r in ranks)} MB, steady peak {peaks} MB"
            + ("" if cuda else " (CPU: no allocator allowance)"))


def plan_check_line(cfg: Config, rec: dict, pp_rank: int, cuda: bool) -> str:
    """Rank pp_rank's prediction next to the first step's measured record."""
    work, layout = workload_layout(cfg)
    r = all_rank_memory(work, layout, cuda=cuda)[pp_rank]
    held = sum(rec.get(k, 0) for k in ("param_bytes", "grad_bytes", "optim_bytes"))
    line = f"plan vs measured (rank 0, step {rec.get('step', 1)}): model state {_mb(r.states.held.total)} vs {_mb(held)} MB"
    if cuda:
        line += f", peak {_mb(r.steady_peak)} vs {rec['peak_mem_mb']:.2f} MB (torch.cuda.max_memory_allocated)"
    return line

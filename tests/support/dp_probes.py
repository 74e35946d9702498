"""The data-parallel engines' overlap probe, run on spawned ranks (support/dp_cases.py puts
it into the shared dp world)."""
from __future__ import annotations

import torch

from pyruntime.mesh import ParallelDims
from pyruntime.parallel.data import apply_data_parallel
from pyruntime.parallel.parallelize import build_model

from support.configs import tiny_config, with_parallel


def overlap_probe(rank: int, world_size: int, zero: int, out_dir: str) -> dict[str, int]:
    """Collectives issued by the time the backward reaches the embedding (the last thing it
    computes) versus by the end of the backward: overlap means most were issued before."""
    cfg = with_parallel(tiny_config(out_dir, global_batch=2 * world_size, micro_batch=2), dp=world_size,
                        zero=zero, bucket_mb=0.01)
    dims = ParallelDims(world_size, 1, 1, world_size).build_mesh("cpu")
    model = build_model(cfg, torch.device("cpu"))
    engine = apply_data_parallel(model, dims, cfg)
    stats = engine.comm.stats
    seen: dict[str, int] = {}

    def snapshot(_grad):
        seen.update({f"mid_{k}": v for k, v in stats.calls.items()})

    def on_embedding_output(_module, _args, out):
        out.register_hook(snapshot)

    model.embed_tokens.register_forward_hook(on_embedding_output)
    x = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len), generator=torch.Generator().manual_seed(rank))
    with engine.micro_batch(last=True):
        model(x).float().logsumexp(-1).mean().backward()
    engine.finish_gradient_sync()
    seen.update({f"end_{k}": v for k, v in stats.calls.items()})
    return seen

"""Tensor parallelism (Megatron style): layers that hold one shard of a weight each, the
vocab-parallel cross-entropy, apply_tp, which shards the reference model in place, and
full_state_dict, which gathers the shards back under the reference names."""
from pyruntime.parallel.tensor.apply import ParallelAttention, ParallelMLP, apply_tp
from pyruntime.parallel.tensor.cross_entropy import vocab_parallel_cross_entropy
from pyruntime.parallel.tensor.layers import (ColumnParallelLinear, ColumnParallelSwiGLU, RowParallelLinear,
                                              SequenceParallelRMSNorm, VocabParallelEmbedding, gather_sequence,
                                              scatter_sequence, tp_replicas)
from pyruntime.parallel.tensor.unshard import full_state_dict

__all__ = [
    "ColumnParallelLinear", "ColumnParallelSwiGLU", "ParallelAttention", "ParallelMLP", "RowParallelLinear",
    "SequenceParallelRMSNorm", "VocabParallelEmbedding", "apply_tp", "full_state_dict", "gather_sequence",
    "scatter_sequence", "tp_replicas", "vocab_parallel_cross_entropy",
]

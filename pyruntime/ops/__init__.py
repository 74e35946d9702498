"""The only caller of kernels. Each op: an autograd Function over the Triton kernel (CUDA),
the C++ op, or a pure-PyTorch reference, chosen by ops.dispatch.choose()."""
from pyruntime.ops.adamw import DecayMask, adamw_step
from pyruntime.ops.dispatch import BACKENDS, BackendUnavailable
from pyruntime.ops.cross_entropy import cross_entropy, vocab_parallel_ce_grad_, vocab_parallel_ce_stats
from pyruntime.ops.flat import FlatLayout, flat_pack, flat_unpack, plan_flat_layout
from pyruntime.ops.linear import linear, swiglu_linear
from pyruntime.ops.rmsnorm import rms_norm
from pyruntime.ops.swiglu import swiglu

__all__ = [
    "BACKENDS", "BackendUnavailable", "FlatLayout", "flat_pack", "flat_unpack",
    "plan_flat_layout", "rms_norm", "swiglu",
    "cross_entropy", "linear", "swiglu_linear", "vocab_parallel_ce_grad_", "vocab_parallel_ce_stats",
    "DecayMask", "adamw_step",
]

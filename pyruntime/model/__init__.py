"""Reference Llama-style decoder (no communication) and its layout-invariant initialisation."""
from pyruntime.model.init import full_init, init_weights
from pyruntime.model.llama import Transformer, count_params, flops_per_token

__all__ = ["Transformer", "count_params", "flops_per_token", "full_init", "init_weights"]

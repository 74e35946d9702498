"""The planner: memory and step time of any layout, predicted before anything runs.

    from pyruntime.plan import Layout, Workload, rank_states, device
    work = Workload(model=PRESETS["7b"], seq_len=4096, global_batch=64)
    rank_states(work, Layout(dp=8, zero=3)).held      # model-state bytes per rank, exact

`python -m pyruntime plan --help` is the command line. Modules: layout (inputs, which
parameters each rank holds), states (model-state bytes), devices (the hardware table), flops
(FLOPs and time to train), measure (the trainer-side measurements the tests check against).
"""
from pyruntime.plan.devices import DEVICES, Device, device
from pyruntime.plan.flops import hardware_flops_per_token, rule_of_thumb_flops, seconds_to_train
from pyruntime.plan.layout import Layout, PlanError, Workload, check, rank_params
from pyruntime.plan.states import RankStates, all_rank_states, rank_states

__all__ = ["DEVICES", "Device", "Layout", "PlanError", "RankStates", "Workload", "all_rank_states", "check",
           "device", "hardware_flops_per_token", "rank_params", "rank_states", "rule_of_thumb_flops",
           "seconds_to_train"]

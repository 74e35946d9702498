"""The planner's printed report: memory per pipeline rank, broken down, and time per step."""
from __future__ import annotations

from pyruntime.plan.layout import Layout, Workload
from pyruntime.plan.memory import RankMemory
from pyruntime.plan.timing import Cluster, StepTime


def gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def _why_not(r: RankMemory, capacity: float) -> str:
    parts = {"model states": r.states.device_peak, "activations": r.activations,
             "ZeRO-3 units": r.gathered, "loss": r.loss_transient, "buckets": r.buckets, "allowance": r.allowance}
    biggest = max(parts, key=parts.get)
    return (f"does not fit: peak {gb(max(r.steady_peak, r.first_step_peak))} > {gb(capacity)} "
            f"(largest part: {biggest}, {gb(parts[biggest])})")


def memory_lines(work: Workload, layout: Layout, cluster: Cluster, ranks: list[RankMemory]) -> list[str]:
    m, dev = work.model, cluster.device
    lines = [f"plan | {layout.describe()} | {cluster.gpus} x {dev.name} ({gb(dev.memory)}, "
             f"{dev.peak_flops / 1e12:.0f} TFLOP/s) | seq {work.seq_len}, global batch {work.global_batch}, "
             f"{work.microbatches(layout)} micro-batch(es) per dp rank",
             f"device figures: {dev.source}"]
    for r in ranks:
        s = r.states.held
        fits = r.fits(dev.memory)
        lines += [
            f"pp rank {r.pp_rank}: {r.states.params / 1e6:,.1f}M parameters per rank",
            f"  model states  params {gb(s.param)} (incl. fp32 master shard), grads {gb(s.grad)}, "
            f"optimizer moments {gb(s.optim)}" + (f"; on the host: {gb(r.states.host)}" if r.states.host else ""),
            f"  activations   {gb(r.activations)} = {r.in_flight} micro-batch(es) in flight (C++ schedule "
            f"simulator) x {gb(sum(r.activation_per_micro) / len(r.activation_per_micro))}"
            + (f" [recompute {layout.recompute}]" if layout.recompute != "none" else ""),
            f"  transients    loss/logits {gb(r.loss_transient)}, ZeRO-3 gathered + prefetched unit and flat "
            f"gradient copy {gb(r.gathered)}, bucket in flight {gb(r.buckets)}",
            f"  allowance     {gb(r.allowance)} (CUDA context + 5% allocator slack: an allowance, not measured)",
            f"  peak          first step {gb(r.first_step_peak)}, steady {gb(r.steady_peak)} -> "
            + ("fits" if fits else _why_not(r, dev.memory)),
        ]
    return lines


def time_lines(work: Workload, layout: Layout, t: StepTime, tokens: float | None) -> list[str]:
    lines = [
        f"time per step {t.step:.3f} s: pipeline {t.pipeline:.3f} s (forward {t.forward * 1e3:.2f} ms + "
        f"backward {t.backward * 1e3:.2f} ms per micro-batch, tp collectives {t.tp_comm:.3f} s, "
        f"bubble {t.bubble:.3f} s), data-parallel comm {t.dp_comm:.3f} s of which exposed {t.dp_exposed:.3f} s, "
        f"optimizer {t.optimizer:.3f} s" + (" (on the host, with the copies the backward does not hide)"
                                            if layout.offload == "optimizer" else ""),
        f"throughput {t.tokens_per_s:,.0f} tokens/s, MFU {t.mfu:.1%}",
        "compute from " + ("this model's blocks as timed by the calibration profile" if t.measured_blocks
                           else "FLOPs at the device's sustained rate (a profile calibrated with this model "
                                "and sequence length times its blocks instead)"),
    ]
    if tokens:
        lines.append(f"{tokens:.3g} tokens: {t.days(tokens):,.1f} days")
    return lines

"""Microbenchmarks, each side by side with the PyTorch equivalent in the same run:
`python -m pyruntime bench SUITE [options]` (`bench SUITE --help` for a suite's options,
`bench all` runs every suite with its defaults). Every suite is a module of this package
with a `main(argv) -> exit code`; they share `harness.py` (median timing, tables, header).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# suite -> (module of this package, one line on what it measures and against what)
SUITES: dict[str, tuple[str, str]] = {
    "tp": ("tp", "kernels of the tensor-parallel layers (fused GEMM+epilogue, SwiGLU, vocab-parallel "
                 "cross-entropy) vs eager PyTorch / F.cross_entropy, one device"),
    "pp": ("pp", "pipeline step time per schedule vs torch.distributed.pipelining, 2 gloo ranks"),
    "zero": ("zero", "ZeRO-0 / ZeRO-3 step time and memory vs torch DDP / FSDP2, gloo ranks"),
    "flat": ("flat", "flat pack / unpack vs torch.cat / _foreach_copy_, fused AdamW vs torch.optim.AdamW"),
    "overlap": ("overlap", "communication the overlapped tp GEMMs leave exposed, one device (peers stood in by copies)"),
    "tpstep": ("tpstep", "tp training step vs PyTorch's parallelize_module (DTensor), gloo ranks"),
    "adam": ("adam", "the C++ host AdamW vs torch.optim.AdamW fused / foreach on CPU, 1M-100M params, GB/s next "
                     "to a triad measured in the same run"),
    "recompute": ("recompute", "step time and measured activation bytes of --recompute none / selective / full, "
                               "one process (small preset on CPU)"),
    "initmem": ("initmem", "peak memory of building a ZeRO-3 model, deferred vs eager init, gloo ranks"),
    "hf": ("hf", "Hugging Face directory load (1B shape, bf16 shards) vs transformers.from_pretrained, tp 2 "
                 "peak RSS per rank; tokenize vs tokenizers' encode_batch"),
    "plan": ("plan", "the planner's predicted step time vs the trainer's measured one, 12 layouts of <= 2 "
                     "gloo ranks after plan --calibrate; Kendall tau of the ranking"),
}


def suites_help() -> str:
    width = max(map(len, SUITES))
    return "\n".join(f"  {name.ljust(width)}  {text}" for name, (_, text) in SUITES.items()) + \
        f"\n  {'all'.ljust(width)}  every suite above with its defaults, one after another"


def run(argv: list[str]) -> int:
    """Entry of `python -m pyruntime bench SUITE ...` (argv: the words after "bench")."""
    if argv[:1] == ["all"] and len(argv) == 1:
        return max(run([suite]) for suite in SUITES)
    if argv[:1] and argv[0] in SUITES:
        module = importlib.import_module(f"pyruntime.bench.{SUITES[argv[0]][0]}")
        try:
            return module.main(argv[1:])
        except SystemExit as e:  # a suite's --help (0) or bad options (2, one line said)
            return int(e.code or 0)
        except Exception as e:  # noqa: BLE001 - the user's errors (a model that cannot be built, a missing
            from pyruntime.cli import user_error  # profile, a --tmp under a file) as one line; a bug as it is

            said = user_error(e)
            if said is None:
                raise
            print(f"pyruntime bench {argv[0]}: error: {said[1]}", file=sys.stderr)
            return said[0]
    parser = argparse.ArgumentParser(prog="pyruntime bench", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description=__doc__.split("\n\n")[0], epilog="suites:\n" + suites_help())
    parser.add_argument("suite", help="the suite to run (listed below)")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    if argv[0] not in SUITES and argv[0] != "all":
        print(f"pyruntime bench: no suite '{argv[0]}'; the suites are {', '.join(SUITES)}, all", file=sys.stderr)
        return 2
    print(f"pyruntime bench: 'all' takes no options, got {' '.join(argv[1:])}", file=sys.stderr)
    return 2

"""Hugging Face interop, side by side with the ecosystem's own tools in one run:

  load      a Llama-3.2-1B-shaped directory (bf16 shards, tied embeddings, written here with
            random values) read into fp32 parameters: ours (meta model + HFInit, dp 1) vs
            transformers' AutoModelForCausalLM.from_pretrained(dtype=float32), wall time of
            each run (interleaved, each first in turn, each in a new process after one
            untimed load of a tiny directory there);
            then peak resident memory per rank at tp 2 (2 gloo ranks, each reading its
            blocks) against the full fp32 model's bytes.
  tokenize  `tokenize_files` (our tokenize command, --workers 1 and --workers N) vs reading
            the same records and calling tokenizers' encode_batch directly, tokens per second
            (median of --repeat interleaved runs).

    python -m pyruntime bench hf                 # both, 1B shape (needs ~12 GB of RAM)
    python -m pyruntime bench hf --layers 4      # a smaller model
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _status_mb() -> dict[str, float]:
    with open("/proc/self/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) / 1024 for line in f if line.startswith(("VmHWM", "VmRSS"))}


def write_model_dir(path: Path, args) -> dict:
    """A Llama config.json and bf16 shards of random weights (one tensor in memory at a time)."""
    from safetensors.torch import save_file

    from pyruntime.hf.config import model_config_from_hf
    from pyruntime.hf.export import plan_shards
    from pyruntime.hf.load import INDEX, hf_name
    from pyruntime.model.llama import reference_shapes

    raw = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": args.vocab,
           "hidden_size": args.dim, "intermediate_size": args.ffn, "num_hidden_layers": args.layers,
           "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads, "hidden_act": "silu",
           "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
           "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
           "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
    shapes = reference_shapes(model_config_from_hf(raw))
    shards = plan_shards({n: math.prod(s) * 2 for n, s in shapes.items()}, int(args.shard_gb * 1e9))
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({hf_name(n): torch.randn(shapes[n], dtype=torch.bfloat16) * 0.02 for n in names}, str(path / file))
        weight_map.update({hf_name(n): file for n in names})
    (path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(raw))
    return {"params": sum(math.prod(s) for s in shapes.values())}


def _timed(load) -> tuple[float, float, float, int]:
    """(wall s, user-space CPU s, kernel CPU s, minor page faults) of one load, every thread of
    this process. On this kind of machine nearly all of a load is the kernel faulting in fresh
    pages for the fp32 parameters, which both loaders need alike and whose cost per fault swings
    several-fold with the host (how much of the memory it has just reclaimed); the user-space
    time and the fault count are what a loader itself decides. The model is kept until the
    clocks are read: freeing it (unmapping ~5 GB, 0.3 s here) is not part of loading, and would
    otherwise fall inside one loader's time and not the other's (a model with reference cycles
    lives until the next garbage collection)."""
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    model = load()
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    del model
    gc.collect()
    return wall, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt


def load_ours(path: str) -> tuple:
    from pyruntime.hf.load import HFDir, HFInit
    from pyruntime.model import Transformer

    def load():
        hf = HFDir.open(path)
        with torch.device("meta"):
            model = Transformer(hf.model)
        HFInit(model, hf, None, torch.device("cpu")).materialize([model])
        return model
    return _timed(load)


def load_transformers(path: str) -> tuple:
    import transformers

    return _timed(lambda: transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))


def _tp_rank(rank: int, world: int, path: str) -> dict:
    from pyruntime.hf.load import HFDir, HFInit
    from pyruntime.mesh import ParallelDims
    from pyruntime.model import Transformer
    from pyruntime.parallel.tensor import apply_tp

    dims = ParallelDims(dp=1, pp=1, tp=world, world_size=world).build_mesh("cpu")
    before = _status_mb()
    hf = HFDir.open(path)
    with torch.device("meta"):
        model = Transformer(hf.model)
    apply_tp(model, dims)
    init = HFInit(model, hf, dims.group("tp"), torch.device("cpu"))
    init.materialize([model])
    after = _status_mb()
    return {"peak_mb": after["VmHWM"] - before["VmHWM"], "read_mb": init.reader.bytes_read / 2**20}


def _fresh_process_load(which: str, path: str, warm: str) -> dict[str, float]:
    """One load in a new Python process, after one untimed load of the tiny directory `warm`
    there: its wall time, user-space and kernel CPU time, page faults (see _timed) and the
    process's peak resident memory. A user loads a model once per process, and loads in one
    process one after another inherit each other's freed memory and heap (measured: in one
    process the ratio swung from 0.56x to 1.2x between runs)."""
    code = ("import resource, sys, warnings; warnings.filterwarnings('ignore')\n"
            "import transformers; transformers.utils.logging.disable_progress_bar();"
            " transformers.utils.logging.set_verbosity_error()\n"
            "from pyruntime.bench import hf\n"
            f"load = hf.load_{which}\nload({warm!r})\n"
            f"print(*load({path!r}), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench hf: the {which} load failed: {done.stderr.strip()[-2000:]}")
    wall, user, kernel, faults, peak_kb = map(float, done.stdout.split()[-5:])
    return {"wall": wall, "user": user, "kernel": kernel, "faults": faults, "peak": peak_kb / 2**20}


def _warm_up(tmp: Path, args) -> None:
    """A tiny directory each timed process loads once untimed (imports, lazy modules, torch's
    first meta-device build are then in neither loader's time), and a read of the benchmark's
    files, so both find them in the page cache."""
    small = argparse.Namespace(**{**vars(args), "dim": 64, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 128,
                                  "vocab": 512})
    (tmp / "warm").mkdir()
    write_model_dir(tmp / "warm", small)
    for file in sorted((tmp / "model").glob("*.safetensors")):
        with open(file, "rb") as f:
            while f.read(64 << 20):
                pass


def bench_load(args) -> list[str]:
    from pyruntime.spawn import run_world

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        (Path(tmp) / "model").mkdir()
        info = write_model_dir(Path(tmp) / "model", args)
        full_mb = info["params"] * 4 / 2**20
        _warm_up(Path(tmp), args)
        runs, path = [], str(Path(tmp) / "model")
        warm = str(Path(tmp) / "warm")
        for i in range(args.repeat):  # interleaved, each going first in turn, each in a new process
            first, second = ("ours", "transformers") if i % 2 == 0 else ("transformers", "ours")
            a = _fresh_process_load(first, path, warm)
            b = _fresh_process_load(second, path, warm)
            runs.append((a, b) if i % 2 == 0 else (b, a))
        ranks = run_world(2, _tp_rank, str(Path(tmp) / "model"), timeout=1800)
    lines = [f"load: {info['params'] / 1e9:.2f} B params, bf16 shards -> fp32; {args.repeat} runs, interleaved, "
             "each load in a new process; wall time (user-space CPU, kernel CPU, minor page faults)",
             "| what | ours | transformers.from_pretrained | transformers / ours |", "|---|---|---|---|"]

    def cell(r: dict) -> str:
        return f"{r['wall']:.2f} s ({r['user']:.2f} s, {r['kernel']:.2f} s, {r['faults'] / 1e6:.2f} M)"
    for i, (ours, theirs) in enumerate(runs):
        lines.append(f"| dp 1 load, run {i + 1} ({'ours' if i % 2 == 0 else 'transformers'} first) "
                     f"| {cell(ours)} | {cell(theirs)} | {theirs['wall'] / ours['wall']:.2f}x |")
    for key, what, unit in (("wall", "wall time", "s"), ("user", "user-space CPU", "s"),
                            ("kernel", "kernel CPU", "s"), ("faults", "minor page faults", ""),
                            ("peak", "process peak RSS", "GiB")):
        ours, theirs = (statistics.median(r[side][key] for r in runs) for side in (0, 1))
        show = (lambda v: f"{v / 1e6:.3f} M") if key == "faults" else (lambda v: f"{v:.2f} {unit}")
        lines.append(f"| dp 1 load, median {what} | {show(ours)} | {show(theirs)} | {f'{theirs / ours:.2f}x' if ours else '-'} |")
    for r, res in enumerate(ranks):
        lines.append(f"| tp 2 rank {r} peak RSS | {res['peak_mb']:.0f} MiB = {res['peak_mb'] / full_mb:.2f}x the full "
                     f"fp32 model ({full_mb:.0f} MiB); read {res['read_mb']:.0f} MiB of bf16 | | |")
    return lines


def bench_tokenize(args) -> list[str]:
    from pyruntime.data.tokenize import documents, tokenize_files, train_bpe

    line = "The quick brown fox jumps over the lazy dog; fine-tuning a model on its own data. "
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        src = Path(tmp) / "corpus.jsonl"
        src.write_text("".join(json.dumps({"text": f"{i}: " + line * 8}) + "\n" for i in range(args.docs)))
        tok = train_bpe(iter([line * 50]), 1000, Path(tmp) / "tokenizer.json")
        ours: dict[int, list[float]] = {w: [] for w in sorted({1, args.workers})}
        theirs: list[float] = []
        for _ in range(args.repeat):  # interleaved: a busy moment of a shared host hits both sides
            for workers in ours:
                t0 = time.perf_counter()
                total, _ = tokenize_files([str(src)], Path(tmp) / f"out{workers}.bin", tok, workers=workers)
                ours[workers].append(time.perf_counter() - t0)
            t0 = time.perf_counter()  # the same reading and parsing, then one encode_batch (its threads)
            texts = [t for doc in documents([str(src)], tok, "text") for t, _ in doc]
            direct = sum(len(e.ids) for e in tok.tok.encode_batch(texts, add_special_tokens=False))
            theirs.append(time.perf_counter() - t0)
    lines = [f"tokenize: {args.docs} JSON lines, {total} tokens (ours, EOS included) / {direct} (direct); "
             f"median of {args.repeat} interleaved runs",
             "| what | ours (tokenize_files) | tokenizers encode_batch | ours / direct throughput |",
             "|---|---|---|---|"]
    peer = direct / statistics.median(theirs)
    for workers, took in ours.items():
        mine = total / statistics.median(took)
        lines.append(f"| tokens/s, --workers {workers} | {mine:,.0f} | {peer:,.0f} | {mine / peer:.2f}x |")
    return lines


def main(argv=None) -> int:
    from pyruntime.bench.harness import header, require, suite_parser

    parser = suite_parser("hf", __doc__)
    parser.add_argument("--part", choices=["load", "tokenize", "both"], default="both")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--shard-gb", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each side (load: interleaved, each first in turn; tokenize: interleaved)")
    parser.add_argument("--docs", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenize processes (also 1 is run)")
    parser.add_argument("--tmp", default=None, help="where the model directory is written (default: the system's)")
    args = parser.parse_args(argv)
    require(parser, args, positive=("dim", "layers", "heads", "kv_heads", "ffn", "vocab", "shard_gb", "repeat", "docs",
                                    "workers"))
    import importlib.util

    missing = [m for m in ("transformers", "tokenizers") if importlib.util.find_spec(m) is None]
    if missing:  # the peer and the tokenizer this suite compares against
        parser.error(f"needs {' and '.join(missing)}, not installed: pip install \"pyruntime[dev]\"")
    lines = header(["hf", *(argv or [])], "reference", "CPU loading and tokenizing")[:3]
    if args.part in ("load", "both"):
        lines += bench_load(args)
    if args.part in ("tokenize", "both"):
        lines += bench_tokenize(args)
    print("\n".join(lines), flush=True)
    return 0

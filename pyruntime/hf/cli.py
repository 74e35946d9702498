"""Command-line pieces for Hugging Face directories (wired in by pyruntime/cli.py):

    train --init-from DIR [--export-hf OUT]     the model section comes from DIR/config.json
    export CHECKPOINT --hf OUT                  a saved checkpoint -> a Hugging Face directory
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

from pyruntime.config import ConfigError
from pyruntime.hf.export import COMPANIONS, DTYPES, check_export_dir, export_checkpoint
from pyruntime.hf.load import HFDir


def model_from_init_dir(raw: dict) -> dict:
    """raw (the nested config the CLI built) with its model section replaced by the one of
    train.init_from's config.json. A --preset, or a model field that disagrees with the
    directory, is an error: the weights fix the shape. Reads headers only (no weights), so
    a bad directory fails here, before any process group exists."""
    train, model = raw.get("train", {}), dict(raw.get("model", {}))
    source = train.get("init_from")
    if not source:
        return raw
    if "preset" in train:
        raise ConfigError(f"--preset {train['preset']} and --init-from {source} both choose the model; pass one")
    hf = HFDir.open(source, **({"kernels": model["kernels"]} if "kernels" in model else {}))
    fields = dataclasses.asdict(hf.model)
    for key, value in model.items():
        if key in ("kernels",):
            continue
        if key == "max_seq_len" and isinstance(value, int) and 0 < value <= fields["max_seq_len"]:
            fields[key] = value  # a shorter context than the model's changes no weight
            continue
        if key not in fields or fields[key] != value:
            raise ConfigError(f"model.{key} {value!r} conflicts with {source}/config.json "
                              f"({fields.get(key, 'no such field')!r})")
    return {**raw, "model": fields}


def add_export_parser(sub) -> None:
    export = sub.add_parser("export", help="write a checkpoint as a Hugging Face model directory")
    export.add_argument("checkpoint", help="a step_N checkpoint directory, or a checkpoints/ folder (its latest)")
    export.add_argument("--hf", required=True, metavar="OUT_DIR", help="the Hugging Face directory to write")
    export.add_argument("--dtype", default="float32", help=f"weights dtype: {', '.join(DTYPES)}")
    export.add_argument("--shard-mb", type=float, default=5000.0, help="largest shard in MB (default 5000)")
    export.add_argument("--tokenizer-from", metavar="DIR_OR_FILE",
                        help="copy tokenizer / generation files (and token ids) from this model directory, or "
                             "this tokenizer.json (e.g. the one tokenize --train-bpe wrote); default: the run's "
                             "--init-from directory, where it still exists")


def run_export(args: argparse.Namespace) -> int:
    """Every argument is checked before the checkpoint is read (and OUT before it is replaced)."""
    if args.dtype not in DTYPES:
        raise ConfigError(f"--dtype {args.dtype} is not one of {', '.join(DTYPES)}")
    if not (math.isfinite(args.shard_mb) and args.shard_mb * 1e6 >= 1):
        raise ConfigError(f"--shard-mb must be a finite number of MB >= 0.000001 (one byte), got {args.shard_mb}")
    if args.tokenizer_from is not None:
        src = Path(args.tokenizer_from)
        if src.is_file() and src.suffix != ".json":
            raise ConfigError(f"--tokenizer-from {src} is not a tokenizer.json; give that file or the model "
                              "directory holding it")
        if not src.exists():
            raise ConfigError(f"--tokenizer-from {src}: no such file or directory; give the model directory "
                              "holding tokenizer.json, or the file")
        if src.is_dir() and not any((src / name).is_file() for name in COMPANIONS):
            raise ConfigError(f"--tokenizer-from {src} holds none of {', '.join(COMPANIONS)}")
    check_export_dir(args.hf, "export directory (--hf)")
    from pyruntime.train.checkpoint import read_meta, resolve_checkpoint

    init_from = read_meta(resolve_checkpoint(args.checkpoint)).get("init_from")  # None before it was recorded
    if init_from and Path(args.hf).resolve() == Path(init_from):
        raise ConfigError(f"--hf {args.hf} is the model directory the run started from (--init-from): the export "
                          "would replace it; give another directory")
    companions = args.tokenizer_from
    if companions is None and init_from and Path(init_from).is_dir():
        companions = init_from  # the run's tokenizer, generation config and token ids travel with its weights
    out = export_checkpoint(args.checkpoint, args.hf, max_shard_bytes=int(args.shard_mb * 1e6), dtype=args.dtype,
                            companions_from=companions)
    print(f"wrote {out}" + (f" (tokenizer files from {companions}, the run's --init-from)"
                            if companions is not None and args.tokenizer_from is None else ""))
    return 0

"""Writing a Hugging Face model directory that `transformers.AutoModelForCausalLM.from_pretrained`
loads with no missing or unexpected keys: config.json (hf/config.py) + safetensors shards of at
most `max_shard_bytes` each + model.safetensors.index.json (one model.safetensors, no index,
when everything fits in one shard, as transformers writes it).

    export_hf(trainer, "out/hf")                        # from a running job (a collective)
    export_checkpoint("runs/x/checkpoints", "out/hf")   # from a saved checkpoint, one process

Tensors keep the model's order, so layer i's tensors sit together and a loader reading one
pipeline stage opens few shards. A tied model stores the embedding once (no lm_head.weight),
as transformers does. Files are written into OUT.tmp and renamed into place at the end.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from pyruntime.train.faults import os_cause
from pyruntime.config import ModelConfig
from pyruntime.hf.config import HFError, hf_config_from_model
from pyruntime.hf.load import INDEX, SINGLE, hf_name
from pyruntime.model.llama import reference_shapes

DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size, "5GB"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Files of the source directory that belong with the weights (tokenizer, generation defaults).
COMPANIONS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "tokenizer.model")
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Names (in order) cut into consecutive shards of at most max_bytes; a tensor larger
    than max_bytes gets a shard of its own."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def _export_file(name: str) -> bool:
    """A file an export writes (so one it may replace)."""
    return name in COMPANIONS or name in ("config.json", SINGLE, INDEX) or bool(SHARD.fullmatch(name))


def check_export_dir(out: str | os.PathLike, what: str = "export directory") -> None:
    """An export replaces OUT whole, so OUT must be new, empty or an earlier export (only the
    files an export writes): `--hf runs/x` would otherwise delete the run's checkpoints."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HFError(f"{what} {out} is a file; give a directory")
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if not _export_file(p.name))
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise HFError(f"{what} {out} holds '{foreign[0]}'{more}, which an export does not write; the export replaces "
                      "the directory whole: give a new or empty directory, or an earlier export")


def write_hf_dir(tensors: dict[str, torch.Tensor], cfg: ModelConfig, out: str | os.PathLike, *,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, dtype: str = "float32",
                 companions_from: str | os.PathLike | None = None) -> Path:
    """Write `tensors` ({reference name: full tensor}) as a Hugging Face directory `out`.
    companions_from: a directory whose tokenizer / generation files are copied along, or a
    tokenizer.json file (copied as tokenizer.json)."""
    if dtype not in DTYPES:
        raise HFError(f"export dtype '{dtype}' is not supported; use one of {', '.join(DTYPES)}")
    if max_shard_bytes < 1:
        raise HFError(f"export shard size must be > 0 bytes, got {max_shard_bytes}")
    out = Path(out)
    check_export_dir(out)
    token_ids = companion_token_ids(companions_from, cfg.vocab_size)
    order = list(reference_shapes(cfg))
    missing = [n for n in order if n not in tensors]
    if missing:
        raise HFError(f"export to {out}: no tensor '{missing[0]}'")
    data = {n: tensors[n].detach().to("cpu", DTYPES[dtype]).contiguous() for n in order}
    sizes = {n: t.numel() * t.element_size() for n, t in data.items()}
    shards = plan_shards(sizes, max_shard_bytes)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_files(tmp, data, sizes, shards, cfg, dtype, companions_from, token_ids)
    except Exception as e:  # a full disk or read-only mount: one line, no half-written export left
        shutil.rmtree(tmp, ignore_errors=True)
        cause = os_cause(e)
        if cause is None:
            raise
        raise HFError(f"cannot write the Hugging Face export {out}: {cause}") from None
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _write_files(tmp: Path, data: dict[str, torch.Tensor], sizes: dict[str, int], shards: list[list[str]],
                 cfg: ModelConfig, dtype: str, companions_from, token_ids: dict) -> None:
    from safetensors.torch import save_file

    tmp.mkdir(parents=True)
    weight_map = {}
    for i, names in enumerate(shards):
        file = SINGLE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({hf_name(n): data[n] for n in names}, str(tmp / file), metadata={"format": "pt"})
        weight_map.update({hf_name(n): file for n in names})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    extra = {}
    if companions_from is not None and Path(companions_from).is_file():  # a lone tokenizer.json
        shutil.copyfile(companions_from, tmp / "tokenizer.json")
    elif companions_from is not None:
        src = Path(companions_from)
        for name in COMPANIONS:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        extra = {k: v for k, v in _read_json(src / "config.json").items() if k.endswith("token_id")}
    if not extra:  # no model config to copy them from: the tokenizer's
        extra = token_ids
    (tmp / "config.json").write_text(json.dumps({**hf_config_from_model(cfg, dtype=dtype), **extra}, indent=2) + "\n")


def companion_token_ids(source: str | os.PathLike | None, vocab_size: int) -> dict:
    """The tokenizer an export carries (a directory's tokenizer.json, or the file; none: {}):
    refused when it has ids past the model's vocabulary (transformers would index past the
    embedding); else its eos_token_id (and bos_token_id where tokenizer_config.json names one)
    for config.json, where no model config gives them: without them transformers' generate
    never stops."""
    if source is None or not (Path(source).is_file() or (Path(source) / "tokenizer.json").is_file()):
        return {}
    from pyruntime.data.tokenize import load_tokenizer
    from pyruntime.data.tokenize_inputs import TokenizeError

    try:
        tok = load_tokenizer(source)
    except TokenizeError as e:
        raise HFError(str(e)) from None
    if tok.vocab_size > vocab_size:
        raise HFError(f"the tokenizer of {source} has {tok.vocab_size} tokens, more than the model's vocabulary of "
                      f"{vocab_size}")
    ids = {"eos_token_id": tok.eos_id}
    if tok.bos and tok.tok.token_to_id(tok.bos) is not None:
        ids["bos_token_id"] = tok.tok.token_to_id(tok.bos)
    return ids


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def export_hf(trainer, out: str | os.PathLike, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
              dtype: str = "float32", companions_from: str | os.PathLike | None = None) -> Path:
    """Export the running job's weights as a Hugging Face directory; a collective over the
    world (rank 0 gathers and writes; see checkpoint.gather_weights)."""
    from pyruntime.train.checkpoint import _agree, gather_weights

    if dtype not in DTYPES:
        raise HFError(f"export dtype '{dtype}' is not supported; use one of {', '.join(DTYPES)}")
    tensors = gather_weights(trainer, DTYPES[dtype])
    error = None
    if dist.get_rank() == 0:
        try:
            write_hf_dir(tensors, trainer.cfg.model, out, max_shard_bytes=max_shard_bytes, dtype=dtype,
                         companions_from=companions_from)
        except (OSError, HFError) as e:
            error = f"export to {out} failed: {os_cause(e) or e}"
    _agree(trainer, error, f"export to {out}")
    return Path(out)


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, *,
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES, dtype: str = "float32",
                      companions_from: str | os.PathLike | None = None) -> Path:
    """A saved checkpoint (any layout; a step_<N> dir or a checkpoints dir) -> Hugging Face
    directory, in one process, checksums verified."""
    cfg, tensors = read_checkpoint_weights(checkpoint)
    return write_hf_dir(tensors, cfg, out, max_shard_bytes=max_shard_bytes, dtype=dtype,
                        companions_from=companions_from)


def read_checkpoint_weights(checkpoint: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(model config, {reference name: full fp32 weight}) of a saved checkpoint, read in this
    one process (no process group), checksums verified; CheckpointError names a problem."""
    import torch.distributed.checkpoint as dcp

    from pyruntime.train.checkpoint import CheckpointError, _read_tensors, check_model, read_meta, resolve_checkpoint

    ckpt = resolve_checkpoint(checkpoint)
    meta = read_meta(ckpt)
    try:
        cfg = ModelConfig(**meta["model"])
    except TypeError as e:
        raise CheckpointError(f"checkpoint {ckpt}: unreadable model config ({e})") from None
    check_model(meta["model"], cfg, f"checkpoint {ckpt}:")
    shapes = reference_shapes(cfg)
    request = {f"model.{n}": torch.empty(s, dtype=torch.float32) for n, s in shapes.items()}
    request["train.step"] = torch.zeros((), dtype=torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        error = _read_tensors(dcp.FileSystemReader(ckpt), request, meta, ckpt)
    if error:
        raise CheckpointError(error)
    return cfg, {n: request[f"model.{n}"] for n in shapes}

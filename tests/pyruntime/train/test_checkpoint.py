"""Checkpoints: exact same-layout resume, resharding across dp / tp / sequence parallel / ZeRO
stages, crash safety, safetensors export / import, and one-line errors for bad input.

One 4-rank world (tests/ckpt_world.py) does every multi-rank case; single-process training
(every layout reproduces it within 1e-5) is the reference they are compared with."""
from __future__ import annotations

import dataclasses
import json
import shutil
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from pyruntime.mesh import Launch, ParallelDims, init_distributed
from pyruntime.parallel import deferred_init
from pyruntime.train import checkpoint as ckpt_mod
from pyruntime.train.checkpoint import (CheckpointError, export_safetensors, import_safetensors, load_checkpoint,
                                        save_checkpoint)
from pyruntime.train.ckpt_dirs import resolve_checkpoint, resolve_resume
from pyruntime.train.preflight import check_run
from pyruntime.train.trainer import Trainer

from support.ckpt_world import MODEL, RESUMERS, SAVE_AT, SECOND_SAVE, STEPS, config, losses, world_run
from support.dp_cases import assert_losses_match
from support.world import run_world, single_process


@pytest.fixture(scope="module")
def dims():
    init_distributed(Launch(rank=0, world_size=1, local_rank=0), torch.device("cpu"))
    return ParallelDims(1, 1, 1, 1).build_mesh("cpu")


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


def single(out, dims, **kw) -> Trainer:
    return Trainer(config(out, **kw), dims, torch.device("cpu"))


@pytest.fixture(scope="module")
def reference(out, dims) -> list[float]:
    """Uninterrupted single-process losses (support.world's one reference builder)."""
    return [r["loss"] for r in single_process(config(out))]


@pytest.fixture(scope="module")
def world(out) -> dict:
    return run_world(4, world_run, str(out))[0]


@pytest.fixture(scope="module")
def single_ckpt(out, dims):
    """A single-process checkpoint at SAVE_AT (and its trainer's weights): the bad-input base."""
    t = single(out, dims)
    losses(t, 0, SAVE_AT)
    path = save_checkpoint(t, out / "single", SAVE_AT)
    return path, {n: p.detach().clone() for n, p in t.model.named_parameters()}


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def raises_one_line(match: str, fn, *args) -> str:
    with pytest.raises(CheckpointError, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


# -- resume ---------------------------------------------------------------------------------
def test_single_process_resume_is_exact_and_restores_rng(out, dims, reference):
    t = single(out, dims)
    assert losses(t, 0, SAVE_AT) == reference[:SAVE_AT]
    torch.manual_seed(99)
    rng = torch.get_rng_state()
    path = save_checkpoint(t, out / "exact", SAVE_AT)
    assert path == out / "exact" / f"step_{SAVE_AT}" and (out / "exact" / "latest").read_text().strip() == path.name
    t = single(out, dims)  # re-seeds the RNG
    assert load_checkpoint(t, out / "exact") == SAVE_AT
    assert torch.equal(torch.get_rng_state(), rng)
    assert losses(t, SAVE_AT, STEPS) == reference[SAVE_AT:]  # bit for bit


def test_resume_draws_no_initial_values(out, dims, reference, monkeypatch):
    """With --resume the checkpoint overwrites every value, so the trainer draws none (a
    large model's worth of random numbers at every restart) and still continues exactly."""
    t = single(out, dims)
    losses(t, 0, SAVE_AT)
    path = save_checkpoint(t, out / "no_draws", SAVE_AT)

    def no_draws(*_args, **_kw):
        raise AssertionError("an initial value was drawn although a checkpoint is loaded")

    monkeypatch.setattr(deferred_init, "full_init", no_draws)
    t = Trainer(dataclasses.replace(config(out), train=dataclasses.replace(config(out).train, resume=str(path))),
                dims, torch.device("cpu"))
    assert all(torch.count_nonzero(p) == 0 for p in t.model.parameters())
    assert load_checkpoint(t, path) == SAVE_AT
    assert losses(t, SAVE_AT, STEPS) == reference[SAVE_AT:]


def test_same_layout_multi_rank_resume_is_exact(world, reference):
    """dp 2 x tp 2, sequence parallel, ZeRO-1: save, rebuild, load, continue."""
    assert world["saver_first"] == world["saver_full"][:SAVE_AT]
    assert world["saver_resumed"] == world["saver_full"][SAVE_AT:]
    assert_losses_match(world["saver_full"], reference)


@pytest.mark.parametrize("layout", list(RESUMERS))
def test_resharded_resume_matches_uninterrupted_training(world, reference, layout):
    assert_losses_match(world[layout], reference[SAVE_AT:])


def test_single_process_resumes_multi_rank_checkpoints(out, dims, world, reference):
    # ZeRO-1 x tp 2 x sequence parallel -> dp 1, ZeRO-0
    t = single(out, dims)
    assert load_checkpoint(t, out / "ckpt" / f"step_{SAVE_AT}") == SAVE_AT
    assert_losses_match(losses(t, SAVE_AT, STEPS), reference[SAVE_AT:])
    # dp 4 ZeRO-3 (the latest) -> dp 1
    t = single(out, dims)
    assert load_checkpoint(t, out / "ckpt") == SECOND_SAVE
    assert_losses_match(losses(t, SECOND_SAVE, STEPS), reference[SECOND_SAVE:])


def test_replicated_tensors_are_written_once(out, world, single_ckpt):
    """4 ranks, each holding every full tensor, write as much as one process (+ RNG states)."""
    def size(d):
        return sum(f.stat().st_size for f in d.glob("*.distcp"))
    assert size(out / "ckpt" / f"step_{SAVE_AT}") < 1.15 * size(single_ckpt[0])
    meta = json.loads((out / "ckpt" / f"step_{SAVE_AT}" / "meta.json").read_text())
    assert meta["layout"]["world_size"] == 4 and meta["layout"]["zero"] == 1 and meta["step"] == SAVE_AT
    assert meta["optimizer_steps"] == SAVE_AT


# -- crash safety ---------------------------------------------------------------------------
def test_crash_while_saving_keeps_the_previous_checkpoint(out, dims, monkeypatch):
    root = out / "crash"
    t = single(out, dims)
    losses(t, 0, 2)
    save_checkpoint(t, root, 2)
    losses(t, 2, 4)
    save_checkpoint(t, root, 4)

    def crash(*_args):
        raise KeyboardInterrupt("power cut")
    losses(t, 4, 6)
    monkeypatch.setattr(ckpt_mod, "commit", crash)  # everything written, nothing renamed yet
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(t, root, 6)
    monkeypatch.undo()
    assert (root / "step_6.tmp" / "meta.json").is_file() and not (root / "step_6").exists()
    raises_one_line("incomplete checkpoint", load_checkpoint, single(out, dims), root / "step_6.tmp")
    assert load_checkpoint(single(out, dims), root) == 4  # latest still names step_4

    save_checkpoint(t, root, 6, keep=2)  # the stale .tmp goes; the oldest is pruned
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_4", "step_6"]
    assert load_checkpoint(single(out, dims), root) == 6


# -- safetensors ----------------------------------------------------------------------------
def test_safetensors_round_trip_across_layouts(out, dims, world):
    from safetensors.torch import load_file
    saver, zero3 = load_file(out / "saver.safetensors"), load_file(out / "zero3.safetensors")
    assert set(saver) == set(zero3) and all(torch.equal(saver[k], zero3[k]) for k in saver)
    assert saver["embed_tokens.weight"].shape == (MODEL.vocab_size, MODEL.dim)  # tp padding stripped
    # the file holds the checkpoint's master weights; import resets the optimizer
    t = single(out, dims)
    load_checkpoint(t, out / "ckpt" / f"step_{SAVE_AT}")
    t2 = single(out, dims)
    import_safetensors(t2, out / "saver.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(weights(t).values(), weights(t2).values()))
    assert t2.data_parallel.optimizer_steps() == 0 and not t2.optimizer.state


def test_safetensors_hugging_face_names_and_dtype(out, dims, single_ckpt):
    from safetensors.torch import load_file
    t = single(out, dims)
    load_checkpoint(t, single_ckpt[0])
    export_safetensors(t, out / "hf.safetensors", dtype=torch.bfloat16, hf_names=True)
    tensors = load_file(out / "hf.safetensors")
    assert "model.layers.0.self_attn.q_proj.weight" in tensors and "lm_head.weight" in tensors
    assert all(v.dtype == torch.bfloat16 for v in tensors.values())
    t2 = single(out, dims)
    import_safetensors(t2, out / "hf.safetensors")
    for name, w in weights(t2).items():
        torch.testing.assert_close(w, single_ckpt[1][name].bfloat16().float(), rtol=0, atol=0)


def test_safetensors_bad_files(out, dims):
    from safetensors.torch import load_file, save_file
    good = out / "good.safetensors"
    export_safetensors(single(out, dims), good)
    tensors = load_file(good)
    t = single(out, dims)
    bad = dict(tensors, **{"layers.0.mlp.down_proj.weight": tensors["layers.0.mlp.down_proj.weight"].t().contiguous()})
    save_file(bad, out / "shape.safetensors")
    msg = raises_one_line("layers.0.mlp.down_proj.weight", import_safetensors, t, out / "shape.safetensors")
    assert "(64, 32)" in msg and "(32, 64)" in msg
    save_file({k: v for k, v in tensors.items() if k != "norm.weight"}, out / "missing.safetensors")
    raises_one_line("lacks tensor 'norm.weight'", import_safetensors, t, out / "missing.safetensors")
    save_file(dict(tensors, extra=torch.zeros(1)), out / "extra.safetensors")
    raises_one_line("'extra'", import_safetensors, t, out / "extra.safetensors")
    (out / "junk.safetensors").write_bytes(b"not a safetensors file")
    raises_one_line("not a readable safetensors", import_safetensors, t, out / "junk.safetensors")
    raises_one_line("no safetensors file", import_safetensors, t, out / "nowhere.safetensors")


def test_safetensors_export_on_a_full_disk(out, dims, monkeypatch):
    """safetensors (Rust) reports a full disk as its own error, "(os error 28)": one line,
    and nothing under the export's name."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full_disk(*_args, **_kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    target = out / "full" / "model.safetensors"
    msg = raises_one_line("no space left", export_safetensors, single(out, dims), target)
    assert msg == f"cannot write {target}: no space left on device (ENOSPC)" and not target.exists()


# -- bad checkpoints ------------------------------------------------------------------------
def copy_of(path, dest):
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(path, dest)
    return dest


def test_different_model_shape(out, dims, single_ckpt):
    wide = dataclasses.replace(MODEL, dim=64)
    msg = raises_one_line(r"model\.dim 32 != run's 64", load_checkpoint, single(out, dims, model=wide), single_ckpt[0])
    assert str(single_ckpt[0]) in msg


def test_resume_takes_the_run_directory_and_auto(out, single_ckpt):
    run = out / "run_dir"
    copy_of(single_ckpt[0].parent, run / "checkpoints")  # <out>/checkpoints/{latest, step_N}
    step_dir = run / "checkpoints" / single_ckpt[0].name
    assert resolve_checkpoint(run) == step_dir  # --resume OUT: what a user naturally passes
    assert resolve_resume("auto", str(run)) == step_dir
    assert resolve_resume("auto", str(out / "fresh_run")) is None  # nothing saved yet: start fresh
    assert resolve_resume(None, str(run)) is None
    (run / "checkpoints" / "latest").write_text("step_7\n")  # auto never hides a broken checkpoint
    raises_one_line("names 'step_7'", resolve_resume, "auto", str(run))


def test_missing_paths_and_metadata(out, dims, single_ckpt):
    t = single(out, dims)
    raises_one_line("no checkpoint at", load_checkpoint, t, out / "nowhere")
    incomplete = copy_of(single_ckpt[0], out / "bad" / "step_99")
    (incomplete / "meta.json").unlink()
    raises_one_line(r"incomplete checkpoint .*step_99: no meta\.json", load_checkpoint, t, incomplete)
    (out / "bad" / "latest").write_text("step_7\n")
    raises_one_line("names 'step_7'", load_checkpoint, t, out / "bad")


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_tensor_file(out, dims, single_ckpt, damage):
    broken = copy_of(single_ckpt[0], out / "bad" / f"{damage}" / "step_3")
    data = next(broken.glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    if damage == "flip":
        for i in range(len(raw) // 2, len(raw) // 2 + 64):  # inside some tensor's bytes
            raw[i] ^= 0xFF
        data.write_bytes(bytes(raw))
        raises_one_line("is corrupt: tensor '.*' does not match its checksum", load_checkpoint, single(out, dims),
                        broken)
    else:
        data.write_bytes(bytes(raw[:len(raw) // 3]))
        raises_one_line(f"is truncated: {data.name} holds {len(raw) // 3} bytes", load_checkpoint,
                        single(out, dims), broken)


@pytest.mark.parametrize("damage", ["truncate", "missing"])
def test_preflight_finds_damaged_data_files(out, single_ckpt, damage):
    """train's start-up check reads no tensor, yet finds a truncated or missing data file from
    DCP's metadata and the file sizes: one line before any process group exists."""
    broken = copy_of(single_ckpt[0], out / "bad_pre" / damage / "step_3")
    data = next(broken.glob("*.distcp"))
    if damage == "missing":
        data.unlink()
    else:
        data.write_bytes(data.read_bytes()[:100])
    cfg = config(out / "pre")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=str(broken)))
    match = f"data file {data.name} of tensor '.*' is unreadable" if damage == "missing" else "is truncated"
    raises_one_line(match, check_run, cfg, torch.device("cpu"))


def test_missing_and_extra_tensor_keys(out, dims, single_ckpt):
    src = single_ckpt[0]
    meta = dcp.FileSystemReader(src).read_metadata().state_dict_metadata
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=dcp.FileSystemReader(src), no_dist=True)

    def write(name, tensors):
        dest = out / "keys" / name / "step_3"
        dest.mkdir(parents=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(tensors, storage_writer=dcp.FileSystemWriter(dest), no_dist=True)
        shutil.copy(src / "meta.json", dest / "meta.json")
        return dest

    t = single(out, dims)
    missing = write("missing", {k: v for k, v in state.items() if k != "optim.exp_avg.norm.weight"})
    raises_one_line("lacks tensor 'optim.exp_avg.norm.weight'", load_checkpoint, t, missing)
    extra = write("extra", dict(state, **{"model.layers.0.bias": torch.zeros(3)}))
    raises_one_line("has tensor 'model.layers.0.bias'", load_checkpoint, t, extra)
    reshaped = write("shape", dict(state, **{"model.norm.weight": torch.zeros(7)}))
    raises_one_line(r"'model\.norm\.weight' has shape \(7,\)", load_checkpoint, t, reshaped)

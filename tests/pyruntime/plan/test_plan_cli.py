"""`python -m pyruntime plan`: the report, --hf-config, --search, and bad input in one line
(exit 2, naming the numbers)."""
import json

import pytest

from pyruntime.cli import main

LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
             "num_hidden_layers": 32, "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
             "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False}


def _run(capsys, *argv):
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_report_names_every_part(capsys):
    code, out, _ = _run(capsys, "--preset", "7b", "--seq-len", "4096", "--global-batch", "64", "--gpus", "8",
                        "--device", "h100", "--pp", "2", "--zero", "1", "--tokens", "1e11")
    assert code == 0
    for part in ("model states", "activations", "in flight", "allowance", "first step", "steady", "bubble",
                 "exposed", "MFU", "days", "torchrun --nnodes 1 --nproc_per_node 8"):
        assert part in out
    assert out.count("pp rank") == 2


def test_hf_config_is_the_7b_preset(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA2_7B))
    _, from_hf, _ = _run(capsys, "--hf-config", str(path), "--gpus", "1", "--device", "gh200", "--seq-len", "512")
    _, from_preset, _ = _run(capsys, "--preset", "7b", "--gpus", "1", "--device", "gh200", "--seq-len", "512")
    assert "6,738.4M parameters" in from_hf and "does not fit" in from_hf
    assert from_hf.split("command:")[0] == from_preset.split("command:")[0]
    assert f"--init-from {tmp_path}" in from_hf


def test_search_without_a_fit_names_the_memory_it_needs(capsys):
    """Llama-2-7B on one 96 GB GPU: with the optimizer on the device nothing fits (the seed);
    the search names the smallest need. With optimizer offload allowed (the search's default,
    or --offload optimizer) layouts fit, each a command that offloads."""
    base = ["--preset", "7b", "--seq-len", "4096", "--global-batch", "8", "--gpus", "1", "--device", "gh200",
            "--search"]
    code, out, _ = _run(capsys, *base, "--offload", "none")
    assert code == 1 and "no layout of 1 x gh200 (96 GB) fits: the smallest needs" in out
    code, out, _ = _run(capsys, *base)
    commands = [line for line in out.splitlines() if "-m pyruntime train" in line]
    assert code == 0 and commands and all("--offload optimizer" in c for c in commands), out


@pytest.mark.parametrize("argv,words", [
    (["--device", "b300"], ["unknown device 'b300'", "h100"]),
    (["--gpus", "8", "--dp", "2", "--tp", "2"], ["dp 2 x tp 2 x pp 1 = 4", "GPU count 8"]),
    (["--pp", "5", "--global-batch", "10"], ["4 layer(s)", "5"]),
    (["--tp", "3"], ["tp 3 does not divide"]),
    (["--recompute", "most"], ["unknown recompute mode 'most'"]),
    (["--gpus", "0"], ["--gpus must be > 0"]),
    (["--tflops", "100"], ["missing: --gpu-mem, --intra-bw, --inter-bw"]),
    (["--search"], ["--search needs --gpus"]),
    (["--profile", "/nonexistent.json"], ["calibration profile not found"]),
    (["--schedule", "zb"], ["--schedule zb needs --pp > 1"]),
    (["--microbatches", "2", "--micro-batch", "4"], ["--microbatches 2 and --micro-batch 4 both set"]),
    (["--mesh-order", "dp,tp"], ["mesh order must order dp, pp and tp", "'dp,tp'"]),
    (["--recompute-ops", "norm"], ["--recompute-ops 'norm' needs --recompute selective, got --recompute none"]),
    (["--recompute-layers", "1"], ["--recompute-layers 1 needs --recompute selective or full"]),
    (["--recompute", "selective", "--recompute-ops", "norm,gelu"], ["--recompute-ops 'norm,gelu'"]),
    (["--recompute", "full", "--recompute-layers", "3", "--pp", "2", "--microbatches", "2"],
     ["--recompute-layers 3 is more than stage 0's 2 layer(s)"]),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, words):
    code, out, err = _run(capsys, "--preset", "tiny", *argv)
    assert code == 2 and not out and len(err.strip().splitlines()) == 1
    for w in words:
        assert w in err


def test_trainer_refuses_a_layout_predicted_not_to_fit_on_cuda(tmp_path, monkeypatch, capsys):
    """On CUDA the start-up checks compare the planner's peaks with the GPU's memory before any
    process group: the 7b preset on one 80 GiB GPU is refused in one line naming both figures,
    and --no-plan-check skips the check. (Stood in on CPU: the device and its memory are
    patched; nothing runs on it.)"""
    import torch

    import pyruntime.mesh
    from pyruntime.cli import main
    from pyruntime.train import preflight

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(pyruntime.mesh, "default_device", lambda launch: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: type("P", (), {"total_memory": 80 * 2**30}))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "H100 80GB")
    monkeypatch.setattr(preflight, "check_kernels", lambda requested, device: None)
    args = ["train", "--preset", "7b", "--seq-len", "4096", "--global-batch", "8", "--out", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "layout predicted not to fit: pp rank 0 needs" in err
    assert "the H100 80GB has 80.0 GiB" in err and "--no-plan-check" in err

    started = []
    monkeypatch.setattr(preflight, "with_resume_resolved", lambda cfg: started.append(cfg) or cfg)
    monkeypatch.setattr("pyruntime.train.trainer.open_corpus", lambda cfg: (_ for _ in ()).throw(SystemExit(7)))
    try:
        main(args + ["--no-plan-check"])
    except SystemExit as e:
        assert e.code == 7  # past the plan check, stopped before any real work
    assert started and started[0].train.plan_check is False


def test_config_file_recompute_and_offload_are_planned(tmp_path, capsys):
    """plan --config FILE plans what train --config FILE runs: the file's recompute settings and
    optimizer offload count (they were once ignored: the plan held the optimizer on the GPU and
    every activation), as the same flags would, and as train's start-up plan sees them."""
    from pyruntime.config import config_from_dict, load_config_file
    from pyruntime.plan.startup import workload_layout

    path = tmp_path / "run.toml"
    path.write_text('[train]\npreset = "small"\n[data]\nseq_len = 512\nglobal_batch = 8\nmicro_batch = 2\n'
                    '[parallel]\npp = 2\nrecompute = "selective"\nrecompute_layers = 2\nrecompute_ops = "norm,swiglu"\n'
                    '[optim]\noffload = "optimizer"\n')
    levers = ["--recompute", "selective", "--recompute-layers", "2", "--recompute-ops", "norm,swiglu",
              "--offload", "optimizer"]
    common = ["--device", "h100", "--gpus", "2"]
    _, from_file, _ = _run(capsys, "--config", str(path), *common)
    _, from_flags, _ = _run(capsys, "--preset", "small", "--seq-len", "512", "--global-batch", "8",
                            "--micro-batch", "2", "--pp", "2", *levers, *common)
    _, without, _ = _run(capsys, "--config", str(path), *common, "--recompute", "none", "--offload", "none")
    assert from_file.split("command:")[0] == from_flags.split("command:")[0]
    assert "recompute selective (norm,swiglu) first 2 blocks" in from_file
    assert from_file.split("command:")[0] != without.split("command:")[0]
    assert " ".join(levers) in from_file.split("command:")[1]
    _, layout = workload_layout(config_from_dict(load_config_file(str(path))))
    assert (layout.recompute, layout.recompute_layers, layout.recompute_ops, layout.offload) == \
        ("selective", 2, "norm,swiglu", "optimizer")


def test_search_keeps_the_given_recompute_settings(capsys):
    code, out, _ = _run(capsys, "--preset", "small", "--gpus", "4", "--device", "h100", "--search", "--top", "3",
                        "--recompute", "full", "--recompute-layers", "2")
    commands = [line for line in out.splitlines() if "-m pyruntime train" in line]
    assert code == 0 and len(commands) == 3
    assert all("--recompute full --recompute-layers 2" in c for c in commands), out


@pytest.mark.parametrize("order", ["dp,pp,tp", "tp,pp,dp", "pp,dp,tp", "dp,tp,pp"])
def test_strides_are_the_trainers_mesh(order):
    """Layout.stride(axis) is the rank distance between neighbours on that axis of the grid
    the trainer builds (mesh.ParallelDims with --mesh-order)."""
    from pyruntime.mesh import ParallelDims
    from pyruntime.plan.layout import Layout

    lay = Layout(dp=2, pp=3, tp=4, mesh_order=order)
    dims = ParallelDims(2, 3, 4, 24, order=tuple(order.split(",")))
    for axis in ("dp", "pp", "tp"):
        a, b = dims.coords(0), dims.coords(lay.stride(axis))
        assert b[axis] == a[axis] + 1 and all(b[o] == a[o] for o in ("dp", "pp", "tp") if o != axis), (axis, a, b)


def test_mesh_order_moves_tp_across_nodes(tmp_path, capsys):
    """tp 8 x dp 2 on two 8-GPU nodes: the default order keeps each tp group in a node; with
    tp outermost (--mesh-order tp,pp,dp, or the --config file's) its collectives cross nodes
    and the step is predicted slower; the command carries the order."""
    base = ["--preset", "7b", "--gpus", "16", "--tp", "8", "--dp", "2", "--zero", "1", "--device", "h100"]
    step = lambda out: float(out.split("time per step ")[1].split(" s")[0])  # noqa: E731
    _, inside, _ = _run(capsys, *base)
    code, across, _ = _run(capsys, *base, "--mesh-order", "tp,pp,dp")
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"train": {"preset": "7b"}, "parallel": {"mesh_order": "tp,pp,dp"}}))
    _, from_file, _ = _run(capsys, "--config", str(path), *base[2:])
    assert code == 0 and step(across) > 2 * step(inside) and "tp overlap" not in across
    path.write_text(json.dumps({"train": {"preset": "7b"}, "parallel": {"tp_overlap": True, "sequence_parallel": True}}))
    _, overlapped, _ = _run(capsys, "--config", str(path), *base[2:])
    assert "tp overlap (the --config file's tp_overlap) is not modelled" in overlapped
    assert "--mesh-order tp,pp,dp" in across and from_file.split("command:")[0] == across.split("command:")[0]


@pytest.mark.parametrize("argv,world", [(["--dp", "8", "--zero", "3", "--global-batch", "64"], 8),
                                        (["--pp", "2", "--global-batch", "8"], 2),
                                        (["--pp", "4", "--dp", "2", "--global-batch", "48"], 8),
                                        (["--global-batch", "12"], 1)])
def test_default_micro_batch_is_trains(capsys, argv, world):
    """Without --micro-batch / --microbatches, plan plans the micro-batch train runs (it once
    planned 1 where train ran 8: 45.6 GB 'fits' for a 7b run needing 250 GB); with a pipeline
    train's default leaves every stage work (>= pp micro-batches)."""
    from pyruntime.cli import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["train", "--preset", "small", *argv]), world)
    code, out, _ = _run(capsys, "--preset", "small", "--gpus", str(world), "--device", "h100", *argv)
    assert code == 0 and f", mb {cfg.data.micro_batch}" in out.splitlines()[0], out.splitlines()[0]
    assert cfg.data.global_batch // (cfg.parallel.dp * cfg.data.micro_batch) >= cfg.parallel.pp

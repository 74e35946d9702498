"""The training loop: micro-batch gradient accumulation, AdamW with warm-up + cosine, global
norm clipping, validation, metrics and the loss curve.

One step, on every rank:
  1. the sampler gives this dp rank its slice of the step's global batch, in micro-batches
     (the global batch itself never depends on the layout);
  2. forward/backward per micro-batch, each loss scaled by 1/micro-batches so the summed
     gradient is the mean over the rank's tokens;
  3. gradients are averaged over dp, clipped to a global norm, and the optimizer steps.
"""
from __future__ import annotations

import functools
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pyruntime.config import Config, OptimConfig
from pyruntime.data import TOKEN_FILE_SUFFIXES, BatchSampler, Corpus, DataError, load_corpus, validation_batches
from pyruntime.data.sampler import validation_counted
from pyruntime.mesh import ParallelDims
from pyruntime.model import count_params, flops_per_token
from pyruntime.parallel.parallelize import parallelize, meta_model
from pyruntime.parallel.pipeline.apply import gather_timeline, pipeline_losses, report_timeline
from pyruntime.parallel.recompute import activation_bytes, activation_line
from pyruntime.parallel.validate import validate as validate_parallel
from pyruntime.parallel.tensor import tp_replicas
from pyruntime.plan.startup import plan_check_line, plan_line
from pyruntime.train.checkpoint import load_checkpoint, save_checkpoint
from pyruntime.train.ckpt_dirs import with_resume_resolved
from pyruntime.hf.export import export_hf
from pyruntime.parallel.tied import TiedGradientSync
from pyruntime.log import say
from pyruntime.train.faults import IOFault
from pyruntime.train.metrics import MetricsWriter, device_peak_flops, format_step, peak_memory_mb
from pyruntime.train.optim import clip_grad_norm, lr_at, set_lr
from pyruntime.train.plot import plot_loss_curve


def open_corpus(cfg: Config) -> Corpus:
    """The run's corpus, checked against the model's vocabulary, the sequence length and the
    validation batches it must supply (so a small --data file fails at start-up, not later).
    A text file with a model from --init-from is refused: it would be read with the byte
    tokenizer, not the model's own."""
    path, init = cfg.data.path, cfg.train.init_from
    if init and path and Path(path).suffix.lower() not in TOKEN_FILE_SUFFIXES:
        raise DataError(f"--data {path} is text, which train reads as bytes (ids 0-255), not with the tokenizer of "
                        f"--init-from {init}: tokenize it first: python -m pyruntime tokenize --tokenizer {init} "
                        f"--input {path} --output {Path(path).with_suffix('.bin')}")
    corpus = load_corpus(cfg.data.path, max_bytes=cfg.data.max_bytes, val_fraction=cfg.data.val_fraction,
                         seq_len=cfg.data.seq_len, vocab_size=cfg.model.vocab_size)
    need = cfg.train.eval_batches * cfg.data.global_batch if cfg.train.eval_every else 0
    have = (len(corpus.val) - 1) // cfg.data.seq_len
    if have < need:
        raise DataError(f"validation split of {corpus.name} holds {have} windows of {cfg.data.seq_len} tokens; "
                        f"--eval-batches {cfg.train.eval_batches} x global batch {cfg.data.global_batch} needs {need} "
                        "(fewer --eval-batches, or --eval-every 0 to skip validation)")
    return corpus


class Trainer:
    def __init__(self, cfg: Config, dims: ParallelDims, device: torch.device, *, rank: int = 0,
                 corpus: Corpus | None = None):
        cfg.validate()
        validate_parallel(cfg)
        cfg = with_resume_resolved(cfg)  # --resume auto / a run's --out -> its checkpoint, or None
        self.cfg, self.dims, self.device = cfg, dims, device
        self.is_logger = rank == 0 and not cfg.train.quiet  # the console and the loss picture
        self.writes_metrics = rank == 0  # --quiet too: the record of the run is not output to hide
        self.dp_rank = dims.axis_rank("dp")
        torch.manual_seed(cfg.train.seed)
        corpus = corpus or open_corpus(cfg)
        self.corpus_name = corpus.name
        self.sampler = BatchSampler(corpus.train, seq_len=cfg.data.seq_len, global_batch=cfg.data.global_batch,
                                    seed=cfg.train.seed, mask=corpus.train_mask)
        self.val_tokens, self.val_mask = corpus.val, corpus.val_mask
        # Built on the meta device; parallelize() keeps this rank's stages, shards them and
        # has the data-parallel engine make the parameters (never the full model).
        par = parallelize(meta_model(cfg), dims, cfg, device, draw=not cfg.train.resume,  # resume loads every value
                          log=functools.partial(say, enabled=self.is_logger))
        self.model, self.data_parallel, self.pipeline = par.model, par.engine, par.executor
        self.loss_fn, self.autocast, self.stage_layers = par.loss_fn, par.autocast, par.stage_layers
        self.optimizer = self.data_parallel.optimizer
        self.tied_sync = TiedGradientSync(self.model, cfg, dims.group("pp") if dims.pp > 1 else None, dims.tp, device,
                                          engine=self.data_parallel)
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak_flops = device_peak_flops(device)

    # -- one step ---------------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.train.steps, cfg.optim)
        set_lr(self.optimizer, lr)
        micro = self.sampler.micro_batches(step, self.dp_rank, self.dims.dp, cfg.data.micro_batch)
        self.loss_fn.set_step(self.sampler.counted(step), len(micro) * self.dims.dp)  # loss mask: model/loss.py
        loss_sum = self.pipeline.run_step(micro) if self.pipeline else self.forward_backward(micro)
        self._average_over_dp(loss_sum)
        self.tied_sync()  # pp: the tied embedding's two stage copies take one summed gradient
        if self.pipeline:  # the loss lives on the last stage
            dist.all_reduce(loss_sum, group=self.dims.group("pp"))
        grad_norm = self.clip_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        tps = cfg.data.global_batch * cfg.data.seq_len / dt
        mfu = (tps * self.flops_per_token / (self.peak_flops * self.dims.world_size)
               if self.peak_flops else None)
        return {"step": step + 1, "loss": (loss_sum / len(micro)).item(), "lr": lr,
                "grad_norm": grad_norm.item(), "tokens_per_s": tps, "step_time_s": dt,
                "mfu": mfu, "peak_mem_mb": peak_memory_mb(self.device),
                "activation_bytes": activation_bytes(self.model), **self.data_parallel.step_metrics()}

    def forward_backward(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Forward + backward over this rank's micro-batches; returns the sum of their losses.

        Each loss is scaled by 1/len(micro) so the accumulated gradient is the rank's mean.
        """
        loss_sum = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(micro):
            x, y = x.to(self.device), y.to(self.device)
            # Gradient collectives run during the last backward only (ZeRO-2/3: during each).
            with self.data_parallel.micro_batch(last=i == len(micro) - 1):
                with self.autocast:
                    loss = self.loss_fn(self.model(x), y)
                (loss / len(micro)).backward()
            loss_sum += loss.detach()
        return loss_sum

    def gradient_pieces(self) -> tuple[list[torch.Tensor], list[int]]:
        """The gradient tensors this rank holds, and for each how many ranks hold the same
        copy (see optim.clip_grad_norm): the data-parallel engine's gradients or shards, also
        replicated over tp unless the parameter is a tp shard (norm weights are replicated)."""
        return self.data_parallel.gradient_pieces(lambda p: tp_replicas(p, self.dims.tp))

    def clip_gradients(self) -> torch.Tensor:
        """Global-norm clipping over every rank's pieces; returns the norm before clipping."""
        grads, replication = self.gradient_pieces()
        if self.dims.dp == self.dims.world_size and self.cfg.parallel.zero == 0:
            # Plain data parallelism: every rank holds the whole, identical gradient, so its
            # own norm is the global one; no all-reduce (a sync point every step). Decided by
            # the layout alone, so every rank takes the same branch.
            return clip_grad_norm(grads, self.cfg.optim.grad_clip)
        group = dist.group.WORLD if self.dims.world_size > 1 else None
        return clip_grad_norm(grads, self.cfg.optim.grad_clip, group, replication)

    def _average_over_dp(self, loss_sum: torch.Tensor) -> None:
        self.data_parallel.finish_gradient_sync()  # every bucket / unit reduced before clipping
        if self.dims.dp > 1:  # the loss for the log line; gradients are averaged by the dp wrapper
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG, group=self.dims.group("dp"))

    def _report_pipeline(self) -> None:
        """Measured vs simulated bubbles of the last step; the timeline pictures with --timeline."""
        per_rank = gather_timeline(self.pipeline, self.dims)
        if per_rank is not None and self.is_logger:
            say(report_timeline(per_rank, self.cfg, self.dims, self.cfg.train.timeline))

    # -- validation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over fixed validation sequences: --eval-batches global batches spread over
        the validation split, each dp rank taking its rows of each in micro-batches, as in
        training. The same sequences and the same mean whatever the layout."""
        c, dp = self.cfg, self.dims.dp
        batches = validation_batches(self.val_tokens, c.data.seq_len, c.data.global_batch, c.train.eval_batches,
                                     dp_rank=self.dims.axis_rank("dp"), dp_size=dp, mask=self.val_mask)
        mb = c.data.micro_batch
        micro = [(x[i:i + mb], y[i:i + mb]) for x, y in batches for i in range(0, x.shape[0], mb)]
        counted = None if self.val_mask is None else validation_counted(
            self.val_tokens, c.data.seq_len, c.data.global_batch, c.train.eval_batches, self.val_mask)
        self.loss_fn.set_step(counted, len(micro) * dp)
        self.model.eval()
        if self.pipeline:
            losses = pipeline_losses(self.pipeline, micro, self.autocast)
        else:
            losses = []
            for x, y in micro:
                with self.autocast:
                    losses.append(self.loss_fn(self.model(x.to(self.device)), y.to(self.device)))
        self.model.train()
        # equal-sized micro-batches, as many on every dp rank: the mean of means is the mean
        loss = torch.stack(losses).mean()
        if self.pipeline:
            dist.all_reduce(loss, group=self.dims.group("pp"))  # the last stage holds it
        if dp > 1:
            dist.all_reduce(loss, group=self.dims.group("dp"))
            loss /= dp
        return loss.item()

    # -- the run ----------------------------------------------------------------------------
    def banner(self) -> str:
        c = self.cfg
        n = count_params(c.model)["total"]
        model = f"model {c.train.init_from}" if c.train.init_from else f"preset {c.train.preset}"
        return (f"pyruntime | {model} ({n / 1e6:.2f}M params) | layout {self.dims.describe()}"
                f" | {self.device.type} | data {self.corpus_name} | global batch {c.data.global_batch}"
                f" x {c.data.seq_len} tokens, micro-batch {c.data.micro_batch} | {c.train.steps} steps")

    def per_rank_lines(self) -> list[str]:
        """One line per rank: its mesh coordinates, what part of the model it holds and its
        planned model-state bytes (parameters + gradients + optimizer states)."""
        m = self.model
        parts = []
        if m.embed_tokens is not None:
            parts.append("embedding")
        keys = [int(k) for k in m.layers.keys()]
        if keys:
            runs, start = [], keys[0]
            for a, b in zip(keys, keys[1:] + [None]):
                if b != a + 1:
                    runs.append(f"{start}" if start == a else f"{start}-{a}")
                    start = b
            parts.append("layers " + ",".join(runs))
        if m.lm_head is not None:
            parts.append("norm+head")
        planned = self.data_parallel.planned_bytes()
        total = (planned.param + planned.grad + planned.optim) / 2**20
        mine = f"{' + '.join(parts)}: model state {total:.2f} MB"
        if self.dims.world_size == 1:
            return [mine]
        everything: list = [None] * self.dims.world_size
        dist.all_gather_object(everything, mine)
        coords = [self.dims.coords(r) for r in range(self.dims.world_size)]
        return [f"  rank {r} (dp {c['dp']}, pp {c['pp']}, tp {c['tp']}): {line}"
                for r, (c, line) in enumerate(zip(coords, everything))]

    def fit(self) -> list[dict]:
        cfg = self.cfg
        say(self.banner(), self.is_logger)
        if cfg.train.init_from and cfg.optim.lr == OptimConfig.lr:  # from-scratch defaults on a trained model
            say(f"note: --lr {cfg.optim.lr:g} is the from-scratch default; fine-tuning a pretrained model usually "
                "takes 1e-5 to 1e-4 (give --lr)", self.is_logger)
        say(self.data_parallel.memory_line(), self.is_logger)
        say(plan_line(cfg, self.device.type == "cuda"), self.is_logger)
        rank_lines = self.per_rank_lines()  # a collective: every rank takes part
        if len(rank_lines) > 1:
            say("\n".join(rank_lines), self.is_logger)
        start = 0
        if cfg.train.resume:
            start = load_checkpoint(self, cfg.train.resume)
            say(f"resumed from {cfg.train.resume} at step {start}"
                + (f": all {cfg.train.steps} steps already done, nothing to train (give --steps > {start} to "
                   "continue)" if start == cfg.train.steps else ""), self.is_logger)
        writer = MetricsWriter(cfg.metrics_path, enabled=self.writes_metrics, append=start > 0)
        try:
            for step in range(start, cfg.train.steps):
                rec = self.train_step(step)
                done = step + 1
                if step == start:  # the plan's prediction next to the first step's measurement
                    say(plan_check_line(cfg, rec, 0, self.device.type == "cuda"), self.is_logger)
                if step == start:  # measured, so after the first step
                    say(activation_line(self.cfg, rec["activation_bytes"]), self.is_logger)
                if cfg.train.eval_every and (done % cfg.train.eval_every == 0 or done == cfg.train.steps):
                    rec["val_loss"] = self.evaluate()
                writer.write(rec)
                every = cfg.train.save_every
                if every and (done % every == 0 or done == cfg.train.steps):
                    path = save_checkpoint(self, Path(cfg.train.out) / "checkpoints", done)
                    say(f"checkpoint: {path}", self.is_logger)
                if self.is_logger and (done % cfg.train.log_every == 0 or done == cfg.train.steps):
                    say(format_step(rec, cfg.train.steps))
        finally:
            writer.close()
        if cfg.train.export_hf:
            export_hf(self, cfg.train.export_hf, max_shard_bytes=int(cfg.train.export_shard_mb * 1e6),
                      dtype=cfg.train.export_dtype, companions_from=cfg.train.init_from)
            say(f"exported Hugging Face directory: {cfg.train.export_hf}", self.is_logger)
        if self.pipeline:
            self._report_pipeline()
        png = self._write_loss_curve(writer.records)
        say(f"metrics: {cfg.metrics_path}" + (f" | loss curve: {png}" if png else ""), self.is_logger)
        return writer.records

    def _write_loss_curve(self, records: list[dict]) -> Path | None:
        """Rank 0 draws the loss curve. A disk fault there ends every rank with its line: the
        others, done with their last collective, would otherwise exit 0 and leave it alone."""
        png, error = None, None
        if self.is_logger:
            try:
                png = plot_loss_curve(records, Path(self.cfg.train.out) / "loss.png",
                                      f"{self.cfg.train.preset} on {self.corpus_name}, {self.dims.describe()}")
            except IOFault as e:
                error = str(e)
        if self.dims.world_size > 1:
            shared = [error]
            dist.broadcast_object_list(shared, src=0)
            if shared[0] is not None and error is None:
                c = self.dims.coords(0)
                raise IOFault(f"rank 0 (dp {c['dp']}, pp {c['pp']}, tp {c['tp']}): {shared[0]}")
        if error is not None:
            raise IOFault(error)
        return png

"""How much of the sequence-parallel communication the chunked overlap hides, on ONE device:
the tp peers are stood in for by copies of the same bytes on a second CUDA stream (on CPU: a
worker thread, as gloo's), so no second GPU is needed. The code timed is the layers' own
(comm/overlap.py: all-gather + GEMM of the column-parallel GEMM, GEMM + reduce-scatter of the
row-parallel one, forward and forward + backward); only the two raw collectives it calls are
swapped for the stand-ins while this runs.

    python -m pyruntime bench overlap                 # 7B MLP shapes at tp 8 on CUDA
    python -m pyruntime bench overlap --tp 2 --chunks 4 --markdown

Per case, each a median over timed runs:
  compute    the same chunked code with transfers that move nothing (the GEMMs alone)
  comm       the transfers the overlapped run made, replayed back to back on the side stream
  overlapped the real thing
  exposed    overlapped - compute: communication the GEMMs did not hide; the target is
             exposed / comm <= 10%.
The stand-in transfers: all-gather = the shard copied into every rank's slot (as if each
peer held the same shard); reduce-scatter = the sum of this rank's `world` blocks (as if
peer r's contribution to our block were our block r): the bytes read and written are those
of the real collectives on one rank; what a link adds (latency, its bandwidth instead of
memory's) is not modelled, so on a GPU the copies are faster than NVLink transfers.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import statistics
import sys
import time
from typing import Callable

import torch

from pyruntime.bench.harness import header, require, suite_parser, table_lines
from pyruntime.comm import overlap


class _Done:
    """A transfer that moved nothing (the `compute` measurement)."""

    def wait(self) -> None:
        pass


class _StreamWork:
    """A transfer enqueued on the side stream; wait() makes the current stream wait for it."""

    def __init__(self, event: torch.cuda.Event):
        self.event = event

    def wait(self) -> None:
        torch.cuda.current_stream().wait_event(self.event)


class _ThreadWork:
    def __init__(self, future: concurrent.futures.Future):
        self.future = future

    def wait(self) -> None:
        self.future.result()


class PeerStandIn:
    """A tp 'group' of `world` ranks on one device. move=False: transfers do nothing. Every
    transfer is also logged (kind, out, inp) so that `replay` can time them alone."""

    def __init__(self, world: int, device: torch.device):
        self.world, self.device, self.move, self.log = world, device, True, []
        if device.type == "cuda":
            self.stream = torch.cuda.Stream(device)
        else:
            self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def size(self) -> int:
        return self.world

    # no_grad: these run on the side stream's thread or the worker thread (grad mode is per thread)
    @torch.no_grad()
    def _all_gather(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        out.view(self.world, *inp.shape).copy_(inp.unsqueeze(0).expand(self.world, *inp.shape))

    @torch.no_grad()
    def _reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        torch.sum(inp.view(self.world, *out.shape), dim=0, out=out)

    def _run(self, kind: str, out: torch.Tensor, inp: torch.Tensor) -> None:
        (self._all_gather if kind == "all-gather" else self._reduce_scatter)(out, inp)

    def _submit(self, fn: Callable[[], None], tensors: tuple[torch.Tensor, ...]):
        if self.device.type == "cuda":
            self.stream.wait_stream(torch.cuda.current_stream())  # the inputs are ready
            with torch.cuda.stream(self.stream):
                fn()
                event = torch.cuda.Event()
                event.record(self.stream)
            for t in tensors:  # allocated on the compute stream, used on the side one
                t.record_stream(self.stream)
            return _StreamWork(event)
        return _ThreadWork(self.pool.submit(fn))

    def all_gather_into(self, out, inp, group, async_op=False):
        return self._transfer("all-gather", out, inp, async_op)

    def reduce_scatter_into(self, out, inp, group, async_op=False):
        return self._transfer("reduce-scatter", out, inp, async_op)

    def _transfer(self, kind, out, inp, async_op):
        assert async_op, "the overlap path issues every transfer asynchronously"
        self.log.append((kind, out, inp))
        if not self.move:
            return _Done()
        return self._submit(lambda: self._run(kind, out, inp), (out, inp))

    def replay(self) -> None:
        """Every logged transfer again, back to back on the side stream, then waited."""
        works = [self._submit(lambda k=k, o=o, i=i: self._run(k, o, i), (o, i)) for k, o, i in self.log]
        for w in works:
            w.wait()


@contextlib.contextmanager
def peers_stood_in_for(peers: PeerStandIn):
    """overlap.py's two raw collectives go to `peers` while this runs."""
    saved = overlap.all_gather_into, overlap.reduce_scatter_into
    overlap.all_gather_into, overlap.reduce_scatter_into = peers.all_gather_into, peers.reduce_scatter_into
    try:
        yield
    finally:
        overlap.all_gather_into, overlap.reduce_scatter_into = saved


def _median_s(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()  # the side stream's last transfer is waited for by the compute stream
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def check_stand_in(peers: PeerStandIn, gemm, x_shard, w_col, x_full, w_row, chunks: int) -> None:
    """The overlapped results equal the plain ops on what the stand-ins deliver."""
    world = peers.world
    with peers_stood_in_for(peers), torch.no_grad():
        y = overlap.all_gather_gemm(x_shard, gemm, (w_col,), peers, chunks)
        z = overlap.gemm_reduce_scatter(x_full, gemm, (w_row,), peers, chunks)
    if x_shard.device.type == "cuda":
        torch.cuda.synchronize()
    want_y = gemm(x_shard.repeat(1, world, 1), w_col)
    B, T, _ = x_full.shape
    want_z = gemm(x_full, w_row).view(B, world, T // world, -1).sum(1)
    tol = dict(rtol=2e-2, atol=2e-2) if x_shard.dtype != torch.float32 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y, want_y, **tol)
    torch.testing.assert_close(z, want_z, **tol)
    peers.log.clear()


def run_case(name: str, fn: Callable[[], object], peers: PeerStandIn, device, warmup, repeat) -> dict:
    with peers_stood_in_for(peers):
        peers.move = False
        compute = _median_s(fn, device, warmup, repeat)
        peers.move = True
        overlapped = _median_s(fn, device, warmup, repeat)
        peers.log.clear()
        fn()  # one run logs the transfers it makes
    transfers = list(peers.log)
    comm = _median_s(peers.replay, device, warmup, repeat)
    peers.log.clear()
    exposed = max(0.0, overlapped - compute)
    return {"case": name, "transfers": len(transfers), "compute": compute, "comm": comm,
            "overlapped": overlapped, "exposed": exposed, "fraction": exposed / comm if comm else 0.0}


def main(argv=None) -> int:
    parser = suite_parser("overlap", __doc__)
    on_cuda = torch.cuda.is_available()
    parser.add_argument("--tp", type=int, default=8, help="ranks stood in for (default 8)")
    parser.add_argument("--tokens", type=int, default=8192 if on_cuda else 512, help="B * T over all ranks")
    parser.add_argument("--batch", type=int, default=1, help="B (the sequence is tokens / B)")
    parser.add_argument("--hidden", type=int, default=4096 if on_cuda else 256)
    parser.add_argument("--ffn", type=int, default=11008 if on_cuda else 688, help="MLP width before the tp split")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16" if on_cuda else "fp32")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=30 if on_cuda else 5)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    require(parser, args, positive=("tp", "tokens", "batch", "hidden", "ffn", "chunks", "repeat"),
            non_negative=("warmup",))
    T = args.tokens // args.batch
    bad = [f"{what} {v} is not divisible by tp {args.tp}" for what, v in
           (("sequence length", T), ("MLP width", args.ffn)) if v % args.tp]
    if args.tokens % args.batch:
        bad.append(f"tokens {args.tokens} are not divisible by the batch {args.batch}")
    if bad:
        print(f"bench overlap: {'; '.join(bad)}", file=sys.stderr)
        return 2

    from pyruntime import ops
    from pyruntime.ops.dispatch import unavailable_reason

    device = torch.device("cuda" if on_cuda else "cpu")
    if not on_cuda:
        torch.set_flush_denormal(True)  # the `compute` runs multiply uninitialised buffers
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    reason = unavailable_reason("triton", device, explicit=False)
    backend = "triton" if reason is None else "reference"
    print("\n".join(header(["overlap", *(argv if argv is not None else sys.argv[1:])], backend, reason)[:3]))
    print(f"peers stood in for by {'copies on a second CUDA stream' if on_cuda else 'copies on a worker thread'}; "
          f"GEMMs: {backend} path; tp {args.tp}, {args.chunks} chunks", flush=True)
    if not on_cuda:
        print("NOTE: on CPU the hand-off to the worker thread (~0.1 ms per transfer) and two threads sharing the "
              "cores dominate at these sizes: the rows show the suite runs, not what a GPU hides.")

    def gemm(rows, weight, bias=None):
        return ops.linear(rows, weight, bias, backend=backend)

    gen = torch.Generator(device=device).manual_seed(0)
    K, N, t = args.hidden, args.ffn // args.tp, T // args.tp
    x_shard = torch.randn(args.batch, t, K, device=device, dtype=dtype, generator=gen)
    x_full = torch.randn(args.batch, T, N, device=device, dtype=dtype, generator=gen)
    w_col = torch.randn(N, K, device=device, dtype=dtype, generator=gen) / K**0.5  # column-parallel: K -> N
    w_row = torch.randn(K, N, device=device, dtype=dtype, generator=gen) / N**0.5  # row-parallel: N -> K
    peers = PeerStandIn(args.tp, device)
    check_stand_in(peers, gemm, x_shard, w_col, x_full, w_row, args.chunks)

    def fwd_bwd(op, x, w, out_shape):
        leaves = (x.detach().requires_grad_(True), w.detach().requires_grad_(True))
        dy = torch.randn(out_shape, device=device, dtype=dtype, generator=gen)
        return lambda: torch.autograd.grad(op(leaves[0], gemm, (leaves[1],), peers, args.chunks), leaves, dy)

    cases = [
        ("all-gather + GEMM fwd", lambda: overlap.all_gather_gemm(x_shard, gemm, (w_col,), peers, args.chunks),
         f"{args.batch}x{t}x{K} -> x{N}"),
        ("GEMM + reduce-scatter fwd", lambda: overlap.gemm_reduce_scatter(x_full, gemm, (w_row,), peers, args.chunks),
         f"{args.batch}x{T}x{N} -> x{K}"),
        ("all-gather + GEMM fwd+bwd", fwd_bwd(overlap.all_gather_gemm, x_shard, w_col, (args.batch, T, N)),
         f"{args.batch}x{t}x{K} -> x{N}"),
        ("GEMM + reduce-scatter fwd+bwd", fwd_bwd(overlap.gemm_reduce_scatter, x_full, w_row, (args.batch, t, K)),
         f"{args.batch}x{T}x{N} -> x{K}"),
    ]
    head = ["case", "shape", "transfers", "compute ms", "comm ms", "overlapped ms", "sequential ms",
            "exposed ms", "exposed/comm"]
    body = []
    for name, fn, shape in cases:
        with torch.no_grad() if "bwd" not in name else contextlib.nullcontext():
            r = run_case(name, fn, peers, device, args.warmup, args.repeat)
        body.append([name, f"{shape} {args.dtype}", str(r["transfers"]), f"{r['compute'] * 1e3:.3f}",
                     f"{r['comm'] * 1e3:.3f}", f"{r['overlapped'] * 1e3:.3f}",
                     f"{(r['compute'] + r['comm']) * 1e3:.3f}", f"{r['exposed'] * 1e3:.3f}",
                     f"{100 * r['fraction']:.1f}%"])
    print()
    print("\n".join(table_lines(head, body, args.markdown)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

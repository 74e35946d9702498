"""Batches that are identical whatever the parallel layout.

The global batch of step s is `global_batch` windows of seq_len + 1 tokens. Window i starts
at hash(seed, s, i) mod (N - seq_len), with a counter-based hash (splitmix64) instead of a
stateful RNG, so that:
  * the batch depends on (seed, step) only, not on how many steps ran before -- resuming
    from a checkpoint needs no data state beyond the step;
  * a data-parallel rank computes just its own windows, and the concatenation over ranks
    and micro-batches is exactly the single-process global batch -- which is what lets
    dp / pp / tp / micro-batch layouts reproduce single-process training;
  * the stream is fixed by this file alone, not by the numpy version's RNG.
Windows are sampled with replacement and may overlap (as in nanoGPT); the modulo bias is
below N / 2**64 and irrelevant.

Rank r of dp_size owns rows [r * global_batch / dp_size, (r + 1) * global_batch / dp_size)
of the global batch, cut into consecutive micro-batches of `micro_batch` rows.

A loss mask (instruction data: only response tokens count) marks each target: a target whose
mask is 0 becomes IGNORE (-1) in the targets, and `counted(step)` is the number of targets
that count in the whole global batch, computed by every rank from (seed, step) alone, so the
loss can be the mean over the step's counted tokens whatever the layout (model/loss.py).
"""
import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on a uint64 array; wrap-around multiplication is intended."""
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) != value or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value}")


def _check_tokens(tokens: np.ndarray, seq_len: int, what: str) -> None:
    if tokens.ndim != 1:
        raise ValueError(f"{what} must be a 1-D token array, got shape {tuple(tokens.shape)}")
    if len(tokens) < seq_len + 1:
        raise ValueError(f"{what} has {len(tokens)} tokens, fewer than one sequence of "
                         f"seq_len + 1 = {seq_len + 1}")


IGNORE = -1  # a target that does not count in the loss


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int, mask: np.ndarray | None = None):
    """Inputs and next-token targets of the windows at `starts`, as int64 tensors (B, T);
    targets whose mask is 0 are IGNORE."""
    idx = starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)  # (B, T + 1)
    # Fancy indexing reads only these windows, also from a memmap; asarray drops the
    # memmap subclass numpy keeps on the (in-memory) result.
    win = torch.from_numpy(np.asarray(tokens[idx]).astype(np.int64))  # (B, T + 1)
    x, y = win[:, :-1], win[:, 1:]
    if mask is not None:
        counts = torch.from_numpy(np.asarray(mask[idx[:, 1:]]).astype(bool))  # (B, T)
        y = y.masked_fill(~counts, IGNORE)
    return x, y


def _counted(mask: np.ndarray, starts: np.ndarray, seq_len: int) -> int:
    """Targets that count in the windows at `starts`."""
    idx = starts[:, None] + np.arange(1, seq_len + 1, dtype=np.int64)
    return int(np.asarray(mask[idx]).astype(bool).sum())


class BatchSampler:
    """Random training windows over `tokens`, a pure function of (seed, step, row)."""

    def __init__(self, tokens: np.ndarray, *, seq_len: int, global_batch: int, seed: int,
                 mask: np.ndarray | None = None):
        """tokens: 1-D integer array or memmap, not copied; mask: the loss mask aligned with it
        (or None: every target counts). Raises ValueError if tokens are shorter than
        seq_len + 1, the mask has another length, or a size is not a positive integer."""
        _check_positive(seq_len=seq_len, global_batch=global_batch)
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        _check_tokens(tokens, seq_len, "training data")
        if mask is not None and len(mask) != len(tokens):
            raise ValueError(f"loss mask has {len(mask)} entries for {len(tokens)} tokens")
        self.tokens, self.mask = tokens, mask
        self.seq_len = int(seq_len)
        self.global_batch = int(global_batch)
        self.seed = int(seed)
        self._seed_key = _splitmix64(np.array([self.seed], dtype=np.uint64))

    def starts(self, step: int, rows: range | None = None) -> np.ndarray:
        """Start offsets (int64) of the windows `rows` (default: all) of step `step`'s batch."""
        if int(step) != step or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step}")
        rows = range(self.global_batch) if rows is None else rows
        step_key = _splitmix64(self._seed_key ^ np.uint64(step))
        h = _splitmix64(step_key ^ np.arange(rows.start, rows.stop, dtype=np.uint64))
        num_starts = np.uint64(len(self.tokens) - self.seq_len)  # last start: N - (T + 1)
        return (h % num_starts).astype(np.int64)

    def global_batch_at(self, step: int):
        """(inputs, targets) of the whole batch of `step`: int64 tensors (global_batch, T)."""
        return _windows(self.tokens, self.starts(step), self.seq_len, self.mask)

    def counted(self, step: int) -> int | None:
        """Targets that count in step `step`'s whole global batch (None without a mask)."""
        return None if self.mask is None else _counted(self.mask, self.starts(step), self.seq_len)

    def rank_rows(self, dp_rank: int, dp_size: int) -> range:
        """Rows of the global batch that data-parallel rank `dp_rank` of `dp_size` owns."""
        _check_positive(dp_size=dp_size)
        if self.global_batch % dp_size:
            raise ValueError(f"global batch {self.global_batch} does not divide into "
                             f"dp {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp rank {dp_rank} is outside [0, {dp_size})")
        per_rank = self.global_batch // dp_size
        return range(dp_rank * per_rank, (dp_rank + 1) * per_rank)

    def rank_batch(self, step: int, dp_rank: int, dp_size: int):
        """(inputs, targets) of this rank's rows of step `step`: (global_batch / dp_size, T)."""
        rows = self.rank_rows(dp_rank, dp_size)
        return _windows(self.tokens, self.starts(step, rows), self.seq_len, self.mask)

    def micro_batches(self, step: int, dp_rank: int, dp_size: int, micro_batch: int):
        """This rank's rows of step `step` as a list of (inputs, targets), each
        (micro_batch, T), in row order. Raises ValueError unless global_batch divides into
        dp_size * micro_batch."""
        _check_positive(dp_size=dp_size, micro_batch=micro_batch)
        if self.global_batch % (dp_size * micro_batch):
            raise ValueError(f"global batch {self.global_batch} does not divide into "
                             f"dp {dp_size} x micro-batch {micro_batch}")
        x, y = self.rank_batch(step, dp_rank, dp_size)
        return list(zip(x.split(micro_batch), y.split(micro_batch)))


def validation_batches(tokens: np.ndarray, seq_len: int, batch: int,
                       num_batches: int | None = None, *, dp_rank: int = 0, dp_size: int = 1,
                       mask: np.ndarray | None = None):
    """Fixed validation batches: list of (inputs, targets), int64 tensors (batch / dp_size, T).

    The candidate windows are tokens[k*T : k*T + T + 1] for k = 0, 1, ...: their inputs do
    not overlap, nor do their targets, so every token but the first is predicted at most
    once. `num_batches` * `batch` of them are taken, evenly spread over the whole split
    (None: all complete batches). The result depends on the arguments only, and with dp the
    rows split as in training, so the mean loss over all ranks is layout-independent.
    mask: targets whose mask is 0 are IGNORE (validation_counted counts the others).
    Raises ValueError if the split holds fewer windows than requested.
    """
    starts = _validation_starts(tokens, seq_len, batch, num_batches, dp_size)
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp rank {dp_rank} is outside [0, {dp_size})")
    per_rank = batch // dp_size
    mine = starts[:, dp_rank * per_rank:(dp_rank + 1) * per_rank]
    return [_windows(tokens, row, seq_len, mask) for row in mine]


def validation_counted(tokens: np.ndarray, seq_len: int, batch: int, num_batches: int | None,
                       mask: np.ndarray) -> int:
    """Targets that count in all of validation_batches(...)'s windows, over every dp rank."""
    return _counted(mask, _validation_starts(tokens, seq_len, batch, num_batches, 1).reshape(-1), seq_len)


def _validation_starts(tokens: np.ndarray, seq_len: int, batch: int, num_batches: int | None,
                       dp_size: int) -> np.ndarray:
    """Start offsets (num_batches, batch) of the validation windows."""
    _check_positive(seq_len=seq_len, batch=batch, dp_size=dp_size)
    _check_tokens(tokens, seq_len, "validation data")
    available = (len(tokens) - 1) // seq_len
    if num_batches is None:
        num_batches = available // batch
    if num_batches < 1 or num_batches * batch > available:
        raise ValueError(f"validation data of {len(tokens)} tokens holds {available} windows "
                         f"of seq_len {seq_len}, not {num_batches} batches x {batch}")
    if batch % dp_size:
        raise ValueError(f"validation batch {batch} does not divide into dp {dp_size}")
    wanted = num_batches * batch
    # Integer spreading: picks distinct windows (wanted <= available) reaching the far end.
    picks = np.arange(wanted, dtype=np.int64) * available // wanted
    return (picks * seq_len).reshape(num_batches, batch)

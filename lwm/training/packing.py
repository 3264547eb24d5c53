"""From a stream of tokenized examples to fixed-shape batches.

Two batchers, serving the three dataset modes, share one interface (`add(example)`, then `pop()` until it returns None; `state_dict()` /
`load_state_dict()` capture everything buffered, so a restored batcher emits exactly the batches the
uninterrupted one would have):

  ConcatBatcher  the original's `no_pad`: one token stream cut into rows; examples run across row ends.
  PackBatcher    masked sequence packing (`pack`): whole examples placed greedily into rows, each with its own
                 segment id and positions restarting at 0; with `max_per_row=1` it is the `pad` mode.

An example is three aligned arrays of length L: `tokens`, `loss_masks` (the weight of *predicting* token i,
so the first entry is never used) and `vision_masks` (token i is a vision code). In a batch, row slot j
holds input token i and target token i+1 of some example, with `loss_masks[i+1]` and the vision masks of
both. Batches are dicts of numpy arrays, each (B, T):

  input_tokens, target_tokens (int32), loss_masks (float32), input_vision_masks, target_vision_masks (bool),
  and for packed batches segment_ids (int32; 1..n within a row, 0 = padding), position_ids (int32).

On many hosts each process builds only its part of every batch (`lwm.parallel.multihost.HostShard`) and
`lwm.parallel.multihost.global_batch` joins the parts into global jax Arrays.
"""
from __future__ import annotations

from collections import deque
from typing import NamedTuple

import numpy as np

__all__ = ["Example", "ConcatBatcher", "PackBatcher", "fit_to_length", "pack_rows", "PACK_OVERFLOW",
           "LOSS_WEIGHTINGS"]

PACK_OVERFLOW = ("truncate", "split")
LOSS_WEIGHTINGS = ("token", "example")


class Example(NamedTuple):
    tokens: np.ndarray        # (L,) int32
    loss_masks: np.ndarray    # (L,) float32, weight of predicting tokens[i]
    vision_masks: np.ndarray  # (L,) bool

    def __len__(self):
        return len(self.tokens)

    def slice(self, start: int, stop: int) -> "Example":
        return Example(self.tokens[start:stop], self.loss_masks[start:stop], self.vision_masks[start:stop])

    @staticmethod
    def of(tokens, loss_masks, vision_masks=None) -> "Example":
        tokens = np.asarray(tokens, np.int32)
        vision = np.zeros(len(tokens), bool) if vision_masks is None else np.asarray(vision_masks, bool)
        return Example(tokens, np.asarray(loss_masks, np.float32), vision)


def _to_plain(examples) -> list:
    return [tuple(ex) for ex in examples]


def _from_plain(items) -> list:
    return [Example.of(*item) for item in items]


class ConcatBatcher:
    """The original's `no_pad`: concatenate every example into one stream and cut (B, T) chunks.

    Chunk c holds inputs stream[c*B*T : (c+1)*B*T] and targets shifted by one; the last token of a chunk
    is carried to the next one as its first input. A chunk is cut once more than B*T+1 tokens are
    buffered (the original's condition, kept so the metrics attached to each batch match it).
    """

    def __init__(self, batch_size: int, seq_length: int, bos_id: int, always_start_with_bos: bool = False):
        self.batch_size, self.seq_length = batch_size, seq_length
        self.bos_id, self.always_start_with_bos = bos_id, always_start_with_bos
        self._parts: list[Example] = []
        self._n = 0

    def add(self, ex: Example) -> None:
        if len(ex):
            self._parts.append(ex)
            self._n += len(ex)

    def pop(self) -> dict | None:
        chunk = self.batch_size * self.seq_length
        if self._n <= chunk + 1:
            return None
        if len(self._parts) > 1:
            self._parts = [Example(*(np.concatenate(a) for a in zip(*self._parts)))]
        stream = self._parts[0]
        shape = (self.batch_size, self.seq_length)
        batch = {
            "input_tokens": stream.tokens[:chunk].reshape(shape).copy(),
            "target_tokens": stream.tokens[1:chunk + 1].reshape(shape).copy(),
            "loss_masks": stream.loss_masks[1:chunk + 1].reshape(shape).copy(),
            "input_vision_masks": stream.vision_masks[:chunk].reshape(shape).copy(),
            "target_vision_masks": stream.vision_masks[1:chunk + 1].reshape(shape).copy(),
        }
        if self.always_start_with_bos:
            batch["input_tokens"][:, 0] = self.bos_id
        self._parts = [stream.slice(chunk, None)]
        self._n -= chunk
        return batch

    def stats(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"kind": "concat", "parts": _to_plain(self._parts)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "concat":
            raise ValueError(f"batcher state is {state.get('kind')!r}, expected 'concat' (dataset mode changed?)")
        self._parts = _from_plain(state["parts"])
        self._n = sum(len(p) for p in self._parts)


def fit_to_length(ex: Example, seq_length: int, overflow: str) -> tuple[list[Example], int]:
    """Make an example fit one row of `seq_length` slots (an example of L tokens fills L-1 slots).

    Returns (pieces, dropped_tokens). `truncate` keeps the first seq_length+1 tokens; `split` cuts
    pieces that overlap by one token, so every target of the example is predicted exactly once, each
    piece being its own segment with positions from 0. Pieces with no target (one token) are dropped.

    >>> ex = Example.of(range(10), [0] + [1] * 9)
    >>> [p.tokens.tolist() for p in fit_to_length(ex, 4, "split")[0]]
    [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9]]
    >>> [p.tokens.tolist() for p in fit_to_length(ex, 4, "truncate")[0]], fit_to_length(ex, 4, "truncate")[1]
    ([[0, 1, 2, 3, 4]], 5)
    """
    n = len(ex)
    if n < 2:
        return [], n
    if n - 1 <= seq_length:
        return [ex], 0
    if overflow == "truncate":
        return [ex.slice(0, seq_length + 1)], n - seq_length - 1
    if overflow == "split":
        return [ex.slice(s, s + seq_length + 1) for s in range(0, n - 1, seq_length)], 0
    raise ValueError(f"pack_overflow={overflow!r}: expected one of {PACK_OVERFLOW}")


def pack_rows(rows: list[list[Example]], seq_length: int, pad_id: int, loss_weighting: str = "token",
              cross_example_attention: bool = False) -> dict:
    """Lay out rows of examples as one packed batch.

    Worked example, seq_length=8, one row holding two examples (tokens; loss mask; no vision):
        a = [1, 5, 6, 2]  mask [0, 0, 1, 1]     (BOS, prompt 5 without loss, answer 6, EOS)
        b = [1, 7, 2]     mask [0, 1, 1]
    gives (pad_id 0, `.` = padding):
        input_tokens   1 5 6 1 7 . . .
        target_tokens  5 6 2 7 2 . . .
        loss_masks     0 1 1 1 1 0 0 0          (token weighting)
        loss_masks     0 .5 .5 .5 .5 0 0 0      (example weighting: each example's weights sum to 1)
        segment_ids    1 1 1 2 2 0 0 0
        position_ids   0 1 2 0 1 0 0 0

    With `loss_weighting="example"` each example's target weights are divided by their sum, separately
    for text targets and vision targets, so a masked mean over the batch (per modality) is the mean over
    examples of each example's own mean loss.

    `cross_example_attention=True` is naive packing (the ablation of masked packing, LWM paper sec. 3.2):
    every example of a row gets segment id 1 and positions run on across the row, so an example attends to
    the examples before it in its row as if the row were one sequence. For the row above:
        segment_ids    1 1 1 1 1 0 0 0
        position_ids   0 1 2 3 4 0 0 0
    Loss masks and weights are unchanged.
    """
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss_weighting={loss_weighting!r}: expected one of {LOSS_WEIGHTINGS}")
    shape = (len(rows), seq_length)
    batch = {
        "input_tokens": np.full(shape, pad_id, np.int32),
        "target_tokens": np.full(shape, pad_id, np.int32),
        "loss_masks": np.zeros(shape, np.float32),
        "input_vision_masks": np.zeros(shape, bool),
        "target_vision_masks": np.zeros(shape, bool),
        "segment_ids": np.zeros(shape, np.int32),
        "position_ids": np.zeros(shape, np.int32),
    }
    for r, row in enumerate(rows):
        start = 0
        for k, ex in enumerate(row):
            n = len(ex) - 1
            sl = slice(start, start + n)
            weights = ex.loss_masks[1:].astype(np.float32)
            target_vision = ex.vision_masks[1:]
            if loss_weighting == "example":
                for modality in (target_vision, ~target_vision):
                    total = weights[modality].sum()
                    if total > 0:
                        weights[modality] /= total
            batch["input_tokens"][r, sl] = ex.tokens[:-1]
            batch["target_tokens"][r, sl] = ex.tokens[1:]
            batch["loss_masks"][r, sl] = weights
            batch["input_vision_masks"][r, sl] = ex.vision_masks[:-1]
            batch["target_vision_masks"][r, sl] = target_vision
            batch["segment_ids"][r, sl] = 1 if cross_example_attention else k + 1
            batch["position_ids"][r, sl] = np.arange(start, start + n) if cross_example_attention else np.arange(n)
            start += n
        if start > seq_length:
            raise AssertionError(f"row {r} holds {start} tokens > seq_length {seq_length}")
    return batch


class PackBatcher:
    """Masked sequence packing: whole examples, first-fit into the B rows of the batch being built.

    Each example of L tokens needs L-1 slots. It goes into the first row with room (and fewer than
    `max_per_row` examples). When it fits in no row, or every row is full, the batch is emitted and the
    example starts the next batch: examples keep their order of arrival within a row, none is split
    unless longer than a row (then `overflow` decides: `truncate` or `split`, both counted).
    `max_per_row=1` gives the `pad` mode (one example per row, padded), without segment/position ids.
    `cross_example_attention=True` drops the mask between the examples of a row (`pack_rows`).
    """

    def __init__(self, batch_size: int, seq_length: int, pad_id: int, *, max_per_row: int = 0,
                 overflow: str = "truncate", loss_weighting: str = "token", segments: bool = True,
                 cross_example_attention: bool = False):
        if overflow not in PACK_OVERFLOW:
            raise ValueError(f"pack_overflow={overflow!r}: expected one of {PACK_OVERFLOW}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting={loss_weighting!r}: expected one of {LOSS_WEIGHTINGS}")
        self.batch_size, self.seq_length, self.pad_id = batch_size, seq_length, pad_id
        self.max_per_row = max_per_row if max_per_row > 0 else seq_length
        self.overflow, self.loss_weighting, self.segments = overflow, loss_weighting, segments
        self.cross_example_attention = cross_example_attention
        self._rows: list[list[Example]] = [[] for _ in range(batch_size)]
        self._used = [0] * batch_size
        self._pending: deque[Example] = deque()
        self._stats = {"examples": 0, "truncated": 0, "split": 0, "dropped_tokens": 0, "too_short": 0,
                       "filled_slots": 0, "total_slots": 0}

    def add(self, ex: Example) -> None:
        pieces, dropped = fit_to_length(ex, self.seq_length, self.overflow)
        self._stats["examples"] += 1
        self._stats["dropped_tokens"] += dropped
        if not pieces:
            self._stats["too_short"] += 1
        elif len(pieces) > 1:
            self._stats["split"] += 1
        elif dropped:
            self._stats["truncated"] += 1
        self._pending.extend(pieces)

    def _place(self, ex: Example) -> bool:
        need = len(ex) - 1
        for r in range(self.batch_size):
            if self._used[r] + need <= self.seq_length and len(self._rows[r]) < self.max_per_row:
                self._rows[r].append(ex)
                self._used[r] += need
                return True
        return False

    def _full(self) -> bool:
        return all(u >= self.seq_length or len(row) >= self.max_per_row
                   for u, row in zip(self._used, self._rows))

    def _emit(self) -> dict:
        batch = pack_rows(self._rows, self.seq_length, self.pad_id, self.loss_weighting,
                          self.cross_example_attention)
        self._stats["filled_slots"] += sum(self._used)
        self._stats["total_slots"] += self.batch_size * self.seq_length
        self._rows = [[] for _ in range(self.batch_size)]
        self._used = [0] * self.batch_size
        if not self.segments:
            del batch["segment_ids"], batch["position_ids"]
        return batch

    def pop(self) -> dict | None:
        while self._pending:
            if not self._place(self._pending[0]):
                return self._emit()  # the example that did not fit opens the next batch
            self._pending.popleft()
            if self._full():
                return self._emit()
        return None

    def stats(self) -> dict:
        s = dict(self._stats)
        s["packing_efficiency"] = s["filled_slots"] / max(s["total_slots"], 1)
        return s

    def state_dict(self) -> dict:
        return {"kind": "pack", "rows": [_to_plain(row) for row in self._rows],
                "pending": _to_plain(self._pending), "stats": dict(self._stats)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "pack":
            raise ValueError(f"batcher state is {state.get('kind')!r}, expected 'pack' (dataset mode changed?)")
        if len(state["rows"]) != self.batch_size:
            raise ValueError(f"batcher state has {len(state['rows'])} rows, this batcher {self.batch_size} "
                             "(batch_size or number of data-parallel hosts changed?)")
        self._rows = [_from_plain(row) for row in state["rows"]]
        self._used = [sum(len(ex) - 1 for ex in row) for row in self._rows]
        if max(self._used, default=0) > self.seq_length:
            raise ValueError("batcher state holds rows longer than seq_length (seq_length changed?)")
        self._pending = deque(_from_plain(state["pending"]))
        self._stats.update(state.get("stats", {}))

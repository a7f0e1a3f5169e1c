"""One reverse-transformer forward over the sampling loop's rows (ldlm.serving.rows): its inputs, and each row's
estimate back. Each row's own input and, for a guided row, its null input beside it, guided rows combined as
ldlm.sampling.guidance combines them: x0_null + w * (x0_cond - x0_null).

The rows' conditions are kept from one iteration to the next (ConditionRows, vLLM's persistent batch). A
request's condition is written into the batch once, when its row first joins a forward, instead of every
iteration concatenating every row's condition afresh. On a cross-attention model the condition is its blocks'
projected keys and values, 2 x n_layers times d_model wide: about 1 MB a row for an E2E source. Concatenating
them at each iteration cost more than the forward's own work at a few rows on the 2-core CPU, and woke torch's
OpenMP pool against ONNX Runtime's spinning one (bench/results/cpu.md, 2026-12-07, "the serving loop keeps its
conditions").

The buffer, (capacity, L, width) with L the longest held condition's tokens:
    [0, base)           the null condition (its token, then masked zeros), written when the buffer is made
    [base, base + n)    the n held rows' own conditions, one slot each, packed: a row that leaves gets the last
                        slot's row moved into its place (one row's copy)
A forward over m null inputs (guided rows' other halves, rows without a condition) and the n rows reads rows
[base - m, base + n): a contiguous view, no copy. The buffer is made again only when the longest condition
changes, when more rows or null inputs come than it holds, and after the loop had nothing to sample (its memory
is let go then).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ldlm.model.reverse import Condition
from ldlm.serving.rows import SamplingRow, stack


def _capacity(rows: int, held: int) -> int:
    """Room for `rows`, doubling from what is held so that a growing batch is made again log2 times."""
    capacity = max(held, 1)
    while capacity < rows:
        capacity *= 2
    return capacity


class ConditionRows:
    """The conditions of a conditional model's sampling rows, as the reverse transformer reads them in one forward.
    `null`: the null condition (1, 1, width), projected if the rows' conditions are."""

    def __init__(self, null: Condition):
        if tuple(null.tokens.shape[:2]) != (1, 1):
            raise ValueError(f"the null condition is one token of one row, got tokens of shape "
                             f"{tuple(null.tokens.shape)}")
        self.null = null
        self.rows: list[SamplingRow] = []  # in slot order
        self._slot: dict[int, int] = {}  # id(row) -> its slot
        self.tokens: torch.Tensor | None = None  # (capacity, L, width)
        self.mask: torch.Tensor | None = None  # (capacity, L) bool
        self.base = 0  # null rows below the slots
        self.builds = 0  # times the buffer was made: the only copies of the whole batch

    @property
    def length(self) -> int:
        return 0 if self.tokens is None else self.tokens.shape[1]

    def read(self, rows: list[SamplingRow], nulls: int) -> tuple[list[SamplingRow], Condition]:
        """Hold exactly the conditions of `rows` (each with its own condition, one row each): those no longer
        among them leave, the new ones are written. Returns `rows` in slot order and the condition of one forward
        over `nulls` null inputs first, then those rows: (nulls + len(rows), L, width), a view of the buffer."""
        keep = {id(row) for row in rows}
        leaving = [row for row in self.rows if id(row) not in keep]
        joining = [row for row in rows if id(row) not in self._slot]
        dtype = self.null.tokens.dtype if self.tokens is None else self.tokens.dtype  # covers the held rows
        for row in joining:  # the held rows were checked when they joined
            if row.condition is None or row.condition.tokens.shape[0] != 1:
                raise ValueError("each row holds one condition of one row")
            if row.condition.projected != self.null.projected:
                raise ValueError("cannot batch projected and unprojected conditions together: project every row's "
                                 "condition and the null one (ReverseTransformer.project_condition) or none")
            dtype = torch.promote_types(dtype, row.condition.tokens.dtype)
        length = max([1] + [row.condition.tokens.shape[1] for row in rows])
        if (self.tokens is None or length != self.length or dtype != self.tokens.dtype or nulls > self.base
                or self.base + len(rows) > self.tokens.shape[0]):
            self._build(rows, nulls, length, dtype)
        else:
            for row in leaving:
                self._leave(row)
            for row in joining:
                self._join(row)
        n = len(self.rows)
        view = slice(self.base - nulls, self.base + n)
        return list(self.rows), Condition(self.tokens[view], self.mask[view], self.null.projected)

    def clear(self) -> None:
        """Let go of every row and of the buffer (its memory back while nothing samples; the next rows make it
        again)."""
        self.rows, self._slot, self.tokens, self.mask, self.base = [], {}, None, None, 0

    def _build(self, rows: list[SamplingRow], nulls: int, length: int, dtype: torch.dtype) -> None:
        """The buffer made afresh for `rows`, in their order, with room for `nulls` null inputs."""
        held = 0 if self.tokens is None else self.tokens.shape[0] - self.base
        base, slots = _capacity(nulls, self.base), _capacity(len(rows), held)
        null = self.null.tokens
        self.tokens = null.new_zeros(base + slots, length, null.shape[2], dtype=dtype)
        self.mask = torch.zeros(base + slots, length, dtype=torch.bool, device=null.device)
        self.tokens[:base, 0] = null[0, 0]
        self.mask[:base, 0] = True
        self.base, self.rows, self._slot = base, [], {}
        for row in rows:
            self._join(row)
        self.builds += 1

    def _join(self, row: SamplingRow) -> None:
        slot, (tokens, mask) = len(self.rows), (row.condition.tokens[0], row.condition.mask[0])  # (L_i, width)
        at, real = self.base + slot, tokens.shape[0]
        self.tokens[at, :real] = tokens
        self.tokens[at, real:] = 0
        self.mask[at, :real] = mask
        self.mask[at, real:] = False
        self.rows.append(row)
        self._slot[id(row)] = slot

    def _leave(self, row: SamplingRow) -> None:
        slot, last = self._slot.pop(id(row)), len(self.rows) - 1
        if slot != last:  # the last slot's row moves into the freed one
            moved = self.rows[last]
            self.tokens[self.base + slot] = self.tokens[self.base + last]
            self.mask[self.base + slot] = self.mask[self.base + last]
            self.rows[slot] = moved
            self._slot[id(moved)] = slot
        self.rows.pop()


@dataclass
class ForwardBatch:
    """One forward's inputs: x_t (R, ...), t (R,) float32, x0_prev (R, ...) or None, the Condition (R, L, width) or
    None (an unconditional model); `own[i]`: the output row of rows[i]'s own input, `null[i]`: of a guided row's
    null input (None for the others)."""

    x: torch.Tensor
    t: torch.Tensor
    prev: torch.Tensor | None
    condition: Condition | None
    own: list[int]
    null: list[int | None]

    def estimates(self, rows: list[SamplingRow], out: torch.Tensor) -> list[torch.Tensor]:
        """The forward's output (R, ...) -> each row's x0 estimate (1, ...)."""
        estimates = []
        for row, own, null in zip(rows, self.own, self.null):
            x0 = out[own : own + 1]
            if null is not None:
                x0_null = out[null : null + 1]
                x0 = x0_null + row.request.guidance * (x0 - x0_null)
            estimates.append(x0)
        return estimates


def forward_inputs(rows: list[SamplingRow], null: Condition | None, self_condition: bool,
                   held: ConditionRows | None = None) -> ForwardBatch:
    """The one forward's inputs for `rows`. A conditional model's (`null` given) null inputs come first (the guided
    rows' other halves and the rows without a condition, all reading `null`), then the rows with a condition:
    from `held`, in its slot order, reading a view of its buffer; without it (a forward over some of the rows),
    concatenated afresh."""
    if null is None:
        inputs = [(i, False) for i in range(len(rows))]
        condition = None
    else:
        reading = [row for row in rows if row.condition is not None]
        nulls = [i for i, row in enumerate(rows) if row.condition is None or row.guided]
        if held is not None:
            reading, condition = held.read(reading, len(nulls))
        else:
            parts = [null] * len(nulls) + [row.condition for row in reading]
            condition = parts[0] if len(parts) == 1 else Condition.cat(parts)
        index = {id(row): i for i, row in enumerate(rows)}
        inputs = [(i, True) for i in nulls] + [(index[id(row)], False) for row in reading]
    own, guided_null = [None] * len(rows), [None] * len(rows)
    for at, (i, reads_null) in enumerate(inputs):
        if reads_null and rows[i].condition is not None:
            guided_null[i] = at  # a guided row's other half
        else:
            own[i] = at
    x = stack([rows[i].x for i, _ in inputs])
    t = torch.tensor([float(rows[i].t) for i, _ in inputs], dtype=torch.float32, device=x.device)
    prev = None
    if self_condition:
        prev = stack([torch.zeros_like(rows[i].x) if rows[i].previous is None else rows[i].previous
                      for i, _ in inputs])
    return ForwardBatch(x, t, prev, condition, own, guided_null)

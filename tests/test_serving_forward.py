"""The serving loop's forward (ldlm.serving.forward): the conditions kept across iterations read as the batch
concatenated afresh reads, and are written once a row, not once an iteration."""

from __future__ import annotations

import pytest
import torch

from ldlm.model.reverse import Condition
from ldlm.serving.forward import ConditionRows, forward_inputs
from ldlm.serving.requests import Request
from ldlm.serving.rows import start_row

from .test_conditional import reverse_model

WIDTH = 6


def condition(length: int, seed: int, projected: bool = True) -> Condition:
    tokens = torch.randn(1, length, WIDTH, generator=torch.Generator().manual_seed(seed))
    return Condition(tokens, torch.ones(1, length, dtype=torch.bool), projected)


def null_condition(projected: bool = True) -> Condition:
    return Condition(torch.full((1, 1, WIDTH), 7.0), torch.ones(1, 1, dtype=torch.bool), projected)


def row(length: int | None, seed: int, guidance: float = 2.0, cond: Condition | None = None):
    request = Request("generate_from", seed=seed, sampler="ddim", steps=4, source=None if length is None else "s",
                      guidance=guidance)
    if cond is None and length is not None:
        cond = condition(length, seed)
    return start_row(request, torch.randn(1, 3), torch.Generator().manual_seed(seed), cond, 1000)


def fresh(null: Condition, rows, nulls: int) -> Condition:
    """What a forward over `nulls` null inputs, then `rows`, read before: the batch concatenated afresh."""
    return Condition.cat([null] * nulls + [r.condition for r in rows])


def test_rows_joining_and_leaving_read_as_the_batch_made_afresh():
    null = null_condition()
    held = ConditionRows(null)
    rows = [row(5, 0), row(3, 1), row(8, 2)]
    order, read = held.read(rows, nulls=2)
    assert order == rows and held.builds == 1
    torch.testing.assert_close(read.tokens, fresh(null, order, 2).tokens, rtol=0, atol=0)
    assert torch.equal(read.mask, fresh(null, order, 2).mask) and read.projected

    # unchanged rows: the same memory, nothing written
    again = held.read(rows, nulls=2)[1]
    assert again.tokens.data_ptr() == read.tokens.data_ptr() and held.builds == 1

    # a short row leaves from the middle, a shorter one joins: slots reused, no new buffer
    joining = row(2, 3)
    order, read = held.read([rows[0], rows[2], joining], nulls=1)
    assert held.builds == 1 and order == [rows[0], rows[2], joining]
    torch.testing.assert_close(read.tokens, fresh(null, order, 1).tokens, rtol=0, atol=0)
    assert torch.equal(read.mask, fresh(null, order, 1).mask)

    # the first row leaves: the last slot's row moves into its place
    order, read = held.read([rows[2], joining], nulls=0)
    assert order == [joining, rows[2]] and held.builds == 1
    torch.testing.assert_close(read.tokens, fresh(null, order, 0).tokens, rtol=0, atol=0)

    # the longest row leaves: the buffer is made again at the new longest length, as a fresh batch pads
    order, read = held.read([joining], nulls=1)
    assert held.builds == 2 and read.tokens.shape == (2, 2, WIDTH)
    torch.testing.assert_close(read.tokens, fresh(null, order, 1).tokens, rtol=0, atol=0)

    # more rows and null inputs than it holds: made again, with room to double
    many = [row(4, 10 + i) for i in range(5)]
    order, read = held.read(many, nulls=5)
    assert held.builds == 3 and order == many
    torch.testing.assert_close(read.tokens, fresh(null, order, 5).tokens, rtol=0, atol=0)

    # nothing samples: the buffer goes, and the next rows make it again
    held.clear()
    assert held.tokens is None and held.rows == []
    order, read = held.read(many[:2], nulls=1)
    assert held.builds == 4 and order == many[:2]
    torch.testing.assert_close(read.tokens, fresh(null, order, 1).tokens, rtol=0, atol=0)


def test_projected_and_unprojected_conditions_are_not_mixed():
    held = ConditionRows(null_condition(projected=True))
    with pytest.raises(ValueError, match="cannot batch projected and unprojected"):
        held.read([row(3, 0, cond=condition(3, 0, projected=False))], nulls=0)
    with pytest.raises(ValueError, match="one token of one row"):
        ConditionRows(condition(2, 0))


def test_a_forward_over_held_conditions_estimates_as_each_row_alone():
    """Guided, unguided (w = 1), weakly guided and unconditioned rows of a cross-attention model, over three
    iterations as rows come and go: each x0 estimate is its row's own forward, guided rows combined with the null
    forward (x0_null + w (x0_cond - x0_null))."""
    model = reverse_model("text", "cross")
    null = model.project_condition(model.null(1))

    def model_row(length: int | None, seed: int, guidance: float):
        g = torch.Generator().manual_seed(seed)
        cond = None
        if length is not None:
            states = torch.randn(1, length, model.config.latent_dim, generator=g)
            cond = model.project_condition(model.embed_condition(states, torch.ones(1, length, dtype=torch.bool)))
        r = row(length, seed, guidance, cond)
        r.x = torch.randn(1, *model.config.latent_shape, generator=g)
        return r

    held = ConditionRows(null)
    everyone = [model_row(4, 0, 2.0), model_row(None, 1, 1.0), model_row(6, 2, 1.0), model_row(2, 3, 3.5),
                model_row(5, 4, 0.5)]
    with torch.no_grad():
        for rows in (everyone[:3], everyone[1:], [everyone[4], everyone[0]]):
            batch = forward_inputs(rows, null, False, held)
            assert batch.x.shape[0] == len(rows) + sum(r.guided for r in rows)
            estimates = batch.estimates(rows, model(batch.x, batch.t, condition=batch.condition))
            for r, estimate in zip(rows, estimates):
                t = torch.tensor([float(r.t)])
                x0 = model(r.x, t, condition=null if r.condition is None else r.condition)
                if r.guided:
                    x0_null = model(r.x, t, condition=null)
                    x0 = x0_null + r.request.guidance * (x0 - x0_null)
                torch.testing.assert_close(estimate, x0, rtol=0, atol=1e-5)
    assert held.builds <= 3


def test_each_input_reads_its_own_rows_previous_estimate():
    null = null_condition()
    rows = [row(3, 0), row(None, 1), row(2, 2, guidance=1.0), row(4, 3)]
    for i, r in enumerate(rows):
        r.x = torch.full((1, 3), float(i))
        r.previous = None if i == 1 else torch.full((1, 3), 100.0 + i)
    for held in (ConditionRows(null), None):
        batch = forward_inputs(rows, null, True, held)
        for x, prev in zip(batch.x, batch.prev):
            i = int(x[0])
            assert torch.equal(prev, torch.zeros(3) if i == 1 else x + 100)
        for i, (own, other) in enumerate(zip(batch.own, batch.null)):
            assert int(batch.x[own, 0]) == i and (other is None) == (not rows[i].guided)
            if other is not None:
                assert int(batch.x[other, 0]) == i and torch.equal(batch.condition.tokens[other], null.tokens[0]
                                                                   if batch.condition.tokens.shape[1] == 1 else
                                                                   null.padded(batch.condition.tokens.shape[1])
                                                                   .tokens[0])

"""The fused beam step's kernels (ldlm.kernels.beam_head: LM head, log-softmax, n-gram ban, beam scores, top-2K)
against the same function in torch with the logits written out (ldlm.kernels.reference.beam_head_reference), on
irregular shapes: rows not a multiple of the tile, vocabularies not a power of two, over one and many
vocabulary tiles, with and without bans (Triton interpreter on CPU, compiled on a GPU).

Tolerances: fp32 scores within 1e-5 relative (the same products summed in another order; the log-softmax's
normalizer combined tile by tile) and the same (beam, token) indices; bf16: the kernel keeps fp32 logits where
torch rounds them to bf16, so scores within 5e-2 of each other and indices free to differ among near-ties.
"""

from __future__ import annotations

import pytest
import torch

from ldlm.kernels.beam_head import HeadTiles, beam_head_topk  # conftest: TRITON_INTERPRET=1 on CPU
from ldlm.kernels.reference import beam_head_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def head_case(B: int, K: int, E: int, V: int, W: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    norm, head = torch.nn.LayerNorm(E), torch.nn.Linear(E, V, bias=False)
    with torch.no_grad():
        for p in (*norm.parameters(), *head.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * (E**-0.5 if p is head.weight else 1.0))
    h = 2 * torch.randn(B * K, E, generator=g) + 0.3
    running = 3 * torch.randn(B, K, generator=g)
    running[::2, 1:] = -1.0e9  # a first step's beams: only the first may expand
    banned = torch.randint(-1, V, (B * K, W), generator=g)
    return (h.to(DEVICE, dtype), norm.to(DEVICE, dtype), head.to(DEVICE, dtype), running.to(DEVICE),
            banned.to(DEVICE))


# (items, beams, E, V, banned per row, tiles): one vocabulary tile on the CPU's default tiling, or many (16 x 64)
SHAPES = [(5, 3, 40, 300, 6, None), (2, 4, 64, 1031, 0, None), (3, 4, 48, 777, 10, HeadTiles(16, 64, 32)),
          (1, 1, 32, 50, 3, HeadTiles(16, 16, 32)), (7, 2, 24, 129, 62, HeadTiles(16, 32, 16))]


@pytest.mark.parametrize(("B", "K", "E", "V", "W", "tiles"), SHAPES)
def test_matches_torch_with_the_logits_written_out(B, K, E, V, W, tiles):
    h, norm, head, running, banned = head_case(B, K, E, V, W, seed=B * V)
    with torch.no_grad():
        expected_scores, expected_index = beam_head_reference(h, norm, head, running, banned, candidates=2 * K)
        scores, index = beam_head_topk(h, norm, head, running, banned, candidates=2 * K, tiles=tiles)
    assert scores.shape == index.shape == (B, 2 * K) and index.dtype == torch.int64
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=0)
    assert torch.equal(index, expected_index)
    if W:  # the bans bite: every row's banned tokens are absent from what it chose
        chosen = set(map(tuple, torch.stack([index // V + torch.arange(B, device=DEVICE)[:, None] * K,
                                             index % V], -1).view(-1, 2).tolist()))
        assert not any((r, t) in chosen for r, row in enumerate(banned.tolist()) for t in row if t >= 0)


def test_ties_go_to_the_lower_index_as_a_stable_sort():
    """Tokens with the same embedding have the same logit: picked in (score desc, beam x V + token asc) order."""
    h, norm, head, running, banned = head_case(2, 3, 32, 90, 0, seed=5)
    with torch.no_grad():
        head.weight[7] += 5.0 * head.weight[7].sign()  # token 7 made the likeliest...
        head.weight[40:50] = head.weight[7]  # ...and tied with ten more, across vocabulary tiles: the ties decide
        running[:] = 0.0  # every beam tied with every other too
        h[3:6] = h[0:3]  # item 1's beams equal item 0's
        scores, index = beam_head_topk(h, norm, head, running, banned, candidates=6, tiles=HeadTiles(16, 16, 16))
        expected = beam_head_reference(h, norm, head, running, banned, candidates=6)[0]
        full = torch.log_softmax(head(norm(h)).float(), dim=-1).view(2, 3 * 90)
        order = torch.sort(full, dim=1, descending=True, stable=True).indices[:, :6]
    assert torch.equal(index, order), (index, order)
    assert order[0].tolist() == [7, 40, 41, 42, 43, 44]  # beam 0's tied tokens, before beams 1 and 2's
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=0)


def test_bf16_scores_within_rounding_of_torch():
    h, norm, head, running, banned = head_case(3, 4, 64, 500, 5, seed=8, dtype=torch.bfloat16)
    running = running.clamp(min=-20.0)
    with torch.no_grad():
        expected, _ = beam_head_reference(h, norm, head, running, banned, candidates=8)
        scores, index = beam_head_topk(h, norm, head, running, banned, candidates=8)
    assert scores.dtype == torch.float32 and (scores[:, :-1] >= scores[:, 1:]).all()  # best first
    assert (scores - expected).abs().max() < 5e-2


def test_errors_say_what_to_fix():
    h, norm, head, running, banned = head_case(2, 2, 16, 40, 2, seed=1)
    with pytest.raises(ValueError, match="h has 4 rows; running_scores says 3 items x 2 beams"):
        beam_head_topk(h, norm, head, running.repeat(2, 1)[:3], banned, candidates=4)
    with pytest.raises(ValueError, match="without bias"):
        beam_head_topk(h, norm, torch.nn.Linear(16, 40).to(DEVICE), running, banned, candidates=4)
    with pytest.raises(ValueError, match="candidates must be between 1 and"):
        beam_head_topk(h, norm, head, running, banned, candidates=81)
    with pytest.raises(ValueError, match="running_scores must be float32"):
        beam_head_topk(h, norm, head, running.double(), banned, candidates=4)
    with pytest.raises(ValueError, match=r"banned must be \(4, W\) integer token ids"):
        beam_head_topk(h, norm, head, running, banned.float(), candidates=4)

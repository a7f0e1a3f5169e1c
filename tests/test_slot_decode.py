"""The beam search whose items join and leave between tokens (ldlm.fast.slot_decode, the serving engine's
continuous decode): each item's tokens are those of the reference search for it alone, whenever it joined and
whatever decoded beside it, on the reference decoder and on the ONNX graphs."""

from __future__ import annotations

import pytest
import torch

from ldlm.fast.slot_decode import SlotBeamSearch, SlotKV, TorchSlotDecoder
from ldlm.fast.static_beam_search import ban_repeated_ngrams_static
from ldlm.model.config import ModelConfig
from ldlm.model.decoder import LatentDecoder
from ldlm.sampling.beam_search import BeamSearchConfig, ban_repeated_ngrams, beam_search

from .conftest import TINY_TEXTS

ITEMS = 24


@pytest.fixture(scope="module")
def ending_decoder():
    """A random tiny decoder whose EOS logit is raised by an amount that depends on the state, so hypotheses end
    at lengths from 1 to the bound (a fixed raise ends them all at once, or never)."""
    torch.manual_seed(0)
    decoder = LatentDecoder.build(ModelConfig.from_preset("tiny"), TINY_TEXTS).eval()
    for p in decoder.parameters():
        p.data.normal_(0, 0.5)
    eos = decoder.eos_token_id

    def raise_eos(module, inputs, logits):
        logits = logits.clone()
        logits[..., eos] += 5.8 + inputs[0][..., 0]
        return logits

    decoder.gpt2.lm_head.register_forward_hook(raise_eos)
    return decoder


def run_with_arrivals(search: SlotBeamSearch, latents: torch.Tensor, seed: int, drop: set[int] = frozenset()):
    """Items join a few at a time (0 to 2 per step, by a seeded draw); those in `drop` leave after 3 steps, if
    not done by then. Returns the tokens of the items that ended, and the items removed."""
    got, removed, joined_at, next_item, step = {}, set(), {}, 0, 0
    draw = torch.Generator().manual_seed(seed)
    while next_item < len(latents) or search.slots:
        for key, ids in search.step():
            got[key] = ids
        for key in [k for k in drop if joined_at.get(k) == step - 3 and k in search.keys]:
            search.remove([key])
            removed.add(key)
        arriving = list(range(next_item, min(len(latents), next_item + int(torch.randint(0, 3, (1,), generator=draw)))))
        next_item += len(arriving)
        for key in arriving:
            joined_at[key] = step
        if arriving:
            for key, ids in search.add(latents[arriving], arriving):
                got[key] = ids
        step += 1
        assert step < 2000
    return got, removed


@pytest.mark.parametrize("num_beams", [1, 3, 4])
def test_items_joining_between_tokens_get_their_lone_search_tokens(ending_decoder, num_beams):
    config = BeamSearchConfig(num_beams=num_beams, max_new_tokens=24)
    latents = torch.randn(ITEMS, 32, generator=torch.Generator().manual_seed(num_beams)) * 2
    with torch.no_grad():
        alone = [beam_search(ending_decoder, latents[i : i + 1], config)[0] for i in range(ITEMS)]
        search = SlotBeamSearch(TorchSlotDecoder(ending_decoder), config, n_prefix=ending_decoder.config.n_prefix,
                                eos=ending_decoder.eos_token_id, pad=ending_decoder.pad_token_id,
                                device=torch.device("cpu"))
        got, removed = run_with_arrivals(search, latents, seed=num_beams, drop={5, 11, 17})
    assert len({len(ids) for ids in alone}) >= 4  # hypotheses of many lengths: items leave at different steps
    assert removed and got == {i: alone[i] for i in range(ITEMS) if i not in removed}
    assert search.slots == 0 and search.decoder.kv.rows == 0
    # the cache's columns were compacted, not grown without bound, over more steps than it holds columns
    assert search.decoder.kv.capacity <= 2 * (ending_decoder.config.n_prefix + 24) + SlotKV.GROW


def test_the_per_row_ngram_ban_is_the_reference_ban_row_by_row():
    torch.manual_seed(0)
    tokens = torch.randint(0, 5, (6, 12))  # few distinct tokens: many repeated n-grams
    cur = torch.tensor([0, 2, 3, 7, 11, 12])
    log_probs = torch.randn(6, 5)
    for n in (1, 2, 3):
        got = ban_repeated_ngrams_static(log_probs, tokens, cur, n)  # each row's own count
        for r in range(6):
            expected = ban_repeated_ngrams(log_probs[r : r + 1], tokens[r : r + 1, : int(cur[r])], n)
            assert torch.equal(got[r : r + 1], expected), (n, r)


def test_onnx_graphs_join_items_between_tokens(tmp_path, ending_decoder):
    from ldlm.export.onnx_export import export_checkpoint
    from ldlm.model.checkpoint import Components
    from ldlm.model.encoder import build_tiny_encoder
    from ldlm.model.reverse import ReverseTransformer
    from ldlm.runtimes.onnx_parts import OnnxSlotDecoder
    from ldlm.runtimes.onnx_runtime import load_export_components

    config = ending_decoder.config
    decoder = LatentDecoder.build(config, TINY_TEXTS).eval()  # the hook does not export: the same raise, in weights
    decoder.load_state_dict(ending_decoder.state_dict())
    vocab, eos = decoder.gpt2.config.vocab_size, decoder.eos_token_id
    head = torch.nn.Linear(config.n_embd, vocab, bias=True)
    with torch.no_grad():  # logit_eos + 5.8 + ln_f(h)[0], as the hook adds
        head.weight.copy_(ending_decoder.gpt2.lm_head.weight)
        head.weight[eos, 0] += 1.0
        head.bias.zero_()
        head.bias[eos] = 5.8
    decoder.gpt2.lm_head = head
    components = Components(config, build_tiny_encoder(), decoder, ReverseTransformer(config).eval(),
                            torch.zeros(config.latent_shape), torch.ones(config.latent_shape), True)
    export_checkpoint(components, tmp_path / "export", variants=("float32",), int8=False, log=lambda *_: None)
    onnx_decoder = load_export_components(tmp_path / "export", torch.device("cpu"), torch.float32)[0].decoder
    search_config = BeamSearchConfig(num_beams=3, max_new_tokens=24)
    latents = torch.randn(ITEMS, 32, generator=torch.Generator().manual_seed(7)) * 2
    with torch.no_grad():
        alone = [beam_search(onnx_decoder, latents[i : i + 1], search_config)[0] for i in range(ITEMS)]
        search = SlotBeamSearch(OnnxSlotDecoder(onnx_decoder), search_config, n_prefix=config.n_prefix,
                                eos=onnx_decoder.eos_token_id, pad=onnx_decoder.pad_token_id,
                                device=torch.device("cpu"))
        got, _ = run_with_arrivals(search, latents, seed=7)
    assert len({len(ids) for ids in alone}) >= 3
    assert got == dict(enumerate(alone))

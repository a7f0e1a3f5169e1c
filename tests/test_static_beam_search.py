"""Static-KV beam search: the same tokens as the reference beam search, batched equal to one at a time."""

from __future__ import annotations

import copy

import pytest
import torch

from ldlm.fast.static_beam_search import StaticBeamSearch, ban_repeated_ngrams_static
from ldlm.fast.static_gpt2 import StaticKVGPT2, _as_words
from ldlm.sampling.beam_search import BeamSearchConfig, ban_repeated_ngrams, beam_search

from .test_beam_search import decoder  # noqa: F401  (the shared random tiny decoder fixture)

# The fused add + norm kernels run where Triton runs: compiled on a GPU, else in the interpreter on the CPU (the
# conftest sets TRITON_INTERPRET=1 only where there is no GPU, so on a GPU machine they need CUDA tensors).
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5 if KERNEL_DEVICE == "cpu" else 1e-4  # cuBLAS tiles a whole sequence and one token differently


@pytest.fixture(scope="module")
def kernel_decoder(decoder):  # noqa: F811
    """The shared tiny decoder, on the device where the Triton kernels run."""
    return copy.deepcopy(decoder).to(KERNEL_DEVICE)


# torch's modules; residual adds + norms as Triton kernels; every matmul with its norm, bias, GELU and residual
# as one Triton kernel (ldlm.kernels.fused_linear). Triton: compiled on a GPU, else the interpreter
KERNELS = {"torch": {}, "fused norms": {"fused_norms": True}, "fused blocks": {"fused_blocks": True}}


@pytest.mark.parametrize("attention", ["sdpa", "matmul", "indirect"])
@pytest.mark.parametrize("kernels", list(KERNELS))
def test_static_gpt2_matches_hugging_face_forward(kernel_decoder, kernels, attention):
    """Prefill and steps against Hugging Face's forward over the whole sequence; GPT-2's gelu_new runs as
    torch's one-kernel tanh GELU, or inside the fused kernel (the same function, rounded differently)."""
    dec = kernel_decoder
    assert dec.gpt2.config.activation_function == "gelu_new"
    latents = torch.randn(3, dec.config.latent_dim, generator=torch.Generator().manual_seed(0)).to(KERNEL_DEVICE)
    ids = torch.randint(1, 200, (3, 5), generator=torch.Generator().manual_seed(1)).to(KERNEL_DEVICE)
    prefix = dec.prefix(latents)
    with torch.no_grad():
        full = dec.gpt2(inputs_embeds=torch.cat([prefix, dec.gpt2.transformer.wte(ids)], 1)).logits
    model = StaticKVGPT2(dec.gpt2, rows=3, max_len=dec.config.n_prefix + 8, attention=attention, **KERNELS[kernels])
    assert model.act.func is torch.nn.functional.gelu and model.act.keywords == {"approximate": "tanh"}
    logits = [model.prefill(prefix, repeats=1)]
    P = prefix.shape[1]
    for i in range(ids.shape[1]):
        logits.append(model.step(ids[:, i], torch.tensor(P + i, device=KERNEL_DEVICE)))
    torch.testing.assert_close(torch.stack(logits, 1), full[:, P - 1 :], rtol=TOL, atol=TOL)


def test_reorder_gathers_rows_into_the_other_cache(decoder):  # noqa: F811
    model = StaticKVGPT2(decoder.gpt2, rows=4, max_len=decoder.config.n_prefix + 4)
    model.prefill(decoder.prefix(torch.randn(2, decoder.config.latent_dim)), repeats=2)
    model.step(torch.tensor([5, 6, 7, 8]), torch.tensor(decoder.config.n_prefix))  # rows now differ
    keys, values = model.k_cache.clone(), model.v_cache.clone()
    rows = torch.tensor([1, 1, 3, 2])
    model.reorder(rows)
    assert model.current == 1 and torch.equal(model.k_cache, keys[:, rows]) and torch.equal(model.v_cache, values[:, rows])
    model.reorder(torch.tensor([0, 2, 1, 3]))
    assert model.current == 0 and torch.equal(model.k_cache, keys[:, rows][:, [0, 2, 1, 3]])


@pytest.mark.parametrize("n", [1, 2, 3])
def test_static_ngram_ban_matches_reference(n):
    g = torch.Generator().manual_seed(n)
    tokens = torch.randint(0, 4, (6, 12), generator=g)
    log_probs = torch.randn(6, 8, generator=g)
    for cur in range(0, 13):
        expected = ban_repeated_ngrams(log_probs, tokens[:, :cur], n)
        assert torch.equal(ban_repeated_ngrams_static(log_probs, tokens, torch.tensor(cur), n), expected), cur


@pytest.mark.parametrize("early_stopping", [True, False])
@pytest.mark.parametrize("num_beams, max_new_tokens", [(4, 16), (2, 9), (1, 12)])
def test_same_tokens_as_reference(decoder, early_stopping, num_beams, max_new_tokens):  # noqa: F811
    latents = torch.randn(6, decoder.config.latent_dim, generator=torch.Generator().manual_seed(1))
    cfg = BeamSearchConfig(num_beams=num_beams, max_new_tokens=max_new_tokens, early_stopping=early_stopping)
    assert StaticBeamSearch(decoder, batch_size=6, config=cfg)(latents) == beam_search(decoder, latents, cfg)


@pytest.mark.parametrize("attention", ["sdpa", "matmul", "indirect"])
def test_same_tokens_with_fused_norms(kernel_decoder, attention):
    """The decode step with each residual add and the norm after it as one Triton kernel (the default on CUDA,
    where this test runs it compiled; through the interpreter on CPU), with either attention."""
    dec = kernel_decoder
    latents = torch.randn(6, dec.config.latent_dim, generator=torch.Generator().manual_seed(3)).to(KERNEL_DEVICE)
    cfg = BeamSearchConfig(num_beams=4, max_new_tokens=12)
    search = StaticBeamSearch(dec, batch_size=6, config=cfg, fused_norms=True, attention=attention)
    assert search.model.attention == attention
    from ldlm.kernels.add_layer_norm import add_layer_norm

    assert search.model.add_norm is add_layer_norm
    assert search(latents) == beam_search(dec, latents, cfg)


def test_same_tokens_with_fused_blocks(kernel_decoder):
    """The decode step with every matmul one Triton kernel (ldlm.kernels.fused_linear), batched and one item
    at a time: the reference beam search's tokens (each attention against Hugging Face's forward above)."""
    dec = kernel_decoder
    latents = torch.randn(4, dec.config.latent_dim, generator=torch.Generator().manual_seed(4)).to(KERNEL_DEVICE)
    cfg = BeamSearchConfig(num_beams=4, max_new_tokens=10)
    search = StaticBeamSearch(dec, batch_size=4, config=cfg, fused_blocks=True)
    assert search.model.fused_blocks
    expected = beam_search(dec, latents, cfg)
    assert search(latents) == expected
    single = StaticBeamSearch(dec, batch_size=1, config=cfg, fused_blocks=True)
    assert [single(latents[i : i + 1])[0] for i in range(2)] == expected[:2]


@pytest.mark.parametrize("attention", ["sdpa", "indirect"])  # indirect: a searcher reused keeps no stale table
def test_padded_batch_and_one_at_a_time(decoder, attention):  # noqa: F811
    latents = torch.randn(5, decoder.config.latent_dim, generator=torch.Generator().manual_seed(2))
    cfg = BeamSearchConfig(num_beams=4, max_new_tokens=14)
    search = StaticBeamSearch(decoder, batch_size=8, config=cfg, check_every=3, attention=attention)
    batched = search(latents)  # 5 real items padded to the static batch of 8
    assert batched == beam_search(decoder, latents, cfg)
    items = range(5) if attention == "sdpa" else [3]  # (the interpreter runs the kernel a program at a time: slow)
    assert [batched[i] for i in items] == [search(latents[i : i + 1])[0] for i in items]
    with pytest.raises(ValueError, match="exceeds this searcher's batch_size 8"):
        search(torch.randn(9, decoder.config.latent_dim))


def test_attention_defaults_to_sdpa_and_a_wrong_name_says_what_to_use(decoder):  # noqa: F811
    """SDPA stays the default until the other two are timed on a GPU at every batch size."""
    assert StaticKVGPT2(decoder.gpt2, rows=2, max_len=8).attention == "sdpa"
    with pytest.raises(ValueError, match=r"attention='flash': use one of \('sdpa', 'matmul', 'indirect'\)"):
        StaticKVGPT2(decoder.gpt2, rows=2, max_len=8, attention="flash")


def test_reorder_of_a_bf16_cache_copies_bits(decoder):  # noqa: F811
    """The reorder gathers 8-byte words; a cache whose rows are not a whole number of words gathers elements."""
    model = StaticKVGPT2(copy.deepcopy(decoder.gpt2).to(torch.bfloat16), rows=3, max_len=5)
    for cache in model._caches[0]:
        cache.copy_(torch.randn(cache.shape))
    before = [c.clone() for c in model._caches[0]]
    model.reorder(torch.tensor([2, 0, 0]))
    for old, new in zip(before, (model.k_cache, model.v_cache)):
        assert torch.equal(new, old[:, [2, 0, 0]])
    odd = torch.zeros(2, 3, 3, dtype=torch.bfloat16)  # 6 bytes a row
    assert _as_words(odd) is odd and _as_words(torch.zeros(2, 4, dtype=torch.bfloat16)).dtype == torch.int64


def test_indirect_reorder_moves_the_table_not_the_cache(kernel_decoder):
    """With attention="indirect" a reorder gathers the (rows, max_len) table of source rows and the one cache
    stays put; read through the table, the cache is the one a copying reorder makes, and the next step's
    logits are the same (to rounding: the attention kernels differ)."""
    dec = kernel_decoder
    P = dec.config.n_prefix
    latents = torch.randn(2, dec.config.latent_dim, generator=torch.Generator().manual_seed(4)).to(KERNEL_DEVICE)
    prefix = dec.prefix(latents)
    ids = torch.tensor([5, 6, 7, 8], device=KERNEL_DEVICE)
    copying = StaticKVGPT2(dec.gpt2, rows=4, max_len=P + 4)
    indirect = StaticKVGPT2(dec.gpt2, rows=4, max_len=P + 4, attention="indirect", fused_norms=KERNEL_DEVICE == "cuda")
    assert len(indirect._caches) == 1 and len(copying._caches) == 2  # half the cache memory
    for model in (copying, indirect):
        model.prefill(prefix, repeats=2)
        model.step(ids, torch.tensor(P, device=KERNEL_DEVICE))
        model.reorder(torch.tensor([1, 1, 3, 2], device=KERNEL_DEVICE))
    keys = indirect.k_cache.clone()
    assert torch.equal(indirect._sources[indirect.current][:, P], torch.tensor([1, 1, 3, 2], device=KERNEL_DEVICE))
    slots = torch.arange(P + 1, device=KERNEL_DEVICE)
    rows = indirect._sources[indirect.current][:, : P + 1]  # (R, P+1)
    through_table = indirect.k_cache[:, rows, :, slots].permute(2, 0, 3, 1, 4)  # -> (L, R, H, P+1, hd)
    expected = copying.k_cache[:, :, :, : P + 1]
    assert torch.equal(through_table[..., :P, :], expected[..., :P, :])  # the prefill's, computed alike
    torch.testing.assert_close(through_table, expected, rtol=TOL, atol=TOL)  # layer 2's keys follow attention
    position = torch.tensor(P + 1, device=KERNEL_DEVICE)
    torch.testing.assert_close(indirect.step(ids, position), copying.step(ids, position), rtol=TOL, atol=TOL)
    assert torch.equal(indirect.k_cache[:, :, :, : P + 1], keys[:, :, :, : P + 1])  # nothing written moved


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_banned_token_ids_are_the_same_ban(n):
    """banned_tokens_static (the ids the fused beam step takes) bans what ban_repeated_ngrams_static does."""
    from ldlm.fast.static_beam_search import banned_tokens_static
    from ldlm.kernels.reference import ban_tokens

    g = torch.Generator().manual_seed(n + 10)
    tokens = torch.randint(0, 4, (6, 12), generator=g)
    log_probs = torch.randn(6, 8, generator=g)
    for cur in range(0, 13):
        ids = banned_tokens_static(tokens, torch.tensor(cur), n)
        assert ids.shape == (6, 0 if n == 0 else 12 - n + 1)
        expected = ban_repeated_ngrams_static(log_probs, tokens, torch.tensor(cur), n)
        assert torch.equal(ban_tokens(log_probs, ids), expected), cur


@pytest.fixture(scope="module")
def eos_weighted_decoder(kernel_decoder):
    """The shared decoder with its EOS raised in the weights rather than by a hook on the LM head (which the
    fused beam step, reading the weight, would not run): EOS's row of the tied embedding along ln_f's bias, so
    hypotheses end at varied lengths (2, 7 and 10 of 10 tokens on the latents below)."""
    dec = copy.deepcopy(kernel_decoder)
    head = dec.gpt2.lm_head
    head._forward_hooks.clear()
    with torch.no_grad():
        head.weight[dec.eos_token_id] = 0.46 * dec.gpt2.transformer.ln_f.bias
    return dec


@pytest.mark.parametrize("kernels", [{}, {"fused_blocks": True}])
def test_same_tokens_with_the_fused_beam_step(eos_weighted_decoder, kernels):
    """The LM head, log-softmax, n-gram ban, beam scores and top-2K as ldlm.kernels.beam_head's two kernels
    (alone, and with every matmul fused too), batched and one item at a time: the reference's tokens."""
    dec = eos_weighted_decoder
    latents = torch.randn(8, dec.config.latent_dim, generator=torch.Generator().manual_seed(6)).to(KERNEL_DEVICE)
    cfg = BeamSearchConfig(num_beams=3, max_new_tokens=10)
    search = StaticBeamSearch(dec, batch_size=8, config=cfg, fused_beam_step=True, **kernels)
    expected = beam_search(dec, latents, cfg)
    assert len({len(tokens) for tokens in expected}) > 1  # some end early: EOS, the finished set, the stop test
    assert search(latents) == expected
    single = StaticBeamSearch(dec, batch_size=1, config=cfg, fused_beam_step=True, **kernels)
    assert len(expected[2]) < cfg.max_new_tokens and single(latents[2:3]) == [expected[2]]  # one that ends early


def test_the_fused_beam_step_refuses_a_hooked_lm_head(kernel_decoder):
    with pytest.raises(ValueError, match="forward hooks on it would not run"):
        StaticBeamSearch(kernel_decoder, batch_size=2, config=BeamSearchConfig(max_new_tokens=8), fused_beam_step=True)

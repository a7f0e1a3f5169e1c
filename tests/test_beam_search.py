"""Reference beam search: agrees with Hugging Face `generate`, is deterministic and batch-independent."""

from __future__ import annotations

import pytest
import torch

from ldlm.sampling.beam_search import BeamSearchConfig, ban_repeated_ngrams, beam_search


@pytest.fixture(scope="module")
def decoder(varied_decoder):
    return varied_decoder


def hf_beam_search(decoder, latents, cfg: BeamSearchConfig) -> list[list[int]]:
    prefix = decoder.prefix(latents)
    out = decoder.gpt2.generate(
        inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
        num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens, no_repeat_ngram_size=cfg.no_repeat_ngram_size,
        early_stopping=cfg.early_stopping, length_penalty=cfg.length_penalty, do_sample=False,
        eos_token_id=decoder.eos_token_id, pad_token_id=decoder.pad_token_id,
    )
    eos = decoder.eos_token_id
    return [row[: row.index(eos)] if eos in row else row for row in out.tolist()]


@pytest.mark.filterwarnings("ignore:Passing `no_repeat_ngram_size`")
@pytest.mark.parametrize("early_stopping", [True, False])
@pytest.mark.parametrize("num_beams, max_new_tokens", [(4, 16), (2, 9), (1, 12)])
def test_matches_hugging_face_generate(decoder, early_stopping, num_beams, max_new_tokens):
    latents = torch.randn(6, decoder.config.latent_dim, generator=torch.Generator().manual_seed(1))
    cfg = BeamSearchConfig(num_beams=num_beams, max_new_tokens=max_new_tokens, early_stopping=early_stopping)
    ours = beam_search(decoder, latents, cfg)
    assert ours == hf_beam_search(decoder, latents, cfg)
    lengths = {len(x) for x in ours}
    assert len(lengths) > 1, "the fixture should give hypotheses of different lengths"


def test_deterministic_and_batched_equals_one_at_a_time(decoder):
    latents = torch.randn(5, decoder.config.latent_dim, generator=torch.Generator().manual_seed(2))
    cfg = BeamSearchConfig(num_beams=4, max_new_tokens=14)
    batched = beam_search(decoder, latents, cfg)
    assert batched == beam_search(decoder, latents, cfg)
    assert batched == [beam_search(decoder, latents[i : i + 1], cfg)[0] for i in range(5)]


def test_ban_repeated_ngrams():
    log_probs = torch.zeros(2, 10)
    tokens = torch.tensor([[1, 2, 3, 1, 2], [4, 5, 6, 7, 8]])
    banned = ban_repeated_ngrams(log_probs, tokens, 3)
    # row 0 ends in (1, 2), which was followed by 3: 3 is banned, nothing else
    assert torch.isinf(banned[0]).nonzero().flatten().tolist() == [3]
    assert not torch.isinf(banned[1]).any()
    assert torch.equal(ban_repeated_ngrams(log_probs, tokens[:, :2], 3), log_probs)
    assert torch.isinf(ban_repeated_ngrams(log_probs, tokens, 1)[1, 4:9]).all()


def test_no_repeated_trigrams_in_output(decoder):
    latents = torch.randn(4, decoder.config.latent_dim, generator=torch.Generator().manual_seed(3))
    for ids in beam_search(decoder, latents, BeamSearchConfig(max_new_tokens=24)):
        trigrams = [tuple(ids[i : i + 3]) for i in range(len(ids) - 2)]
        assert len(trigrams) == len(set(trigrams))


def test_config_checks():
    with pytest.raises(ValueError, match="num_beams"):
        BeamSearchConfig(num_beams=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        BeamSearchConfig(max_new_tokens=0)


def test_beam_fields_name_every_field_of_beams():
    from dataclasses import fields

    from ldlm.sampling.beam_search import BEAM_FIELDS, Beams

    assert tuple(f.name for f in fields(Beams)) == BEAM_FIELDS  # the static search's compiled loop reads these names

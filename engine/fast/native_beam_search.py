"""The reference beam search (ldlm.sampling.beam_search) with its per-token bookkeeping in one C call
(ldlm.kernels.native.BeamUpdate): the same algorithm, arithmetic and tokens, for decoders that run on the CPU
outside torch (the onnx and aoti backends' graphs), where the torch bookkeeping around each decoder step costs
as much as the step itself."""

from __future__ import annotations

import torch

from ldlm.sampling.beam_search import BeamSearchConfig, best_hypotheses


@torch.no_grad()
def native_beam_search(decoder, latents: torch.Tensor, config: BeamSearchConfig) -> list[list[int]]:
    """latents (B, *latent_shape) -> for each item, the best hypothesis' token ids (EOS removed).

    decoder: prefill(latents, repeats) -> (logits (R, V), cache), each item's prefix run once and copied to its
    `repeats` rows, and step(input_ids (R, 1), cache) -> (logits, cache), as ldlm.sampling.beam_search's; the cache
    reorders by cache.reorder_cache(rows)."""
    from ldlm.kernels.native import BeamUpdate

    B, K, T = latents.shape[0], config.num_beams, config.max_new_tokens
    # every beam starts from its item's prefix, run once per item (at batch 1 the prefill of K identical rows
    # cost a sixth of the decode)
    logits, cache = decoder.prefill(latents, repeats=K)
    update = BeamUpdate(B, K, T, logits.shape[-1], eos=decoder.eos_token_id, pad=decoder.pad_token_id,
                        no_repeat_ngram_size=config.no_repeat_ngram_size, length_penalty=config.length_penalty,
                        early_stopping=config.early_stopping)
    inputs = update.next_tokens.view(B * K, 1)  # the kernel writes each row's chosen token here
    for cur in range(T):
        if cur > 0:
            logits, cache = decoder.step(inputs, cache)
        stop = update(logits, cur)
        cache.reorder_cache(update.source_rows)
        if stop:
            break
    return best_hypotheses(update.finished, decoder.eos_token_id)

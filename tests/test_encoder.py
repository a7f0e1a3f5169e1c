"""The encoder: masked mean pooling that does not depend on padding or batch, and input checks."""

from __future__ import annotations

import pytest
import torch

from ldlm.model.encoder import build_tiny_encoder, masked_mean


@pytest.fixture(scope="module")
def encoder():
    return build_tiny_encoder(32)


def test_masked_mean_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert masked_mean(hidden, mask).tolist() == [[2.0, 3.0]]


def test_latent_is_independent_of_batch_and_padding(encoder):
    texts = ["hi", "a much longer sentence that forces a lot of padding on the short ones.", "mid length text"]
    batched = encoder.encode(texts)
    for i, text in enumerate(texts):
        alone = encoder.encode([text])
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=0, atol=1e-5)
    # order of the batch does not matter either, and results come back in input order
    reversed_batch = encoder.encode(texts[::-1])
    torch.testing.assert_close(reversed_batch.flip(0), batched, rtol=0, atol=1e-5)
    # the padded batch really pads: the short text is much shorter than the longest
    lengths = [len(ids) for ids in encoder.tokenizer(texts)["input_ids"]]
    assert max(lengths) > 3 * min(lengths)


def test_small_batches_give_the_same_latents(encoder):
    texts = [f"sentence number {i} with {'words ' * (i % 5)}" for i in range(10)]
    torch.testing.assert_close(encoder.encode(texts, batch_size=3), encoder.encode(texts, batch_size=64),
                               rtol=0, atol=1e-5)


def test_overlong_text_is_truncated_with_a_warning_naming_it(encoder):
    long_text = "word " * 500
    with pytest.warns(UserWarning, match=r"text 1 has \d+ encoder tokens.*truncated"):
        latents = encoder.encode(["short one", long_text])
    assert latents.shape == (2, 32) and torch.isfinite(latents).all()


def test_empty_string_is_refused_naming_the_item(encoder):
    with pytest.raises(ValueError, match="text 2 is empty"):
        encoder.encode(["a", "b", "   "])


def test_single_string_is_refused(encoder):
    with pytest.raises(TypeError, match=r"wrap it as \[text\]"):
        encoder.encode("not a list")


def test_empty_list_gives_empty_latents(encoder):
    assert encoder.encode([]).shape == (0, 32)


def test_build_tiny_encoder_leaves_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    build_tiny_encoder(16)
    assert torch.equal(torch.rand(3), expected)


def test_threads_encoding_at_once_tokenize_one_at_a_time(encoder, monkeypatch):
    """A fast tokenizer's padding and truncation settings are state each call sets, so threads sharing an encoder
    (and a pipeline) tokenizing at once can run with each other's settings (six threads of 15 encodes: 2 of 90
    wrong or raising). Tokenizer calls take turns: none overlaps another, however slow."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    texts = ["the cat sat on the mat " * k for k in (1, 2, 3, 5, 8, 13)]
    expected = [encoder.encode(texts[i:]) for i in range(6)]
    tokenizer, inside, most = encoder.tokenizer, [0], [0]
    count = threading.Lock()

    class Slow:  # the encoder's tokenizer, slowed and watched: how many calls are inside it at once
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, *args, **kwargs):
            with count:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.002)
            try:
                return tokenizer(*args, **kwargs)
            finally:
                with count:
                    inside[0] -= 1

    monkeypatch.setattr(encoder, "tokenizer", Slow())
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda i: [encoder.encode(texts[i:]) for _ in range(3)], range(6)))
    assert most[0] == 1
    for i, runs in enumerate(results):
        for latents in runs:
            torch.testing.assert_close(latents, expected[i], rtol=1e-6, atol=1e-6)

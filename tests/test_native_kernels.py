"""ldlm's C kernels for the CPU (ldlm.kernels.native): the beam search's bookkeeping gives the reference beam
search's tokens on every setting, the row gather is index_select, bad input and a missing compiler are said."""

from __future__ import annotations

import pytest
import torch

from ldlm.fast.native_beam_search import native_beam_search
from ldlm.kernels import native
from ldlm.runtimes.onnx_parts import native_decode
from ldlm.runtimes.onnx_session import OnnxOptions
from ldlm.sampling.beam_search import BeamSearchConfig, beam_search

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def decoder(varied_decoder):
    return varied_decoder


@pytest.mark.parametrize("num_beams, max_new_tokens", [(4, 16), (1, 12), (2, 9), (5, 24)])
@pytest.mark.parametrize("no_repeat_ngram_size", [0, 1, 2, 3])
def test_native_search_gives_the_reference_tokens(decoder, num_beams, max_new_tokens, no_repeat_ngram_size):
    latents = torch.randn(6, decoder.config.latent_dim, generator=torch.Generator().manual_seed(num_beams))
    lengths = set()
    for early_stopping in (True, False):
        for length_penalty in (1.0, 0.7):
            cfg = BeamSearchConfig(num_beams=num_beams, max_new_tokens=max_new_tokens, early_stopping=early_stopping,
                                   no_repeat_ngram_size=no_repeat_ngram_size, length_penalty=length_penalty)
            expected = beam_search(decoder, latents, cfg)
            assert native_beam_search(decoder, latents, cfg) == expected
            lengths |= {len(x) for x in expected}
    assert len(lengths) > 1, "the fixture should give hypotheses of different lengths"


def test_native_search_one_at_a_time_equals_batched(decoder):
    latents = torch.randn(5, decoder.config.latent_dim, generator=torch.Generator().manual_seed(7))
    cfg = BeamSearchConfig(num_beams=3, max_new_tokens=14)
    batched = native_beam_search(decoder, latents, cfg)
    assert batched == [native_beam_search(decoder, latents[i : i + 1], cfg)[0] for i in range(5)]


def test_beam_update_names_the_token_and_item_of_non_finite_logits():
    update = native.BeamUpdate(2, 3, 8, 50, eos=0, pad=0, no_repeat_ngram_size=3)
    logits = torch.randn(6, 50)
    assert update(logits, 0) is False
    before = update.running.clone()
    logits[4, 7] = float("nan")
    with pytest.raises(FloatingPointError, match="token 1 of item 1 .beam 1."):
        update(logits, 1)
    assert torch.equal(update.running, before)  # nothing updated
    logits[4, 7] = float("inf")
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        update(logits, 1)
    with pytest.raises(ValueError, match=r"logits must be \(6, 50\)"):
        update(torch.randn(5, 50), 1)
    with pytest.raises(ValueError, match="1 to 32 beams"):
        native.BeamUpdate(1, 33, 8, 50, eos=0, pad=0, no_repeat_ngram_size=3)


@pytest.mark.parametrize("kind", ["duplicates", "permutation", "some kept", "identity"])
def test_row_gather_is_index_select(kind):
    gather, generator = native.RowGather(), torch.Generator().manual_seed(0)
    for trial in range(200):
        R = 1 + trial % 11
        rows = {"duplicates": lambda: torch.randint(0, R, (R,), generator=generator),
                "permutation": lambda: torch.randperm(R, generator=generator),  # cycles: through the spare row
                "some kept": lambda: torch.where(torch.rand(R, generator=generator) < 0.5, torch.arange(R),
                                                 torch.randint(0, R, (R,), generator=generator)),
                "identity": lambda: torch.arange(R)}[kind]()
        tensors = [torch.randn(R, 3, 5, generator=generator), torch.randint(0, 9, (R, 7), generator=generator),
                   torch.randn(R, 1, generator=generator).half()]
        expected = [t.index_select(0, rows) for t in tensors]
        gather(tensors, rows)
        assert all(torch.equal(t, e) for t, e in zip(tensors, expected)), rows.tolist()


def test_row_gather_of_large_tensors_splits_across_threads():
    gather, generator = native.RowGather(), torch.Generator().manual_seed(1)
    R = 64
    tensors = [torch.randn(R, 4, 64, 80, generator=generator) for _ in range(3)]  # 5 MB each: two threads
    for rows in (torch.randint(0, R, (R,), generator=generator), torch.randperm(R, generator=generator)):
        expected = [t.index_select(0, rows) for t in tensors]
        gather(tensors, rows)
        assert all(torch.equal(t, e) for t, e in zip(tensors, expected))


def test_row_gather_refuses_bad_rows_and_tensors():
    gather, t = native.RowGather(), torch.arange(12.0).view(4, 3)
    with pytest.raises(IndexError, match=r"rows must lie in \[0, 4\)"):
        gather([t], torch.tensor([0, 1, 4, 2]))
    assert torch.equal(t, torch.arange(12.0).view(4, 3))  # nothing copied
    with pytest.raises(ValueError, match="tensor 0, .3, 4. on cpu, is not"):
        gather([t.t()], torch.arange(3))
    with pytest.raises(ValueError, match="same rows"):
        gather([t, t[:3]], torch.arange(4))


def test_library_is_built_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LDLM_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_failure", None)
    native.library()
    built = list((tmp_path / "native").glob("beam_update-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_library", None)
    native.library()  # another process: loads the cached file
    assert list((tmp_path / "native").glob("beam_update-*.so")) == built and built[0].stat().st_mtime_ns == stamp


def test_without_a_compiler_the_search_keeps_its_torch_path(tmp_path, monkeypatch):
    monkeypatch.setenv("LDLM_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_failure", None)
    reason = native.unavailable_reason()
    assert reason is not None and "no-such-cc" in reason
    native_on, why = native_decode(OnnxOptions(), CPU)
    assert not native_on and "beam bookkeeping in torch" in why and "no-such-cc" in why
    assert native_decode(OnnxOptions(native_beam_update=False), CPU)[1].endswith("(native_beam_update off)")


def test_bound_row_gather_reorders_the_same_tensors_each_call():
    gather, generator = native.RowGather(), torch.Generator().manual_seed(2)
    tensors = [torch.randn(6, 4, 9, generator=generator), torch.randint(0, 9, (6, 5), generator=generator)]
    bound = gather.bind(tensors)
    for _ in range(20):  # as a beam search reorders its cache each token
        rows = torch.randint(0, 6, (6,), generator=generator)
        expected = [t.index_select(0, rows) for t in tensors]
        bound(rows)
        assert all(torch.equal(t, e) for t, e in zip(tensors, expected)), rows.tolist()
    with pytest.raises(ValueError, match=r"rows must be \(6,\)"):
        bound(torch.arange(5))

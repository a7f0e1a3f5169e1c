"""Candidate reranking (ldlm.evaluation.rerank): MBR and slot coverage on hand-made candidates, and
`generate_from(..., candidates=k)` against the plain calls that draw each candidate."""

from __future__ import annotations

import pytest

from ldlm.evaluation.rerank import (MAX_CANDIDATES, candidate_seed, candidate_seeds, check_reranking, choose,
                                    mbr_scores, sentence_bleu)

from .test_conditional import text_checkpoint  # noqa: F401 (a fixture)

MR = "name : The Eagle | Type : pub | food : Chinese | area : riverside"


def test_sentence_bleu_bounds_and_mbr_keeps_the_consensus():
    words = "the eagle is a pub by the river".split()
    assert sentence_bleu(words, words) == pytest.approx(1.0)
    assert sentence_bleu(words, "nothing in common here".split()) == 0.0
    assert 0 < sentence_bleu(words[:5], words) < sentence_bleu(words[:7], words) < 1  # shorter: brevity penalty
    texts = ["A pub in town.", "The Eagle is a pub by the river.", "The Eagle is a pub near the river.",
             "The Eagle is a Chinese pub by the river."]
    scores = mbr_scores(texts)
    assert scores.index(min(scores)) == 0 and choose(texts, "mbr") in (1, 3)
    assert choose(["Same text.", "Same text.", "Same text."], "mbr") == 0  # ties keep the first


def test_slot_reranking_keeps_the_fewest_errors_then_agreement():
    texts = ["The Eagle is a pub.", "The Eagle is a Chinese pub by the river.", "The Eagle is a pub by the river."]
    assert choose(texts, "slots", MR) == 1
    texts = ["The Eagle is a Chinese pub by the river.", "The Eagle is a riverside pub serving Chinese food.",
             "The Eagle is a Chinese pub by the river, near the bridge."]
    assert choose(texts, "slots", MR) in (0, 2)  # all faithful: MBR decides, and the odd one out loses


def test_bad_reranking_arguments_name_the_fix():
    with pytest.raises(ValueError, match=f"from 1 to {MAX_CANDIDATES}"):
        check_reranking(MAX_CANDIDATES + 1, "mbr", None)
    with pytest.raises(ValueError, match="from 1 to"):
        check_reranking(0, "mbr", None)
    with pytest.raises(ValueError, match="unknown rerank 'bleu'"):
        check_reranking(2, "bleu", None)
    with pytest.raises(ValueError, match="needs sources"):
        check_reranking(2, "slots", None)
    with pytest.raises(ValueError, match=r"sources\[1\] is not an E2E meaning representation"):
        check_reranking(2, "slots", [MR, "a story about a cat"])
    with pytest.raises(ValueError, match=r"seeds has 1 entries for 2 items"):
        candidate_seeds(2, 3, 0, [5])


def test_candidate_seeds_start_from_the_items_own():
    seeds = candidate_seeds(2, 3, 0, [11, 12])
    assert seeds[0] == 11 and seeds[3] == 12 and len(set(seeds)) == 6
    assert candidate_seeds(2, 2, 7, None) == [7, candidate_seed(7, 1), 8, candidate_seed(8, 1)]


@pytest.fixture(scope="module")
def text_pipeline(text_checkpoint):  # noqa: F811
    import ldlm

    return ldlm.load(text_checkpoint)


@pytest.fixture(scope="module")
def onnx_text_pipeline(text_checkpoint, tmp_path_factory):  # noqa: F811
    import ldlm
    from ldlm.export.onnx_export import export_checkpoint

    out = export_checkpoint(text_checkpoint, tmp_path_factory.mktemp("rerank") / "onnx", variants=("float32",),
                            int8=False, log=lambda *_: None)
    return ldlm.load(out)


@pytest.mark.parametrize("backend, rerank", [("reference", "mbr"), ("reference", "slots"), ("onnx", "mbr")])
def test_generate_from_keeps_one_of_the_candidates_the_plain_calls_draw(request, backend, rerank):
    pipe = request.getfixturevalue("text_pipeline" if backend == "reference" else "onnx_text_pipeline")
    assert pipe.backend == backend
    sources = [MR, "name : Aromi | food : Italian | area : city centre"]
    settings = {"guidance": 2.0, "sampler": "ddim", "steps": 5, "progress": False}
    plain = pipe.generate_from(sources, seeds=[3, 4], **settings)
    assert pipe.generate_from(sources, seeds=[3, 4], candidates=1, rerank=rerank, **settings) == plain
    k = 4
    chosen = pipe.generate_from(sources, seeds=[3, 4], candidates=k, rerank=rerank, **settings)
    for i, source in enumerate(sources):
        drawn = pipe.generate_from([source] * k, seeds=[candidate_seed(3 + i, j) for j in range(k)], **settings)
        assert drawn[0] == plain[i]  # candidate 0 is the plain call's text
        assert chosen[i] == drawn[choose(drawn, rerank, source)]
    with pytest.raises(ValueError, match="not an E2E meaning representation"):
        pipe.generate_from(["about a cat"], candidates=2, rerank="slots", **settings)


def test_a_batch_job_reranks_its_conditional_lines_and_a_line_slots_cannot_read_fails_alone(text_checkpoint,
                                                                                            text_pipeline, tmp_path):
    import json

    from ldlm.jobs.batch import run_job
    from ldlm.jobs.items import read_items

    from .test_jobs import read_jsonl, settings_for

    lines = [{"id": 1, "source": MR, "seed": 4}, {"id": 2, "source": "about a cat", "seed": 5},
             {"id": 3, "source": "name : Aromi | food : Italian", "seed": 6, "guidance": 3}, {"id": 4, "seed": 7}]
    out = tmp_path / "out.jsonl"
    settings = settings_for(text_checkpoint, candidates=3, rerank="slots", guidance=2.0)
    counts = run_job(text_pipeline, read_items([json.dumps(r).encode() for r in lines], 0), out, settings,
                     batch_size=4, progress=False)
    assert counts == {"written": 3, "errors": 1, "skipped": 0}
    records = {r["id"]: r for r in read_jsonl(out)}
    assert "its source is not an E2E meaning representation" in records[2]["error"]
    common = {"sampler": "ddim", "steps": 5, "candidates": 3, "rerank": "slots", "progress": False}
    assert records[1]["text"] == text_pipeline.generate_from([MR], seeds=[4], guidance=2.0, **common)[0]
    assert records[3]["text"] == text_pipeline.generate_from([lines[2]["source"]], seeds=[6], guidance=3, **common)[0]
    alone = text_pipeline.sample_latents(1, seeds=[7], sampler="ddim", steps=5, progress=False)
    assert records[4]["text"] == text_pipeline.decode(alone, progress=False)[0]  # unconditional lines as before
    assert records[1]["settings"]["candidates"] == 3 and records[1]["settings"]["rerank"] == "slots"
    with pytest.raises(ValueError, match="candidates must be a whole number from 1 to 64"):
        run_job(text_pipeline, [], tmp_path / "other.jsonl", settings_for(text_checkpoint, candidates=0),
                progress=False)


def test_job_settings_without_reranking_hash_as_before_it_existed():
    import hashlib
    import json
    from dataclasses import asdict

    from ldlm.jobs.settings import JobSettings

    settings = JobSettings(model="m", guidance=2.0)
    before = {k: v for k, v in asdict(settings).items() if k not in ("candidates", "rerank", "temperature")}
    assert settings.hash() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    assert JobSettings(model="m", guidance=2.0, candidates=2).hash() != settings.hash()


def test_the_cli_reranks_source_texts(text_checkpoint, text_pipeline, capsys):
    from ldlm.cli import main

    args = ["generate", str(text_checkpoint), "--source", MR, "--source", "name : Cotto | area : riverside",
            "--sampler", "ddim", "--steps", "5", "--guidance", "2", "--seed", "9", "--no-progress"]
    assert main([*args, "--candidates", "3", "--rerank", "slots"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == text_pipeline.generate_from([MR, "name : Cotto | area : riverside"], seeds=[9, 10], guidance=2.0,
                                                  sampler="ddim", steps=5, candidates=3, rerank="slots",
                                                  progress=False)
    assert main(["generate", str(text_checkpoint), "--candidates", "3", "--no-progress"]) == 2
    assert "--candidates reranks the texts of each source or label" in capsys.readouterr().err


def test_the_baseline_language_model_reranks_its_samples_as_ldlm_does(tmp_path):
    import json

    import torch

    from ldlm.cli import main
    from ldlm.training.baseline import _load_language_model, _prompts, generate_from_language_model

    from .conftest import TINY_TEXTS

    data, out = tmp_path / "data.jsonl", tmp_path / "lm"
    data.write_text("".join(json.dumps({"text": t, "mr": MR}) + "\n" for t in TINY_TEXTS))
    assert main(["baseline", "train", "--data", str(data), "--out", str(out), "--preset", "tiny", "--source-field",
                 "mr", "--time-budget", "0", "--steps", "3", "--no-progress"]) == 0
    sources = [MR, "name : Cotto | area : riverside"]
    settings = {"top_p": 0.95, "seed": 3, "max_new_tokens": 6}
    assert generate_from_language_model(out, sources, candidates=1, **settings) == \
        generate_from_language_model(out, sources, **settings)
    chosen = generate_from_language_model(out, sources, candidates=4, rerank="slots", **settings)
    model, tokenizer, _ = _load_language_model(out)
    torch.manual_seed(3)  # the same draws: four samples per source, in order
    for source, prompt, text in zip(sources, _prompts(tokenizer, sources), chosen):
        rows = model.generate(input_ids=torch.tensor([prompt]),
                              attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=6, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.eos_token_id, do_sample=True, top_p=0.95, top_k=0,
                              num_return_sequences=4)
        drawn = [" ".join(tokenizer.decode(row[len(prompt):], skip_special_tokens=True).split()) for row in rows]
        assert text == drawn[choose(drawn, "slots", source)]
    with pytest.raises(ValueError, match="not an E2E meaning representation"):
        generate_from_language_model(out, ["about a cat"], candidates=2, rerank="slots")

"""Conditional generation (issue 18): a source text or a class label, read by cross-attention or joint tokens,
condition dropout and classifier-free guidance, on the API, the CLI and batch jobs; old checkpoints still load."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import ldlm
from ldlm.cli import main
from ldlm.jobs.batch import run_job
from ldlm.jobs.items import read_items
from ldlm.model.config import ModelConfig
from ldlm.model.reverse import Condition, ReverseTransformer
from ldlm.sampling.guidance import guided_denoiser
from ldlm.training.train import Trainer, train

from .conftest import TINY_TEXTS, tiny_train_config
from .test_jobs import read_jsonl, settings_for

LABELS = ["animal" if any(w in t for w in ("cat", "dog", "bird")) else "other" for t in TINY_TEXTS]
SOURCES = [f"about {t.split()[1]}" for t in TINY_TEXTS]  # "about cat", "about dog", ...


def train_conditional(out, condition: str, attention: str = "cross", **config) -> None:
    conditions = LABELS if condition == "label" else SOURCES
    cfg = ModelConfig.from_preset("tiny", condition=condition, condition_attention=attention, **config)
    train(TINY_TEXTS, out, cfg, tiny_train_config(decoder_steps=20, diffusion_steps=20), conditions=conditions,
          progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def label_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("label") / "model"
    train_conditional(out, "label")
    return out


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("text") / "model"
    train_conditional(out, "text")
    return out


def reverse_model(condition: str, attention: str) -> ReverseTransformer:
    torch.manual_seed(0)
    labels = ["a", "b", "c"] if condition == "label" else None
    config = ModelConfig.from_preset("tiny", condition=condition, condition_attention=attention, labels=labels)
    return ReverseTransformer(config).eval()


def some_condition(model: ReverseTransformer, batch: int, length: int = 5) -> Condition:
    if model.config.condition == "label":
        return model.embed_condition(torch.arange(batch) % 3)
    states = torch.randn(batch, length, model.config.latent_dim)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 3:] = 0  # unequal lengths: padding is masked
    return model.embed_condition(states, mask)


@pytest.mark.parametrize("condition, attention", [("text", "cross"), ("text", "joint"), ("label", "cross"),
                                                  ("label", "joint")])
def test_the_reverse_transformer_reads_its_condition(condition, attention):
    model = reverse_model(condition, attention)
    x, t = torch.randn(3, 32), torch.tensor([10.0, 500.0, 900.0])
    cond = some_condition(model, 3)
    with torch.no_grad():
        out = model(x, t, condition=cond)
        assert (out - model(x, t)).abs().max() > 1e-4  # the null condition gives another prediction
        torch.testing.assert_close(model(x, t, condition=cond.padded(9)), out, rtol=0, atol=1e-6)  # masked padding
        torch.testing.assert_close(model(x[1:], t[1:], condition=cond.rows(slice(1, None))), out[1:], rtol=0,
                                   atol=1e-6)  # rows are independent
        dropped = model.drop(cond, torch.tensor([True, False, True]))
        torch.testing.assert_close(model(x, t, condition=dropped)[0], model(x[:1], t[:1])[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(model(x, t, condition=dropped)[1], out[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("condition", ["text", "label"])
@pytest.mark.parametrize("latent_tokens", [1, 2])
def test_a_projected_condition_predicts_as_its_tokens(condition, latent_tokens):
    torch.manual_seed(0)
    labels = ["a", "b", "c"] if condition == "label" else None
    config = ModelConfig.from_preset("tiny", condition=condition, labels=labels, latent_tokens=latent_tokens)
    model = ReverseTransformer(config).eval()
    x, t = torch.randn(3, *config.latent_shape), torch.tensor([10.0, 500.0, 900.0])
    cond = some_condition(model, 3)
    with torch.no_grad():
        read = model.project_condition(cond)
        assert read.projected and read.tokens.shape == (*cond.tokens.shape[:2], 2 * config.n_layers * config.d_model)
        assert model.project_condition(read) is read
        out = model(x, t, condition=cond)
        torch.testing.assert_close(model(x, t, condition=read), out, rtol=0, atol=1e-6)
        # batched as the serving loop batches rows: padded, concatenated with the projected null condition
        both = Condition.cat([read, model.project_condition(model.null(3))])
        assert both.projected
        torch.testing.assert_close(model(torch.cat([x, x]), torch.cat([t, t]), condition=both),
                                   torch.cat([out, model(x, t)]), rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match="projected and unprojected"):
            Condition.cat([read, model.null(3)])


def test_a_joint_model_takes_no_projected_condition():
    model = reverse_model("text", "joint")
    with pytest.raises(ValueError, match="only a model that reads its condition by cross-attention"):
        model.project_condition(some_condition(model, 2))
    cross = reverse_model("text", "cross")
    read = cross.project_condition(some_condition(cross, 2))
    with torch.no_grad(), pytest.raises(ValueError, match="a joint-attention model reads its condition's tokens"):
        model(torch.randn(2, 32), torch.tensor([1.0, 2.0]), condition=Condition(read.tokens[..., :64], read.mask,
                                                                                 True))


def test_a_sampling_run_projects_its_condition_once(monkeypatch):
    model = reverse_model("text", "cross")
    cond = some_condition(model, 2)
    projections = []
    real = model.project_condition
    monkeypatch.setattr(model, "project_condition", lambda c: projections.append(c.tokens.shape[0]) or real(c))
    kv_calls = []
    for block in model.blocks:
        block.cross.kv.register_forward_hook(lambda *_: kv_calls.append(1))
    denoise = guided_denoiser(model, cond, 2.0)
    x = torch.randn(2, 32)
    with torch.no_grad():
        for t in (900.0, 500.0, 10.0):
            denoise(x, torch.full((2,), t))
    assert projections == [2, 2]  # the condition's rows, then the null rows (one token each), once
    assert len(kv_calls) == 2 * len(model.blocks)  # each block's projections once, not at each of the three steps


@pytest.mark.parametrize("attention", ["cross", "joint"])
def test_guidance_is_one_batched_forward_of_both_branches(attention, monkeypatch):
    model = reverse_model("text", attention)
    x, t = torch.randn(4, 32), torch.full((4,), 300.0)
    cond = some_condition(model, 4)
    with torch.no_grad():
        x0_cond, x0_null = model(x, t, condition=cond), model(x, t)
        calls = []
        real = model.forward
        monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
        guided = guided_denoiser(model, cond, 3.0)(x, t)
        assert calls == [8]  # conditional and null rows together
        torch.testing.assert_close(guided, x0_null + 3.0 * (x0_cond - x0_null), rtol=1e-5, atol=1e-5)
        calls.clear()
        torch.testing.assert_close(guided_denoiser(model, cond, 1.0)(x, t), x0_cond, rtol=0, atol=1e-6)
        torch.testing.assert_close(guided_denoiser(model, cond, 0.0)(x, t), x0_null, rtol=0, atol=1e-6)
        assert calls == [4, 4]  # w = 1 and w = 0 need one branch each


def test_generate_from_follows_each_items_source_and_seed(text_checkpoint):
    pipe = ldlm.load(text_checkpoint)
    sources, seeds = ["about cat", "about rain", "about pizza"], [5, 6, 7]
    for sampler, steps in (("ddpm", None), ("ddim", 6), ("dpm++2m", 6)):
        kwargs = {"sampler": sampler, "steps": steps, "guidance": 2.0, "progress": False}
        together = pipe.sample_latents(3, sources=sources, seeds=seeds, **kwargs)
        alone = torch.cat([pipe.sample_latents(1, sources=[s], seeds=[seed], **kwargs)
                           for s, seed in zip(sources, seeds)])
        torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
        other = pipe.sample_latents(3, sources=["about dog"] * 3, seeds=seeds, **kwargs)
        assert (other - together).abs().max() > 1e-4
    texts = pipe.generate_from(sources, seeds=seeds, sampler="ddim", steps=6, progress=False)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    varied = pipe.vary(TINY_TEXTS[:2], 0.5, sampler="ddim", steps=4, sources=sources[:2], progress=False)
    assert len(varied) == 2


def test_label_models_and_unconditional_sampling_of_a_conditional_model(label_checkpoint):
    pipe = ldlm.load(label_checkpoint)
    assert pipe.config.labels == ["animal", "other"]
    a = pipe.sample_latents(2, labels=["animal", "other"], sampler="ddim", steps=5, seed=1, progress=False)
    b = pipe.sample_latents(2, labels=["other", "animal"], sampler="ddim", steps=5, seed=1, progress=False)
    assert (a - b).abs().max() > 1e-4
    null = pipe.sample_latents(2, sampler="ddim", steps=5, seed=1, progress=False)  # the null condition
    torch.testing.assert_close(pipe.sample_latents(2, labels=["animal", "other"], guidance=0.0, sampler="ddim",
                                                   steps=5, seed=1, progress=False), null, rtol=0, atol=1e-6)
    assert len(pipe.generate(2, sampler="ddim", steps=5, progress=False)) == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"labels": ["plant"]}, "label 0 is 'plant', not one of this model's labels"),
    ({"sources": ["about cat"]}, "conditioned on a label: pass labels"),
    ({"labels": ["animal"], "guidance": -1.0}, "guidance must be a number from 0 to 100"),
    ({"labels": ["animal"], "guidance": float("nan")}, "guidance must be a number from 0 to 100"),
    ({"labels": ["animal"], "guidance": True}, "guidance must be a number from 0 to 100"),
    ({"labels": ["animal"], "guidance": 2**70}, "guidance must be a number from 0 to 100"),  # was OverflowError
    ({"labels": ["animal"], "guidance": 1e30}, "guidance must be a number from 0 to 100"),  # was a NaN at step 1
    ({"labels": ["animal"], "num_beams": 1000}, "num_beams must be a whole number from 1 to 32"),
    ({}, "pass sources=\\[...\\]"),
])
def test_bad_conditional_calls_name_the_item_and_the_fix(label_checkpoint, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ldlm.load(label_checkpoint).generate_from(progress=False, **kwargs)


def test_conditional_calls_on_other_models_are_refused(text_checkpoint, tiny_pipeline):
    with pytest.raises(ValueError, match="this checkpoint is unconditional"):
        tiny_pipeline.generate_from(["about cat"], progress=False)
    pipe = ldlm.load(text_checkpoint)
    with pytest.raises(ValueError, match="text 1 is empty"):
        pipe.generate_from(["about cat", "  "], progress=False)
    with pytest.raises(ValueError, match="conditioned on a source text: pass sources"):
        pipe.generate_from(labels=["animal"], progress=False)


def test_the_checkpoint_records_its_condition_and_old_ones_still_load(label_checkpoint, tiny_checkpoint, tmp_path):
    model = json.loads((label_checkpoint / "config.json").read_text())["model"]
    assert model["condition"] == "label" and model["labels"] == ["animal", "other"]
    old = tmp_path / "old"
    shutil.copytree(tiny_checkpoint, old)
    meta = json.loads((old / "config.json").read_text())
    for key in ("condition", "condition_attention", "labels", "guidance"):  # as written before issue 18
        meta["model"].pop(key)
    (old / "config.json").write_text(json.dumps(meta))
    pipe = ldlm.load(old)
    assert pipe.config.condition is None
    torch.testing.assert_close(pipe.sample_latents(2, sampler="ddim", steps=4, progress=False),
                               ldlm.load(tiny_checkpoint).sample_latents(2, sampler="ddim", steps=4, progress=False))


def test_holding_out_by_source_validates_on_sources_never_trained_on(tmp_path):
    cfg = ModelConfig.from_preset("tiny", condition="text")
    config = tiny_train_config(decoder_steps=2, diffusion_steps=2, holdout_fraction=0.2, holdout_by="source")
    out = tmp_path / "m"
    trainer = Trainer(TINY_TEXTS, out, cfg, config, conditions=SOURCES, progress=False, log=lambda *_: None)
    source_of = dict(zip(TINY_TEXTS, SOURCES))
    held = {source_of[t] for t in trainer.val_texts}
    assert held and not held & {source_of[t] for t in trainer.train_texts}
    assert len(trainer.train_texts) + len(trainer.val_texts) == len(TINY_TEXTS)
    distinct = sorted(set(SOURCES))  # the val examples' conditions are their own texts' sources
    assert {distinct[i] for i in trainer.conditions.ids["val"].tolist()} == held
    trainer.run()
    with pytest.raises(ValueError, match="held out by source: resume with --holdout-by source"):
        Trainer(TINY_TEXTS, out, cfg, tiny_train_config(decoder_steps=2, diffusion_steps=2, holdout_fraction=0.2),
                conditions=SOURCES, resume=True, progress=False, log=lambda *_: None)
    labels = ModelConfig.from_preset("tiny", condition="label")
    with pytest.raises(ValueError, match="needs a model conditioned on text"):
        Trainer(TINY_TEXTS, tmp_path / "l", labels, config, conditions=LABELS, progress=False, log=lambda *_: None)


def test_cli_trains_and_generates_from_labels_and_sources(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t, "topic": lab, "src": s}) + "\n"
                            for t, lab, s in zip(TINY_TEXTS, LABELS, SOURCES)))
    out = tmp_path / "m"
    args = ["train", "--data", str(data), "--out", str(out), "--preset", "tiny", "--time-budget", "0",
            "--decoder-steps", "4", "--diffusion-steps", "4", "--no-progress"]
    assert main([*args, "--label-field", "topic", "--guidance", "2"]) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "--label", "animal", "--label", "other", "-n", "2", "--sampler", "ddim",
                 "--steps", "3", "--json", "--no-progress"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in records] == ["animal", "animal", "other", "other"]
    assert all(r["guidance"] == 2.0 for r in records)
    assert main(["generate", str(out), "--label", "plant", "--no-progress"]) == 2
    assert "not one of this model's labels ['animal', 'other']" in capsys.readouterr().err
    assert main(["generate", str(out), "--source", "about cat", "--no-progress"]) == 2
    assert "conditioned on a label: pass --label NAME (one of ['animal', 'other']), not --source" in \
        capsys.readouterr().err  # the command line's words, not the API's (issue 37)
    text_model = tmp_path / "t"
    assert main([*args[:4], str(text_model), *args[5:], "--source-field", "src", "--condition-attention",
                 "joint", "--holdout-by", "source"]) == 0
    assert json.loads((text_model / "config.json").read_text())["model"]["condition_attention"] == "joint"
    assert json.loads((text_model / "training" / "state.json").read_text())["train_config"]["holdout_by"] == "source"
    capsys.readouterr()
    sources = tmp_path / "sources.txt"
    sources.write_text("about cat\nabout rain\n")
    assert main(["generate", str(text_model), "--source-file", str(sources), "--sampler", "ddim", "--steps", "3",
                 "--guidance", "1.5", "--json", "--no-progress"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["source"] for r in records] == ["about cat", "about rain"] and records[0]["guidance"] == 1.5
    assert main([*args[:4], str(tmp_path / "x"), *args[5:], "--guidance", "2"]) == 2  # without a condition field
    assert "add --source-field or --label-field" in capsys.readouterr().err


def test_jobs_generate_from_sources_with_per_line_guidance(text_checkpoint, tmp_path):
    pipe = ldlm.load(text_checkpoint)
    lines = [{"id": 1, "source": "about cat", "seed": 4}, {"id": 2, "source": "about rain", "guidance": 3},
             {"id": 3, "label": "animal"}, {"id": 4, "source": "x", "text": "the cat."}, {"id": 5},
             {"id": 6, "source": "about cat", "seed": 4, "guidance": -2}]
    out = tmp_path / "out.jsonl"
    counts = run_job(pipe, read_items([json.dumps(r).encode() for r in lines], 0), out, settings_for(text_checkpoint),
                     batch_size=4, progress=False)
    assert counts == {"written": 3, "errors": 3, "skipped": 0}
    records = {r["id"]: r for r in read_jsonl(out)}
    assert records[1]["source"] == "about cat" and records[2]["guidance"] == 3 and records[5]["mode"] == "sample"
    assert "pass sources" in records[3]["error"] and "not both" in records[4]["error"]
    assert "guidance must be a number from 0 to 100" in records[6]["error"]
    alone = pipe.sample_latents(1, sources=["about cat"], seeds=[4], sampler="ddim", steps=5, progress=False)
    assert records[1]["text"] == pipe.decode(alone, progress=False)[0]


def test_bench_times_the_guided_loop_beside_the_unguided_one(label_checkpoint):
    from ldlm.jobs.benchmark import BenchSettings, bench_pipeline

    rows = bench_pipeline(ldlm.load(label_checkpoint), "reference",
                          BenchSettings(batch_sizes=(2,), sampler="ddim", steps=2, warmup=0, iters=1, max_new_tokens=2))
    stages = {r["stage"]: r for r in rows}
    assert {"loop", "loop_conditional", "loop_guided"} <= set(stages)
    assert all(stages[s]["median_s"] > 0 for s in ("loop", "loop_conditional", "loop_guided"))


def test_the_conditional_baseline_trains_on_source_and_text_and_decodes_from_sources(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t, "mr": s}) + "\n" for t, s in zip(TINY_TEXTS, SOURCES)))
    out = tmp_path / "lm"
    assert main(["baseline", "train", "--data", str(data), "--out", str(out), "--preset", "tiny", "--source-field",
                 "mr", "--time-budget", "0", "--steps", "3", "--no-progress"]) == 0
    assert json.loads((out / "config.json").read_text())["conditional"]["separator"] == "<|sep|>"
    sources = tmp_path / "sources.txt"
    sources.write_text("about cat\nabout rain\nabout cat\n")
    capsys.readouterr()
    assert main(["baseline", "sample", str(out), "--source-file", str(sources), "--max-new-tokens", "5"]) == 0
    beams = capsys.readouterr().out.splitlines()
    assert len(beams) == 3 and beams[0] == beams[2]  # beam search: one text per source, deterministic
    assert main(["baseline", "sample", str(out), "-n", "2"]) == 2  # a conditional model samples from sources only
    assert "generate from sources" in capsys.readouterr().err

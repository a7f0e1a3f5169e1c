"""A conditional model exported to ONNX (issue 18): the reverse graph takes the condition's tokens and mask, a
condition graph embeds sources' token states (which the encoder graph also returns) or labels, the manifest
holds the null condition; the onnx backend then generates from sources and labels as the reference does
(fp32 latents within 1e-5, identical text), guided or not."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnxruntime", reason="the onnx extra is part of the test extra")  # installed by .ci/run

import ldlm
from ldlm.export.manifest import ExportError
from ldlm.export.onnx_export import export_checkpoint

from .test_conditional import label_checkpoint, text_checkpoint  # noqa: F401 (fixtures)
from .test_onnx import rel_err
from .test_serving import assert_lone_results, captured_latents, staggered  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def text_export(text_checkpoint, tmp_path_factory):  # noqa: F811
    return export_checkpoint(text_checkpoint, tmp_path_factory.mktemp("text") / "onnx", variants=("float32",),
                             int8=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def older_text_export(text_checkpoint, tmp_path_factory):  # noqa: F811
    """The text model exported as ldlm wrote it before the condition_kv graph: its reverse graph reads the
    condition's tokens and projects them at every step."""
    from ldlm.export import graphs, onnx_export

    with pytest.MonkeyPatch.context() as patch:
        for module in (graphs, onnx_export):
            patch.setattr(module, "reads_projection", lambda reverse: False)
        return export_checkpoint(text_checkpoint, tmp_path_factory.mktemp("older") / "onnx", variants=("float32",),
                                 int8=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def label_export(label_checkpoint, tmp_path_factory):  # noqa: F811
    return export_checkpoint(label_checkpoint, tmp_path_factory.mktemp("label") / "onnx",
                             log=lambda *_: None)  # every variant: fp32, fp16, int8 reverse


def test_the_export_holds_the_condition_graph_and_the_null_condition(text_export):
    manifest = json.loads((text_export / "manifest.json").read_text())
    graphs = manifest["graphs"]["float32"]
    assert set(graphs) == {"encoder", "reverse", "decoder_prefill", "decoder_step", "condition", "condition_kv"}
    assert [o["name"] for o in graphs["encoder"]["outputs"]] == ["latent", "token_states"]
    # a cross-attention model's reverse graph reads each block's keys and values, projected once a run
    assert [i["name"] for i in graphs["reverse"]["inputs"]] == ["x_t", "t", "condition_kv", "condition_mask"]
    assert [i["name"] for i in graphs["condition_kv"]["inputs"]] == ["condition_tokens"]
    assert len(manifest["null_condition"]) == 1 and len(manifest["null_condition"][0]) == manifest["model"]["d_model"]


@pytest.mark.parametrize("guidance", [0.0, 1.0, 2.5])
@pytest.mark.parametrize(("sampler", "steps"), [("ddim", 6), ("dpm++2m", 5)])
def test_onnx_generates_from_sources_as_the_reference(text_checkpoint, text_export, sampler, steps,  # noqa: F811
                                                      guidance):
    reference, onnx = ldlm.load(text_checkpoint), ldlm.load(text_export)
    kwargs = {"sources": ["about cat", "about the sun and the rain"], "sampler": sampler, "steps": steps,
              "seed": 3, "guidance": guidance, "progress": False}
    expected, got = reference.sample_latents(2, **kwargs), onnx.sample_latents(2, **kwargs)
    assert rel_err(got, expected) < 1e-5
    assert onnx.generate_from(**kwargs) == reference.generate_from(**kwargs)


def test_onnx_generates_from_labels_and_varies_as_the_reference(label_checkpoint, label_export):  # noqa: F811
    reference, onnx = ldlm.load(label_checkpoint), ldlm.load(label_export)
    kwargs = {"labels": ["other", "animal", "other"], "sampler": "ddim", "steps": 5, "guidance": 3.0,
              "progress": False}
    assert rel_err(onnx.sample_latents(3, **kwargs), reference.sample_latents(3, **kwargs)) < 1e-5
    assert onnx.generate_from(**kwargs) == reference.generate_from(**kwargs)
    texts = ["the cat sat on the mat.", "a bird flew."]
    assert onnx.vary(texts, 0.5, labels=["other", "animal"], seed=1, progress=False) == \
        reference.vary(texts, 0.5, labels=["other", "animal"], seed=1, progress=False)
    with pytest.raises(ValueError, match="not one of this model's labels"):
        onnx.generate_from(labels=["plant"], progress=False)


def test_the_fp16_and_int8_graphs_of_a_conditional_model(label_checkpoint, label_export):  # noqa: F811
    from ldlm.runtimes.onnx_session import OnnxOptions

    kwargs = {"labels": ["other", "animal"], "sampler": "ddim", "steps": 5, "guidance": 2.0, "progress": False}
    expected = ldlm.load(label_checkpoint).sample_latents(2, **kwargs)
    assert rel_err(ldlm.load(label_export, dtype="float16").sample_latents(2, **kwargs), expected) < 2e-2
    int8 = ldlm.load(label_export, onnx_options=OnnxOptions(int8_reverse=True)).sample_latents(2, **kwargs)
    assert 0 < rel_err(int8, expected) < 0.1  # quantized: not equal, but near


def test_an_export_without_its_null_condition_is_refused(label_export, tmp_path):
    import shutil

    from ldlm.export.manifest import write_manifest

    broken = tmp_path / "broken"
    shutil.copytree(label_export, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    del manifest["null_condition"], manifest["files"]
    (broken / "manifest.json").unlink()
    write_manifest(broken, {k: v for k, v in manifest.items() if k not in ("format", "format_version")})
    with pytest.raises(ExportError, match="no condition graph or null condition"):
        ldlm.load(broken)


def test_an_older_export_projecting_in_its_graph_still_generates(text_checkpoint, older_text_export):  # noqa: F811
    manifest = json.loads((older_text_export / "manifest.json").read_text())
    assert "condition_kv" not in manifest["graphs"]["float32"]
    assert [i["name"] for i in manifest["graphs"]["float32"]["reverse"]["inputs"]][2] == "condition_tokens"
    reference, onnx = ldlm.load(text_checkpoint), ldlm.load(older_text_export)
    assert onnx.reverse.condition_kv_graph is None
    kwargs = {"sources": ["about cat", "about the sun and the rain"], "sampler": "dpm++2m", "steps": 4, "seed": 2,
              "guidance": 2.0, "progress": False}
    assert rel_err(onnx.sample_latents(2, **kwargs), reference.sample_latents(2, **kwargs)) < 1e-5
    assert onnx.generate_from(**kwargs) == reference.generate_from(**kwargs)


def test_onnx_projects_a_condition_as_the_model_does(text_checkpoint, text_export):  # noqa: F811
    reference, onnx = ldlm.load(text_checkpoint), ldlm.load(text_export)
    sources = ["about cat", "about the sun and the rain"]
    cond = reference.reverse.embed_condition(*_states(reference, sources))
    read = onnx.reverse.project_condition(onnx.reverse.embed_condition(*_states(onnx, sources)))
    expected = reference.reverse.project_condition(cond)
    assert read.projected and read.tokens.shape == expected.tokens.shape
    assert rel_err(read.tokens, expected.tokens) < 1e-5
    x, t = torch.randn(2, *reference.config.latent_shape), torch.tensor([20.0, 800.0])
    with torch.no_grad():
        want = reference.reverse(x, t, condition=cond)
    assert rel_err(onnx.reverse(x, t, condition=read), want) < 1e-5
    assert rel_err(onnx.reverse(x, t, condition=onnx.reverse.embed_condition(*_states(onnx, sources))), want) < 1e-5


def _states(pipe, sources):
    from ldlm.model.encoder import pad_states

    return pad_states(pipe.encoder.token_states(sources))


LONG_SOURCES = [" ".join(["the cat and the dog saw the bird"] * 5), "about the sun and the rain " * 6,
                "a dog ran " * 12, "about cat " * 15]  # 30-50 encoder tokens each, the null condition one


def _counting_runs(pipe, monkeypatch) -> list[int]:
    """Rows of each reverse-graph run of `pipe` (onnx), recorded as they run."""
    runs, run = [], pipe.reverse.graph.run
    monkeypatch.setattr(pipe.reverse.graph, "run", lambda inputs, outputs: (runs.append(len(inputs["x_t"])),
                                                                             run(inputs, outputs))[1])
    return runs


def test_a_guided_batch_runs_its_null_rows_apart_from_the_long_sources(text_checkpoint, older_text_export,  # noqa: F811
                                                                       monkeypatch):
    from ldlm.model.reverse import Condition
    from ldlm.sampling.guidance import encode_condition

    onnx = ldlm.load(older_text_export)  # its graph projects every padded token at every step
    reverse = onnx.reverse
    condition = encode_condition(reverse, onnx.encoder, sources=LONG_SOURCES, device=onnx.device)
    guided = Condition.cat([condition, reverse.null(4)])  # the null rows padded to the sources' length
    assert guided.tokens.shape[1] >= 30 and guided.mask[4:].sum() == 4
    x, t = torch.randn(8, *onnx.config.latent_shape), torch.linspace(10, 990, 8)
    runs = _counting_runs(onnx, monkeypatch)
    apart = reverse(x, t, condition=guided)
    assert sorted(runs) == [4, 4]  # the sources' rows, then the null ones trimmed to their one token
    runs.clear()
    joint = reverse._run(x, t, None, guided)
    assert runs == [8] and rel_err(apart, joint) < 1e-6
    with torch.no_grad():  # and both as the model computes the padded batch
        expected = ldlm.load(text_checkpoint).reverse(x, t, condition=guided)
    assert rel_err(apart, expected) < 1e-5
    runs.clear()  # one guided item saves too few padded tokens to pay for a second run
    reverse(x[:2], t[:2], condition=Condition.cat([condition.rows(slice(0, 1)), reverse.null(1)]))
    assert runs == [2]


@pytest.mark.parametrize("projects_once", [True, False])
def test_onnx_generates_from_long_sources_as_the_reference(text_checkpoint, text_export,  # noqa: F811
                                                           older_text_export, monkeypatch, projects_once):
    reference, onnx = ldlm.load(text_checkpoint), ldlm.load(text_export if projects_once else older_text_export)
    runs = _counting_runs(onnx, monkeypatch)
    kwargs = {"sources": LONG_SOURCES, "sampler": "dpm++2m", "steps": 4, "seed": 5, "guidance": 2.0,
              "progress": False}
    assert rel_err(onnx.sample_latents(4, **kwargs), reference.sample_latents(4, **kwargs)) < 1e-5
    # each step one run reading the projection made once, or (the older export) the sources' rows, then the
    # null rows apart
    assert runs == ([8] * 4 if projects_once else [4] * 8)
    assert onnx.generate_from(**kwargs) == reference.generate_from(**kwargs)


@pytest.mark.parametrize("projects_once", [True, False])
def test_the_serving_engine_on_either_export_answers_as_lone_calls(text_export, older_text_export, projects_once,
                                                                 captured_latents):  # noqa: F811
    """Guided, unguided and unconditional requests of unequal sources sharing the engine's forwards, on the export
    whose reverse graph reads the held projections and on the older one that projects tokens itself."""
    pipe = ldlm.load(text_export if projects_once else older_text_export)
    requests = [
        ("generate_from", {"source": LONG_SOURCES[0], "seed": 1, "guidance": 2.5, "sampler": "dpm++2m", "steps": 8}),
        ("generate", {"seed": 2, "sampler": "ddim", "steps": 6}),
        ("generate_from", {"source": "short", "seed": 3, "guidance": 1.0, "sampler": "ddim", "steps": 5}),
        ("generate_from", {"source": LONG_SOURCES[1], "seed": 4, "guidance": 3.0, "sampler": "dpm++2m", "steps": 9}),
        ("generate_from", {"source": "a source", "seed": 5, "guidance": 2.0, "sampler": "ddim", "steps": 4}),
    ]
    with ldlm.AsyncEngine(pipe, max_rows=16) as engine:
        texts = staggered(engine, requests, every=2)
        assert engine.stats().mean_rows_per_forward > 2
    assert_lone_results(pipe, requests, texts, captured_latents)

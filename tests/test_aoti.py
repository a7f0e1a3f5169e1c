"""`ldlm export --format aoti` and the aoti backend (AOTInductor packages) against the PyTorch reference.

The packages are compiled once for the module (about a minute and a half on two cores: four graphs through
Inductor's C++ toolchain). Tolerances as for the onnx backend: fp32 latents within 1e-5 of the reference, the
same decoded tokens.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import ldlm
from ldlm.cli import main
from ldlm.export.aoti_export import export_aoti
from ldlm.export.manifest import ExportError, hash_files
from ldlm.fast.compiled import compiler_missing
from ldlm.runtimes.backends import BackendUnavailable
from ldlm.runtimes.onnx_session import OnnxOptions

from .conftest import TINY_TEXTS, assert_threads_get_their_own_results
from .test_serving import captured_latents  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(compiler_missing() is not None, reason="AOTInductor needs a C++ compiler")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


@pytest.fixture(scope="module")
def packaged(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("aoti") / "tiny"
    assert main(["export", str(tiny_checkpoint), str(out), "--format", "aoti"]) == 0
    return out


def test_manifest_names_the_packages_and_what_they_are_bound_to(packaged, capsys):
    manifest = json.loads((packaged / "manifest.json").read_text())
    assert manifest["format"] == "ldlm-aoti" and set(manifest["graphs"]) == {"float32"}
    assert {spec["file"] for spec in manifest["graphs"]["float32"].values()} == {
        "encoder.pt2", "reverse.pt2", "decoder_prefill.pt2", "decoder_step.pt2"}
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["target"] == {"device": "cpu", "cpu_isa": torch.backends.cpu.get_cpu_capability()}
    assert manifest["files"] == hash_files(packaged)
    step = manifest["graphs"]["float32"]["decoder_step"]
    assert [o["name"] for o in step["outputs"]] == ["logits", "new_kv"] and step["inputs"][0]["dtype"] == "int64"
    assert main(["info", str(packaged)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "ldlm-aoti" and info["hashes"] == "verified"


@pytest.mark.parametrize(("sampler", "steps"), [("ddim", 20), ("dpm++2m", 12)])
def test_aoti_pipeline_matches_the_reference_end_to_end(tiny_checkpoint, packaged, sampler, steps):
    ref, aoti = ldlm.load(tiny_checkpoint), ldlm.load(packaged)
    assert aoti.backend == "aoti" and "nothing compiles at load" in aoti.backend_reason
    kwargs = {"sampler": sampler, "steps": steps, "seed": 3, "progress": False}
    expected, got = ref.sample_latents(5, **kwargs), aoti.sample_latents(5, **kwargs)  # 5: not the traced 2 rows
    assert rel_err(got, expected) < 1e-5
    latents = expected * 3  # scaled to reach varied decodes of the briefly trained decoder
    assert aoti.decode(latents, progress=False) == ref.decode(latents, progress=False)
    assert rel_err(aoti.encode(TINY_TEXTS), ref.encode(TINY_TEXTS)) < 1e-5
    assert aoti.vary(TINY_TEXTS[:3], strength=0.4, progress=False) == ref.vary(TINY_TEXTS[:3], strength=0.4,
                                                                              progress=False)


def test_threads_sharing_an_aoti_pipeline_get_their_own_results(packaged):
    assert_threads_get_their_own_results(ldlm.load(packaged))


def _edited(packaged, tmp_path, edit) -> object:
    target = tmp_path / "copy"
    shutil.copytree(packaged, target)
    path = target / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(target, manifest)
    manifest["files"] = hash_files(target)
    path.write_text(json.dumps(manifest))
    return target


def test_packages_another_process_cannot_run_fail_at_load_with_what_to_do(tiny_checkpoint, packaged, tmp_path):
    def torch_version(_, manifest):
        manifest["versions"]["torch"] = "2.0.0"

    with pytest.raises(ExportError, match=r"compiled by torch 2.0.0.*--format aoti"):
        ldlm.load(_edited(packaged, tmp_path / "torch", torch_version))

    def newer_cpu(_, manifest):
        manifest["target"]["cpu_isa"] = "AVX1024"

    with pytest.raises(BackendUnavailable, match="compiled for AVX1024 instructions, which this CPU lacks"):
        ldlm.load(_edited(packaged, tmp_path / "isa", newer_cpu))

    def swapped(target, _):
        shutil.copy(target / "encoder.pt2", target / "reverse.pt2")

    with pytest.raises(ValueError, match="reverse.pt2 does not match manifest.json"):  # an edited copy: by consent
        ldlm.load(_edited(packaged, tmp_path / "swap", swapped), trust_native_code=True)

    def corrupt(target, _):
        (target / "decoder_step.pt2").write_bytes(b"not a package")

    with pytest.raises(ValueError, match="decoder_step.pt2 could not be loaded as an ldlm AOTInductor package"):
        ldlm.load(_edited(packaged, tmp_path / "corrupt", corrupt), trust_native_code=True)

    tampered = tmp_path / "tampered"
    shutil.copytree(packaged, tampered)
    (tampered / "reverse.pt2").write_bytes(b"x")
    with pytest.raises(ExportError, match="reverse.pt2 does not match its hash"):
        ldlm.load(tampered)


def test_backend_errors(tiny_checkpoint, packaged):
    with pytest.raises(BackendUnavailable, match=r"ldlm export CHECKPOINT OUTDIR --format aoti"):
        ldlm.load(tiny_checkpoint, backend="aoti")
    with pytest.raises(BackendUnavailable, match="only backend 'aoti' runs"):
        ldlm.load(packaged, backend="onnx")
    with pytest.raises(ExportError, match="no int8 graphs"):
        ldlm.load(packaged, onnx_options=OnnxOptions(int8_reverse=True))
    with pytest.raises(ExportError, match="no torch.float16 graphs"):
        ldlm.load(packaged, dtype="float16")
    if not torch.cuda.is_available():
        with pytest.raises((BackendUnavailable, ValueError), match="cuda"):
            ldlm.load(packaged, device="cuda")
    with pytest.raises(FileExistsError, match="already holds an export"):
        export_aoti(tiny_checkpoint, packaged)


def test_native_code_loads_only_when_this_user_exported_it_or_by_consent(packaged, tmp_path, monkeypatch, capsys):
    """An AOTInductor package is a shared library that runs when loaded: an export whose manifest this user's
    key did not sign (edited, copied from elsewhere, or signed by another key) is refused before any package
    is opened, and loads with trust_native_code / --trust-native-code."""
    opened = []
    real_loader = torch._inductor.aoti_load_package
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda path: opened.append(path) or real_loader(path))

    assert ldlm.load(packaged).backend == "aoti" and opened  # this user's own export: signed, no flag needed
    assert "signed with this user's key" in ldlm.load(packaged).backend_reason

    def same_graphs(_, manifest):  # a planted package would look like this: every hash rewritten to match
        manifest.pop("signature")

    unsigned = _edited(packaged, tmp_path / "unsigned", same_graphs)
    opened.clear()
    with pytest.raises(ValueError, match=r"native code.*trust_native_code=True.*--trust-native-code.*"
                                         r"ONNX export.*ldlm export CKPT OUT --format aoti"):
        ldlm.load(unsigned)
    assert not opened, "a package was opened before consent"
    assert main(["generate", str(unsigned), "-n", "1", "--steps", "2", "--sampler", "ddim"]) == 2
    assert "--trust-native-code" in capsys.readouterr().err and not opened
    assert main(["info", str(unsigned)]) == 0  # info reads the manifest only, on any folder
    assert "only with --trust-native-code" in json.loads(capsys.readouterr().out)["native_code"] and not opened
    trusted = ldlm.load(unsigned, trust_native_code=True)
    assert "by consent" in trusted.backend_reason and len(opened) == 4
    assert main(["generate", str(unsigned), "-n", "1", "--steps", "2", "--sampler", "ddim",
                 "--trust-native-code"]) == 0

    def forged(_, manifest):  # the signature kept, a graph's listed hash changed
        manifest["signature"] = json.loads((packaged / "manifest.json").read_text())["signature"]

    target = _edited(packaged, tmp_path / "forged", forged)
    (target / "encoder_tokenizer" / "extra.txt").write_text("x")
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["files"] = hash_files(target)
    (target / "manifest.json").write_text(json.dumps(manifest))
    opened.clear()
    with pytest.raises(ValueError, match="native code"):
        ldlm.load(target)
    assert not opened

    monkeypatch.setenv("LDLM_CACHE", str(tmp_path / "another-user"))  # another key: another user or machine
    with pytest.raises(ValueError, match="native code"):
        ldlm.load(packaged)
    assert not opened


def test_engine_requests_on_aoti_graphs_get_the_lone_calls_results(packaged, captured_latents):
    from ldlm.serving import AsyncEngine

    from .test_serving import assert_lone_results, staggered

    pipe = ldlm.load(packaged)
    requests = [("generate", {"seed": s, "sampler": "dpm++2m", "steps": steps}) for s, steps in
                [(1, 12), (2, 7), (3, 12)]] + [("vary", {"seed": 4, "text": TINY_TEXTS[2], "strength": 0.3,
                                                  "sampler": "ddim", "steps": 6})]
    with AsyncEngine(pipe, decode="continuous") as engine:
        assert engine.decode == "continuous"  # the graphs take each row's position and mask
        texts = staggered(engine, requests, every=2)
    assert_lone_results(pipe, requests, texts, captured_latents)

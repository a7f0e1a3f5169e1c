"""CLI smoke tests on the tiny preset, in-process (fast) and once through the installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from ldlm.cli import build_parser, main
from ldlm.model.checkpoint import load_checkpoint
from ldlm.training.baseline import sample_language_model

from .conftest import TINY_TEXTS


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(TINY_TEXTS)) + "\n")
    return path


def test_train_then_info_generate_reconstruct_vary(capsys, tmp_path, data_file):
    out = tmp_path / "model"
    code, stdout, _ = run(capsys, "train", "--data", str(data_file), "--out", str(out), "--preset", "tiny",
                          "--time-budget", "0", "--decoder-steps", "12", "--diffusion-steps", "8", "--no-progress")
    assert code == 0 and json.loads(stdout[stdout.index("{"):])["decoder"]["steps"] == 12

    code, stdout, _ = run(capsys, "info", str(out))
    info = json.loads(stdout)
    assert code == 0 and info["latent_dim"] == 32 and info["training"]["steps"] == {"decoder": 12, "diffusion": 8}

    code, stdout, _ = run(capsys, "generate", str(out), "-n", "3", "--sampler", "ddim", "--steps", "5", "--json",
                          "--no-progress")
    records = [json.loads(line) for line in stdout.splitlines()]
    assert code == 0 and [r["index"] for r in records] == [0, 1, 2] and records[0]["sampler"] == "ddim"
    code, stdout, _ = run(capsys, "generate", str(out), "-n", "2", "--sampler", "dpm++2m", "--steps", "6", "--json",
                          "--no-progress")
    records = [json.loads(line) for line in stdout.splitlines()]
    assert code == 0 and [(r["sampler"], r["steps"]) for r in records] == [("dpm++2m", 6)] * 2

    code, stdout, err = run(capsys, "reconstruct", str(out), "the cat sat.", "rain fell.", "--no-progress")
    assert code == 0 and len(stdout.splitlines()) == 2 and "backend: reference" in err
    device = "cuda" if torch.cuda.is_available() else "cpu"  # Triton runs on CPU only through its interpreter
    code, fused_stdout, err = run(capsys, "reconstruct", str(out), "the cat sat.", "rain fell.", "--backend", "fused",
                                  "--device", device, "--no-progress")
    assert code == 0 and fused_stdout == stdout and "backend: fused" in err

    code, stdout, _ = run(capsys, "vary", str(out), "the cat sat.", "--strength", "0.4", "--sampler", "ddim",
                          "--steps", "4", "--json", "--no-progress")
    assert code == 0 and json.loads(stdout)["input"] == "the cat sat." and json.loads(stdout)["strength"] == 0.4


def test_errors_are_reported_not_raised(capsys, tmp_path, tiny_checkpoint):
    code, _, err = run(capsys, "generate", str(tmp_path / "missing"), "--no-progress")
    assert code == 2 and "is not a directory" in err
    code, _, err = run(capsys, "vary", str(tiny_checkpoint), "x", "--strength", "2", "--no-progress")
    assert code == 2 and "strength must be a number in [0, 1]" in err
    code, _, err = run(capsys, "reconstruct", str(tiny_checkpoint), "ok", "  ", "--no-progress")
    assert code == 2 and "text 1 is empty" in err
    if not torch.cuda.is_available():
        code, _, err = run(capsys, "generate", str(tiny_checkpoint), "--backend", "cuda-graph", "--no-progress")
        assert code == 2 and "needs a CUDA device" in err


def test_generate_takes_a_temperature(capsys, tiny_checkpoint, tiny_pipeline):
    code, out, _ = run(capsys, "generate", str(tiny_checkpoint), "-n", "2", "--sampler", "ddim", "--steps", "5",
                       "--temperature", "0.5", "--seed", "3", "--no-progress")
    assert code == 0 and out.splitlines() == tiny_pipeline.generate(2, sampler="ddim", steps=5, seed=3,
                                                                     temperature=0.5, progress=False)
    code, _, err = run(capsys, "generate", str(tiny_checkpoint), "--temperature", "9", "--no-progress")
    assert code == 2 and "temperature must be a number in [0, 2]" in err


def test_train_refuses_to_overwrite(capsys, tiny_checkpoint, data_file):
    code, _, err = run(capsys, "train", "--data", str(data_file), "--out", str(tiny_checkpoint), "--preset", "tiny",
                       "--no-progress")
    assert code == 2 and "pass --resume" in err


def test_resume_remembers_the_reused_stages(capsys, tmp_path, tiny_checkpoint, data_file):
    out = tmp_path / "reused"
    common = ("train", "--data", str(data_file), "--out", str(out), "--preset", "tiny", "--time-budget", "0",
              "--no-progress")
    code, _, _ = run(capsys, *common, "--decoder-from", str(tiny_checkpoint), "--diffusion-steps", "4")
    assert code == 0
    code, stdout, err = run(capsys, *common, "--resume", "--diffusion-steps", "7")  # no --decoder-from again
    summary = json.loads(stdout[stdout.index("{"):])
    assert code == 0, err
    assert summary["diffusion"]["steps"] == 7 and summary["decoder"] == {"reused_from": str(tiny_checkpoint)}


def test_train_sets_the_checkpoints_sampling_defaults(capsys, tmp_path, data_file):
    out = tmp_path / "nucleus"
    code, _, err = run(capsys, "train", "--data", str(data_file), "--out", str(out), "--preset", "tiny",
                       "--time-budget", "0", "--decoder-steps", "4", "--diffusion-steps", "2", "--sampler", "ddim",
                       "--sampling-steps", "7", "--decoding", "nucleus", "--top-p", "0.8", "--no-progress")
    assert code == 0, err
    config = load_checkpoint(out).config
    assert (config.sampler, config.sampling_steps, config.decoding, config.top_p) == ("ddim", 7, "nucleus", 0.8)


def test_every_flag_has_help():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    assert set(subparsers) == {"train", "generate", "reconstruct", "vary", "eval", "baseline", "export", "bench", "info", "demo"}
    baseline = next(a for a in subparsers["baseline"]._actions if a.dest == "baseline_command").choices
    for name, sub in [*subparsers.items(), *(("baseline " + k, v) for k, v in baseline.items())]:
        for action in sub._actions:
            assert action.help, f"ldlm {name} {action.option_strings or action.dest} has no help"


def test_console_script_is_installed():
    assert shutil.which("ldlm"), "install the project (pip install .) so the `ldlm` command exists"
    result = subprocess.run(["ldlm", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "reconstruct" in result.stdout


def test_baseline_train_and_sample(capsys, tmp_path, data_file):
    out = tmp_path / "lm"
    code, stdout, _ = run(capsys, "baseline", "train", "--data", str(data_file), "--out", str(out), "--preset", "tiny",
                          "--time-budget", "1", "--no-progress")
    assert code == 0 and json.loads(stdout)["steps"] > 0
    code, _, _ = run(capsys, "baseline", "sample", str(out), "-n", "5", "--output", str(tmp_path / "s.txt"))
    first = (tmp_path / "s.txt").read_text().splitlines()
    code, _, _ = run(capsys, "baseline", "sample", str(out), "-n", "5", "--output", str(tmp_path / "s.txt"))
    assert code == 0 and len(first) == 5 and (tmp_path / "s.txt").read_text().splitlines() == first


def test_baseline_step_limit_is_exact_and_reproducible(capsys, tmp_path, data_file):
    weights = []
    for name in ("a", "b"):
        code, stdout, _ = run(capsys, "baseline", "train", "--data", str(data_file), "--out", str(tmp_path / name),
                              "--preset", "tiny", "--time-budget", "0", "--steps", "3", "--no-progress")
        assert code == 0 and json.loads(stdout)["steps"] == 3
        weights.append(load_file(tmp_path / name / "lm.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    with pytest.raises(SystemExit, match="--steps"):
        run(capsys, "baseline", "train", "--data", str(data_file), "--out", str(tmp_path / "c"), "--preset", "tiny",
            "--time-budget", "0")


def test_baseline_lengths_follow_the_options(capsys, tmp_path, data_file):
    out = tmp_path / "lm"
    code, _, _ = run(capsys, "baseline", "train", "--data", str(data_file), "--out", str(out), "--preset", "tiny",
                     "--time-budget", "1", "--max-text-tokens", "50", "--no-progress")
    assert code == 0 and json.loads((out / "config.json").read_text())["gpt2"]["n_positions"] == 2 + 50 + 1
    code, _, _ = run(capsys, "baseline", "sample", str(out), "-n", "4", "--max-new-tokens", "3",
                     "--output", str(tmp_path / "s.txt"))
    samples = (tmp_path / "s.txt").read_text().splitlines()
    assert code == 0 and samples == sample_language_model(out, 4, seed=0, max_new_tokens=3)
    assert samples != sample_language_model(out, 4, seed=0, max_new_tokens=64)


HEAVY = ("torch", "transformers", "tokenizers", "numpy")


@pytest.mark.parametrize("code", [
    "import ldlm",  # the package and its config, without the model stack
    "from ldlm.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0",
    "from ldlm.cli import main\ntry:\n    main(['generate', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0",
    "from ldlm.cli import main\ntry:\n    main(['generate'])\nexcept SystemExit as e:\n    assert e.code == 2",  # usage error
])
def test_help_usage_errors_and_import_start_without_the_model_stack(code):
    import sys

    check = f"{code}\nimport sys\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_the_lazy_package_attributes_load_the_pipeline():
    import ldlm
    from ldlm import load

    assert load is ldlm.load and ldlm.Pipeline.__name__ == "Pipeline"
    from ldlm.runtimes.onnx_session import OnnxOptions

    assert ldlm.OnnxOptions is OnnxOptions  # the documented way to pass ONNX Runtime's options
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        ldlm.nothing  # noqa: B018

"""Issue 17's attack cases against whichever ldlm is importable: each builds a hostile or broken input in a temp
dir, runs the CLI (or one API call) in a fresh process under a time and memory limit, and says what happened.
Run on two commits for the before/after table in bench/RESULTS.md:

    python bench/reliability/hostile_inputs.py [--timeout 60] [--memory-gib 8] [--only NAME ...]

The tests keep each case (tests/test_model_folders.py, tests/test_job_inputs.py); this script measures them the
way a user meets them, through the command line, including the ones that hang or exhaust memory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

GOOD = [{"id": "a"}, {"id": "b", "text": "the cat sat on the mat."}, {"id": "c", "text": "a dog ran.", "mode": "vary"}]
PAYLOAD = "import pathlib\npathlib.Path({mark!r}).write_text('ran')\n"


@dataclass
class Run:
    rc: int | None  # None: still running at the time limit
    out: str
    err: str
    seconds: float


@dataclass
class Case:
    name: str
    what: str  # the attack, in words
    prepare: Callable[[Path], list[list[str]]]  # -> the commands to run in turn (the last one is judged)
    judge: Callable[[Path, Run], str] | None = None  # the outcome beyond the exit status
    stdin: str = ""
    concurrent: bool = False  # run the commands at once instead of in turn
    tags: list[str] = field(default_factory=list)


def edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def write_jsonl(path: Path, rows, final_newline: bool = True) -> None:
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows]
    path.write_bytes(b"\n".join(lines) + (b"\n" if final_newline else b""))


def sign(export: Path) -> None:
    """Rewrite an export's hashes, as whoever wrote the files can."""
    def digest(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()
    files = {p.relative_to(export).as_posix(): digest(p) for p in sorted(export.rglob("*"))
             if p.is_file() and p.name != "manifest.json"}
    edit_json(export / "manifest.json", lambda m: m.update(files=files))


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ldlm.cli", *args]


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


class Fixtures:
    """A tiny trained checkpoint and its fp32 export, built once; each case works on copies."""

    def __init__(self, root: Path):
        self.root = root
        self.checkpoint, self.export = root / "ckpt", root / "export"
        texts = ["the cat sat on the mat.", "a dog ran in the park.", "rain fell on the town."] * 8
        code = ("from ldlm.model.config import ModelConfig; from ldlm.training.train import TrainConfig, train\n"
                f"texts = {json.dumps(texts)}\n"
                "cfg = TrainConfig(time_budget=None, decoder_steps=20, diffusion_steps=10, eval_every=10, "
                "decoder_batch_size=8, diffusion_batch_size=16, warmup_steps=2, save_every=1e9)\n"
                f"train(texts, {str(self.checkpoint)!r}, ModelConfig.from_preset('tiny'), cfg, progress=False, "
                "log=lambda *_: None)\n")
        subprocess.run(python(code), check=True, capture_output=True)
        subprocess.run(cli("export", str(self.checkpoint), str(self.export), "--no-fp16", "--no-int8"), check=True,
                       capture_output=True)
        other = root / "ckpt-other"  # the same config and latent statistics, other reverse weights
        shutil.copytree(self.checkpoint, other)
        code = ("from safetensors.torch import load_file, save_file\n"
                f"p = {str(other / 'reverse.safetensors')!r}\n"
                "w = load_file(p); save_file({k: v + 0.01 for k, v in w.items()}, p)\n")
        subprocess.run(python(code), check=True, capture_output=True)
        self.other = other

    def aoti(self) -> Path:
        """An AOTInductor export of the checkpoint, compiled on first use (a minute or two)."""
        path = self.root / "aoti"
        if not path.exists():
            subprocess.run(cli("export", str(self.checkpoint), str(path), "--format", "aoti"), check=True,
                           capture_output=True)
        return path

    def copy(self, which: Path, into: Path) -> Path:
        target = into / which.name
        shutil.copytree(which, target, symlinks=True)
        return target


def cases(fx: Fixtures) -> list[Case]:
    def ckpt(d: Path) -> Path:
        return fx.copy(fx.checkpoint, d)

    def export(d: Path) -> Path:
        return fx.copy(fx.export, d)

    def mark_judge(d: Path, run: Run) -> str:
        return "RAN THE FOLDER'S CODE" if (d / "ran").exists() else ""

    def custom_code(where: str) -> Callable[[Path], list[list[str]]]:
        def prepare(d: Path) -> list[list[str]]:
            root = export(d) if where.startswith("decoder_tokenizer") else ckpt(d)
            folder, name = where.split("/")
            (root / folder / "evil.py").write_text(PAYLOAD.format(mark=str(d / "ran")))
            if name == "config.json":
                evil = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.Evil"}
                edit_json(root / folder / name, lambda c: c.update(model_type="evil", auto_map=evil))
            else:
                edit_json(root / folder / name, lambda c: (c.pop("tokenizer_class", None),
                                                           c.update(auto_map={"AutoTokenizer": ["evil.Evil", None]})))
            if root.name == "export":
                sign(root)
                return [cli("generate", str(root), "-n", "1", "--sampler", "ddim", "--steps", "2", "--no-progress")]
            return [cli("info", str(root))]
        return prepare

    def config_edit(section: str, values: dict) -> Callable[[Path], list[list[str]]]:
        def prepare(d: Path) -> list[list[str]]:
            root = ckpt(d)
            edit_json(root / "config.json", lambda m: m[section].update(values) if section else m.pop("encoder"))
            return [cli("info", str(root))]
        return prepare

    def manifest_edit(change, sign_after: bool = False, command: str = "info") -> Callable[[Path], list[list[str]]]:
        def prepare(d: Path) -> list[list[str]]:
            root = export(d)
            edit_json(root / "manifest.json", change)
            if sign_after:
                sign(root)
            if command == "info":
                return [cli("info", str(root))]
            return [cli("generate", str(root), "-n", "1", "--sampler", "ddim", "--steps", "2", "--no-progress")]
        return prepare

    def corrupt_unlisted_data(d: Path) -> list[list[str]]:
        root = export(d)
        data = root / "reverse.onnx.data"
        raw = bytearray(data.read_bytes())
        raw[:64] = bytes(64)
        data.write_bytes(bytes(raw))
        edit_json(root / "manifest.json", lambda m: m["files"].pop("reverse.onnx.data"))
        return [cli("generate", str(root), "-n", "1", "--sampler", "ddim", "--steps", "2", "--no-progress")]

    def verified_judge(d: Path, run: Run) -> str:
        return "says \"hashes: verified\"" if "verified" in run.out else ""

    def export_onto_checkpoint(d: Path) -> list[list[str]]:
        root = ckpt(d)
        (d / "before").write_bytes((root / "config.json").read_bytes())
        return [cli("export", str(root), str(root), "--no-fp16", "--no-int8")]

    def checkpoint_changed(d: Path, run: Run) -> str:
        root = d / "ckpt"
        config_changed = (root / "config.json").read_bytes() != (d / "before").read_bytes()
        changed = (root / "manifest.json").exists() or config_changed
        return "CHECKPOINT FOLDER WRITTEN INTO" if changed else "checkpoint untouched"

    settings = ["--sampler", "ddim", "--steps", "2", "--no-progress"]

    def job(rows, *, resume=False, output=None, final_newline=True) -> Callable[[Path], list[list[str]]]:
        def prepare(d: Path) -> list[list[str]]:
            source = d / "in.jsonl"
            write_jsonl(source, rows, final_newline)
            out = output(d) if output else d / "out.jsonl"
            return [cli("generate", str(fx.checkpoint), "--input", str(source), "--output", str(out), *settings,
                        *(["--resume"] if resume else []))]
        return prepare

    def input_kept(d: Path, run: Run) -> str:
        rows = (d / "in.jsonl").read_bytes().count(b"{")
        return f"input keeps {rows} of {len(GOOD)} lines" + (" (LINE DELETED)" if rows < len(GOOD) else "")

    def records(d: Path) -> list[dict]:
        path = d / "out.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def written(d: Path, run: Run) -> str:
        rs = records(d)
        return f"{sum('error' not in r for r in rs)} written, {sum('error' in r for r in rs)} error records"

    def other_model(d: Path) -> list[list[str]]:
        first_half, source, out = d / "half.jsonl", d / "in.jsonl", d / "out.jsonl"
        write_jsonl(first_half, [{"id": i} for i in range(4)])
        first = cli("generate", str(fx.checkpoint), "--input", str(first_half), "--output", str(out), *settings)
        write_jsonl(source, [{"id": i} for i in range(8)])
        return [first, cli("generate", str(fx.other), "--input", str(source), "--output", str(out), *settings,
                           "--resume")]

    def edited_input(d: Path) -> list[list[str]]:
        source, out = d / "in.jsonl", d / "out.jsonl"
        write_jsonl(source, GOOD)
        first = cli("generate", str(fx.checkpoint), "--input", str(source), "--output", str(out), *settings)
        script = (f"import json,pathlib; p=pathlib.Path({str(source)!r}); rows={GOOD!r}; "
                  "rows[1]['text']='rain fell.'; p.write_text(''.join(json.dumps(r)+chr(10) for r in rows))")
        resume = cli("generate", str(fx.checkpoint), "--input", str(source), "--output", str(out), *settings,
                     "--resume")
        return [first, python(script), resume]

    def edited_judge(d: Path, run: Run) -> str:
        mine = [r for r in records(d) if r.get("id") == "b"]
        return "edited line ran again" if mine and mine[-1].get("input") == "rain fell." else "OLD RESULT KEPT"

    def concurrent_jobs(d: Path) -> list[list[str]]:  # long enough (DDPM, 1000 steps a batch) to overlap
        source, out = d / "in.jsonl", d / "out.jsonl"
        write_jsonl(source, [{"id": i} for i in range(24)])
        command = cli("generate", str(fx.checkpoint), "--input", str(source), "--output", str(out), "--sampler",
                      "ddpm", "--no-progress", "--resume", "--batch-size", "2")
        return [command, command]

    def duplicates(d: Path, run: Run) -> str:
        ids = [r.get("id") for r in records(d)]
        return f"{len(ids)} records for 24 ids" + (" (IDS WRITTEN TWICE)" if len(ids) > len(set(ids)) else "")

    def typo_judge(d: Path, run: Run) -> str:
        rs = records(d)
        return "RAN AT THE DEFAULT STRENGTH" if rs and "error" not in rs[-1] else (rs[-1]["error"][:70] if rs else "")

    def crlf_input(data: bytes) -> Callable[[Path], list[list[str]]]:
        def prepare(d: Path) -> list[list[str]]:
            (d / "in.jsonl").write_bytes(data)
            return [cli("generate", str(fx.checkpoint), "--input", str(d / "in.jsonl"), "--output",
                        str(d / "out.jsonl"), *settings)]
        return prepare

    rows3 = [json.dumps(r).encode() for r in GOOD]
    api = "import ldlm; p = ldlm.load({ckpt!r}); "

    def api_call(code: str) -> Callable[[Path], list[list[str]]]:
        return lambda d: [python(api.format(ckpt=str(fx.checkpoint)) + code)]

    def tiny_latents(d: Path) -> list[list[str]]:
        return [python("from ldlm.model.encoder import build_tiny_encoder; e = build_tiny_encoder(32); "
                       "a = e.encode(['The cat walked home.', 'zzzz qqqq xxxxx yyyy.']); "
                       "print('max latent difference', float((a[0] - a[1]).abs().max()))")]

    def printed(d: Path, run: Run) -> str:
        return run.out.strip().splitlines()[-1] if run.out.strip() else ""

    return [
        Case("code-encoder-config", "auto_map + evil.py in a checkpoint's encoder/config.json; `yes | ldlm info`",
             custom_code("encoder/config.json"), mark_judge, stdin="y\n" * 20),
        Case("code-tokenizer", "auto_map in a checkpoint's tokenizer/tokenizer_config.json; `yes | ldlm info`",
             custom_code("tokenizer/tokenizer_config.json"), mark_judge, stdin="y\n" * 20),
        Case("code-export-tokenizer",
             "auto_map in an export's decoder_tokenizer/, hashes rewritten; `yes | ldlm generate`",
             custom_code("decoder_tokenizer/tokenizer_config.json"), mark_judge, stdin="y\n" * 20),
        Case("size-d-model", "config d_model 131072 (the weights are 64)", config_edit("model", {"d_model": 131072})),
        Case("size-n-layer", "gpt2 n_layer 100000 (the weights have 2)", config_edit("gpt2", {"n_layer": 100000})),
        Case("no-encoder-entry", "config.json without its \"encoder\" entry", config_edit("", {})),
        Case("manifest-pagemap", "manifest files entry /proc/self/pagemap; `ldlm info`",
             manifest_edit(lambda m: m["files"].update({"/proc/self/pagemap": "0" * 64}))),
        Case("manifest-outside-graph", "reverse graph file ../../ckpt/decoder.safetensors (outside the export)",
             manifest_edit(lambda m: m["graphs"]["float32"]["reverse"].update(file="../../ckpt/decoder.safetensors"),
                           command="generate")),
        Case("unlisted-corrupt-data", "reverse.onnx.data corrupted, its manifest entry removed; `ldlm generate`",
             corrupt_unlisted_data),
        Case("empty-files", "manifest \"files\": {}; `ldlm info`", manifest_edit(lambda m: m.update(files={})),
             verified_judge),
        Case("export-onto-checkpoint", "`ldlm export CKPT CKPT`", export_onto_checkpoint, checkpoint_changed),
        Case("resume-input-as-output", "--resume with --output = --input (no final newline)",
             job(GOOD, resume=True, output=lambda d: d / "in.jsonl", final_newline=False), input_kept),
        Case("poison-seed", "a line with seed 2**64 among good ones", job([*GOOD, {"id": "z", "seed": 2**64}]),
             written),
        Case("poison-surrogate", "a text with a lone surrogate", job([*GOOD, b'{"id": "z", "text": "caf\\ud800"}']),
             written),
        Case("poison-long-id", "a 5,000-digit integer id", job([*GOOD, b'{"id": ' + b"7" * 5000 + b"}"]), written),
        Case("resume-other-model", "resume a job with a checkpoint whose weights differ", other_model, written),
        Case("resume-edited-line", "resume after a line's text was edited", edited_input, edited_judge),
        Case("two-jobs-one-output", "two jobs writing one output at once", concurrent_jobs, duplicates,
             concurrent=True),
        Case("unknown-field", "a line with \"strenght\": 0.95",
             job([{"id": "v", "text": "the cat sat.", "mode": "vary", "strenght": 0.95}]), typo_judge),
        Case("bom", "input starting with a UTF-8 BOM", crlf_input(b"\xef\xbb\xbf" + b"\n".join(rows3) + b"\n"),
             written),
        Case("cr-only", "input with CR-only line endings", crlf_input(b"\r".join(rows3) + b"\r"), written),
        Case("seed-negative", "`ldlm generate -n 1 --seed -1`",
             lambda d: [cli("generate", str(fx.checkpoint), "-n", "1", "--seed", "-1", *settings)]),
        Case("seed-float", "generate(1, seed=2.5)", api_call("p.generate(1, seed=2.5, progress=False)")),
        Case("steps-float", "generate(1, sampler='ddim', steps=2.5)",
             api_call("p.generate(1, sampler='ddim', steps=2.5, progress=False)")),
        Case("strength-true", "vary([...], strength=True)",
             api_call("print(p.vary(['the cat.'], strength=True, progress=False))")),
        Case("surrogate-text", "encode(['caf\\ud800'])", api_call("p.encode(['caf\\ud800'])")),
        Case("encode-batch-0", "encode([...], batch_size=0)", api_call("p.encode(['the cat.'], batch_size=0)")),
        Case("bench-batch-0", "`ldlm bench --preset tiny --batch-sizes 0`",
             lambda d: [cli("bench", "--preset", "tiny", "--batch-sizes", "0", "--iters", "1")]),
        Case("bench-iters-0", "`ldlm bench --preset tiny --iters 0`",
             lambda d: [cli("bench", "--preset", "tiny", "--batch-sizes", "1", "--iters", "0", "--sampler", "ddim",
                            "--steps", "2", "--max-new-tokens", "2")]),
        Case("device-cuda", "`--device cuda` on a machine without CUDA",
             lambda d: [cli("generate", str(fx.checkpoint), "-n", "1", "--device", "cuda")]),
        Case("device-malformed", "`--device banana`",
             lambda d: [cli("generate", str(fx.checkpoint), "-n", "1", "--device", "banana")]),
        Case("input-directory", "`--input` a directory",
             lambda d: [cli("generate", str(fx.checkpoint), "--input", str(d), "--output", str(d / "o.jsonl"))]),
        Case("file-not-utf8", "`reconstruct --file` a Latin-1 file",
             lambda d: ((d / "t.txt").write_bytes("caf\xe9\n".encode("latin-1")),
                        [cli("reconstruct", str(fx.checkpoint), "--file", str(d / "t.txt"))])[1]),
        Case("tiny-encoder", "the tiny preset's encoder on two unrelated texts", tiny_latents, printed),
        *issue37_cases(fx, settings),
    ]


PLANTED = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(getenv("HOSTILE_MARKER"), "w");
    if (f) { fputs("ran", f); fclose(f); }
}
"""


def planted_library(path: Path) -> None:
    """A shared library whose constructor writes $HOSTILE_MARKER when anything loads it."""
    source = path.with_suffix(".c")
    source.write_text(PLANTED)
    subprocess.run([os.environ.get("CC") or shutil.which("cc") or "gcc", "-shared", "-fPIC", "-o", str(path),
                    str(source)], check=True)


def with_env(command: list[str], **env: str) -> list[str]:
    return ["env", *(f"{k}={v}" for k, v in env.items()), *command]


def issue37_cases(fx: Fixtures, settings: list[str]) -> list[Case]:
    """Issue 37: native code only by consent, bounded work, training that never mixes runs."""
    def marker_judge(d: Path, run: Run) -> str:
        return "PLANTED LIBRARY RAN" if (d / "marker").exists() else "planted library never loaded"

    def native_cache(mode: int, rewrite_record: bool) -> Callable[[Path], list[list[str]]]:
        def prepare(d: Path) -> list[list[str]]:
            cache = d / "cache"
            env = {"LDLM_CACHE": str(cache), "HOSTILE_MARKER": str(d / "marker")}
            subprocess.run(with_env(python("from ldlm.kernels import native; native.library()"), **env), check=True)
            for library in (cache / "native").glob("beam_update-*.so"):
                planted_library(library)
                record = library.with_name(library.name + ".sha256")
                if rewrite_record and record.exists():  # whoever can write the folder can rewrite it too
                    record.write_text(hashlib.sha256(library.read_bytes()).hexdigest())
            (cache / "native").chmod(mode)
            return [with_env(cli("generate", str(fx.export), "-n", "1", *settings), **env)]
        return prepare

    def cache_is_a_file(d: Path) -> list[list[str]]:
        (d / "file").write_text("")
        return [with_env(cli("generate", str(fx.export), "-n", "1", *settings), LDLM_CACHE=str(d / "file"))]

    def aoti_unsigned(d: Path) -> list[list[str]]:
        export = fx.copy(fx.aoti(), d)
        edit_json(export / "manifest.json", lambda m: m.pop("signature", None))
        return [cli("generate", str(export), "-n", "1", *settings)]

    def data(name: str, content: bytes) -> Callable[[Path], list[list[str]]]:
        def prepare(d: Path) -> list[list[str]]:
            (d / name).write_bytes(content)
            return [cli("train", "--data", str(d / name), "--out", str(d / "m"), "--preset", "tiny", "--time-budget",
                        "0", "--decoder-steps", "2", "--diffusion-steps", "2", "--no-progress")]
        return prepare

    def two_trainings(d: Path) -> list[list[str]]:
        (d / "t.txt").write_text("\n".join(["the cat sat on the mat.", "a dog ran in the park."] * 20))
        command = cli("train", "--data", str(d / "t.txt"), "--out", str(d / "m"), "--preset", "tiny",
                      "--time-budget", "0", "--decoder-steps", "300", "--diffusion-steps", "300", "--no-progress")
        return [command, command]

    def one_refused(d: Path, run: Run) -> str:
        return "the other run refused" if "being trained by another run" in run.err else "BOTH RAN"

    def train_into_export(d: Path) -> list[list[str]]:
        export = fx.copy(fx.export, d)
        (d / "t.txt").write_text("the cat sat on the mat.\n" * 20)
        return [cli("train", "--data", str(d / "t.txt"), "--out", str(export), "--preset", "tiny", "--time-budget",
                    "0", "--decoder-steps", "2", "--diffusion-steps", "2", "--no-progress"),
                cli("info", str(export))]

    def export_loads(d: Path, run: Run) -> str:
        written = (d / "export" / "config.json").exists()
        return ("CHECKPOINT WRITTEN INTO THE EXPORT" if written else "training refused") + (
            ", export still loads" if run.rc == 0 else ", EXPORT BROKEN")

    def tokenizer_mismatch(d: Path) -> list[list[str]]:
        ckpt_copy = fx.copy(fx.checkpoint, d)
        subprocess.run(python("from transformers import AutoTokenizer; "
                              f"t = AutoTokenizer.from_pretrained({str(ckpt_copy / 'tokenizer')!r}); "
                              "t.add_tokens(['zzz1', 'zzz2']); "
                              f"t.save_pretrained({str(ckpt_copy / 'tokenizer')!r})"), check=True)
        return [cli("generate", str(ckpt_copy), "-n", "1", *settings)]

    def export_std_nan(d: Path) -> list[list[str]]:
        export = fx.copy(fx.export, d)
        edit_json(export / "manifest.json", lambda m: m["latent_stats"].update(
            std=[float("nan")] * len(m["latent_stats"]["std"])))
        return [cli("generate", str(export), "-n", "1", *settings)]

    return [
        Case("native-cache-planted", "a library with a constructor planted at the C helper's cache path "
             "(computable by anyone); `ldlm generate EXPORT`", native_cache(0o700, False), marker_judge),
        Case("native-cache-777", "the same in a cache folder of mode 777, its hash record rewritten to match",
             native_cache(0o777, True), marker_judge),
        Case("cache-is-a-file", "LDLM_CACHE names a file; `ldlm generate EXPORT`", cache_is_a_file),
        Case("aoti-unsigned", "an AOTInductor export copied from elsewhere (no signature of this user's key); "
             "`ldlm generate`", aoti_unsigned, tags=["slow"]),
        Case("train-50mb-line", "`ldlm train` on a .txt holding one 50 MB line among 20 short ones",
             data("huge.txt", b"the cat sat. " * 4_000_000 + b"\n" + b"a dog ran in the park.\n" * 20)),
        Case("train-two-lines", "`ldlm train` on two lines", data("two.txt", b"the cat sat.\na dog ran.\n")),
        Case("train-nested-json", "`ldlm train` on a .jsonl line nested 100,000 deep",
             data("deep.jsonl", b'{"text": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n")),
        Case("train-latin1", "`ldlm train` on a Latin-1 file", data("latin1.txt", "caf\xe9 au lait\n".encode("latin-1"))),
        Case("train-two-runs", "two `ldlm train` on one --out at once", two_trainings, one_refused, concurrent=True),
        Case("train-into-export", "`ldlm train --out EXPORT`, then `ldlm info EXPORT`", train_into_export,
             export_loads),
        Case("generate-n-negative", "`ldlm generate -n -5 --output F`",
             lambda d: [cli("generate", str(fx.checkpoint), "-n", "-5", "--output", str(d / "o.jsonl"))]),
        Case("generate-n-zero", "`ldlm generate -n 0`", lambda d: [cli("generate", str(fx.checkpoint), "-n", "0")]),
        Case("num-beams-huge", "`ldlm generate -n 1 --num-beams 100000`",
             lambda d: [cli("generate", str(fx.checkpoint), "-n", "1", "--num-beams", "100000", *settings)]),
        Case("guidance-unconditional", "`--guidance 3` on an unconditional model",
             lambda d: [cli("generate", str(fx.checkpoint), "-n", "1", "--guidance", "3", *settings)]),
        Case("tokenizer-mismatch", "a checkpoint's tokenizer two tokens longer than its decoder", tokenizer_mismatch),
        Case("export-std-nan", "an export whose latent std is all NaN", export_std_nan),
    ]


def limit_memory(gib: float) -> Callable[[], None]:
    def apply() -> None:
        limit = int(gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


def run_case(case: Case, fx: Fixtures, timeout: float, memory_gib: float) -> tuple[str, Run]:
    with tempfile.TemporaryDirectory(dir=fx.root) as tmp:
        d = Path(tmp)
        commands = case.prepare(d)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        start = time.perf_counter()
        if case.concurrent:
            procs = [subprocess.Popen(c, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      env=env, text=True, preexec_fn=limit_memory(memory_gib)) for c in commands]
            results = [p.communicate(timeout=timeout) for p in procs]
            runs = [Run(p.returncode, out, err, time.perf_counter() - start) for p, (out, err) in zip(procs, results)]
            everything = Run(runs[-1].rc, "".join(r.out for r in runs), "".join(r.err for r in runs), runs[-1].seconds)
            detail = case.judge(d, everything) if case.judge else ""
            outcome = " / ".join(f"job {i + 1}: {describe(r, '', timeout)}" for i, r in enumerate(runs))
            return f"{outcome}; {detail}".replace(f"{d}/", ""), runs[-1]
        else:
            for command in commands:
                try:
                    p = subprocess.run(command, input=case.stdin, capture_output=True, text=True, env=env,
                                       timeout=timeout, preexec_fn=limit_memory(memory_gib))
                    run = Run(p.returncode, p.stdout, p.stderr, time.perf_counter() - start)
                except subprocess.TimeoutExpired as e:
                    run = Run(None, str(e.stdout or ""), str(e.stderr or ""), timeout)
        outcome = describe(run, case.judge(d, run) if case.judge else "", timeout, api=commands[-1][1] == "-c")
        return outcome.replace(f"{d}/", "").replace(f"{fx.root}/", ""), run


def describe(run: Run, detail: str, timeout: float, api: bool = False) -> str:
    """What happened, in one line: the exit, or the error the user saw (an API call raises; a CLI that shows a
    traceback is flagged), then the case's own check."""
    if run.rc is None:
        status = f"still running after {timeout:.0f} s"
    elif run.rc < 0:
        status = f"killed by signal {-run.rc}"
    elif run.rc == 0:
        status = "accepted"
    else:
        lines = [line for line in run.err.strip().splitlines() if line.strip() and not line.startswith(" ")]
        last = lines[-1] if lines else f"exit {run.rc}"
        traceback = "Traceback (most recent call last):" in run.err
        status = ("raises " if api else "TRACEBACK: " if traceback else "") + last.replace("|", "/")[:150]
    return f"{status}; {detail}" if detail else status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per command (default 60)")
    parser.add_argument("--memory-gib", type=float, default=8.0, help="address-space limit per command (default 8)")
    parser.add_argument("--only", nargs="+", help="run these cases only")
    parser.add_argument("--json", help="also write the outcomes to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fx = Fixtures(Path(tmp))
        rows = []
        for case in cases(fx):
            if args.only and case.name not in args.only:
                continue
            outcome, run = run_case(case, fx, args.timeout, args.memory_gib)
            rows.append({"case": case.name, "what": case.what, "outcome": outcome, "seconds": round(run.seconds, 1)})
            print(f"{case.name}: {outcome} ({run.seconds:.1f} s)", file=sys.stderr, flush=True)
    print("| case | attack | outcome | s |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['case']} | {r['what']} | {r['outcome']} | {r['seconds']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

"""The manifest of an export directory: what each graph is, what it expects, and a hash of every file.

It is plain JSON read with the standard library only, so the ONNX runtime path needs neither torch.onnx nor
onnx to check an export before loading it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = "ldlm-onnx"
FORMAT_VERSION = 1
GRAPHS = ("encoder", "reverse", "decoder_prefill", "decoder_step")


class ExportError(ValueError):
    """An export directory that cannot be used; the message names the file and what to do."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory` except the manifest, by relative POSIX path."""
    return {p.relative_to(directory).as_posix(): sha256(p)
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}


def write_manifest(directory: Path, manifest: dict) -> Path:
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": hash_files(directory)}
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=2))
    return path


def is_export(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def read_manifest(directory: str | Path, verify_hashes: bool = True) -> dict:
    """The manifest, after checking its format and (by default) every file's hash against it."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ExportError(f"{path} is missing: {directory} is not an ldlm ONNX export; write one with "
                          "`ldlm export CHECKPOINT OUTDIR`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path} is not valid JSON ({e}): re-run `ldlm export`") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{path} is not an ldlm ONNX manifest (no \"format\": \"{FORMAT}\")")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path} has format_version {manifest.get('format_version')!r}; this ldlm reads "
                          f"{FORMAT_VERSION}: re-export with this version (`ldlm export`)")
    for key in ("model", "latent_stats", "graphs", "files", "tokenizers", "decoder"):
        if key not in manifest:
            raise ExportError(f"{path} lacks the field {key!r}: re-run `ldlm export`")
    if verify_hashes:
        for name, expected in manifest["files"].items():
            file = directory / name
            if not file.is_file():
                raise ExportError(f"{file} is missing (listed in {MANIFEST}): the export is incomplete; re-run "
                                  "`ldlm export` or restore the file")
            if sha256(file) != expected:
                raise ExportError(f"{file} does not match its hash in {MANIFEST}: it was changed or corrupted; "
                                  "re-run `ldlm export` or restore the file")
    return manifest

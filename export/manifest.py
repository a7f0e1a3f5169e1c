"""The manifest of an export directory: what each graph is, what it expects, and a hash of every file.

It is plain JSON, so the ONNX runtime path needs neither torch.onnx nor onnx to check an export before
loading it. An export is data someone else may have written: the loader opens only files inside the folder,
each listed in the manifest and verified against its hash.
"""

from __future__ import annotations

import json
from pathlib import Path

from ldlm.model.model_files import ModelFileError, folder_files, inside
from ldlm.paths import file_sha256 as sha256

MANIFEST = "manifest.json"
FORMATS = {"ldlm-onnx": "onnx", "ldlm-aoti": "aoti"}  # the manifest's "format" -> the graphs' format
FORMAT_VERSION = 1
GRAPHS = ("encoder", "reverse", "decoder_prefill", "decoder_step")
AOTI_IO_METADATA = "ldlm_io"  # the key of an AOTInductor package's metadata that lists its inputs and outputs
SIGNATURE = "signature"  # this user's HMAC-SHA256 of the rest of the manifest (exports holding native code)


class ExportError(ModelFileError):
    """An export directory that cannot be used; the message names the file and what to do."""


def hash_files(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory` except the manifest, by relative POSIX path."""
    return {name: sha256(directory / name) for name in folder_files(directory) if name != MANIFEST}


def _signed_bytes(manifest: dict) -> bytes:
    """What a signature covers: the manifest without its signature, canonical JSON. Its "files" holds every
    other file's sha256, so the signature covers the whole export."""
    return json.dumps({k: v for k, v in manifest.items() if k != SIGNATURE}, sort_keys=True,
                      separators=(",", ":")).encode()


def signed_by_this_user(manifest: dict) -> bool:
    """Whether the manifest carries this user's signature (ldlm.paths.signing_key): proof that this user's ldlm
    wrote the export on this machine, so long as read_manifest has checked every file against its hash."""
    from ldlm.paths import signed_here

    return signed_here(_signed_bytes(manifest), manifest.get(SIGNATURE))


def write_manifest(directory: Path, manifest: dict, graph_format: str = "onnx", *, sign: bool = False) -> Path:
    """Write the manifest with every file's hash; `sign` adds this user's HMAC of it (for exports that hold
    native code: ldlm loads those without consent only when it can prove that this user wrote them)."""
    kind = {v: k for k, v in FORMATS.items()}[graph_format]
    manifest = {"format": kind, "format_version": FORMAT_VERSION, **manifest, "files": hash_files(directory)}
    if sign:
        from ldlm.paths import sign as hmac_sign

        manifest[SIGNATURE] = hmac_sign(_signed_bytes(manifest))
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=2))
    return path


def is_export(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def graph_format(manifest: dict) -> str:
    """"onnx" or "aoti": which runtime an export's graphs are for (read_manifest checked the format)."""
    return FORMATS[manifest["format"]]


def _opened_files(directory: Path, manifest: dict) -> list[str]:
    """The files the loader opens besides the manifest, relative to the export folder: every graph and its
    external data, and everything in the tokenizer folders; each name checked to stay inside the folder."""
    names = []
    graphs, tokenizers = manifest["graphs"], manifest["tokenizers"]
    if not isinstance(graphs, dict) or not all(isinstance(v, dict) for v in graphs.values()):
        raise ExportError(f"{directory / MANIFEST} has a malformed \"graphs\" field: re-run `ldlm export`")
    for variant, specs in graphs.items():
        for name, spec in specs.items():
            if not isinstance(spec, dict):
                raise ExportError(f"{directory / MANIFEST}: graph {variant}/{name} is not an object: re-run "
                                  "`ldlm export`")
            for key in ["file", *(["external_data"] if "external_data" in spec else [])]:
                inside(directory, spec.get(key), f"graph {variant}/{name}'s {key!r} in {MANIFEST}")
                names.append(Path(spec[key]).as_posix())
    if not isinstance(tokenizers, dict):
        raise ExportError(f"{directory / MANIFEST} has a malformed \"tokenizers\" field: re-run `ldlm export`")
    for role, folder in tokenizers.items():
        path = inside(directory, folder, f"the {role} tokenizer folder in {MANIFEST}")
        if not path.is_dir():
            raise ExportError(f"{path} is missing (the {role} tokenizer): re-run `ldlm export` or restore it")
        names += [f"{Path(folder).as_posix()}/{name}" for name in folder_files(path)]
    return names


def read_manifest(directory: str | Path, verify_hashes: bool = True) -> dict:
    """The manifest, after checking its format, that every file in the folder is listed in it and every path it
    names stays inside the folder, and (by default) every file's hash: the loader opens nothing unverified."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ExportError(f"{path} is missing: {directory} is not an ldlm ONNX export; write one with "
                          "`ldlm export CHECKPOINT OUTDIR`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path} is not valid JSON ({e}): re-run `ldlm export`") from e
    if not isinstance(manifest, dict) or manifest.get("format") not in FORMATS:
        raise ExportError(f"{path} is not an ldlm export manifest (its \"format\" is none of {sorted(FORMATS)})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path} has format_version {manifest.get('format_version')!r}; this ldlm reads "
                          f"{FORMAT_VERSION}: re-export with this version (`ldlm export`)")
    for key in ("model", "latent_stats", "graphs", "files", "tokenizers", "encoder", "decoder"):
        if not isinstance(manifest.get(key), dict):
            raise ExportError(f"{path} lacks the field {key!r} (an object): re-run `ldlm export`")
    try:
        _check_listing(directory, manifest)
    except ModelFileError as e:
        raise ExportError(str(e)) from e
    if verify_hashes:
        for name, expected in manifest["files"].items():
            if sha256(directory / name) != expected:
                raise ExportError(f"{directory / name} does not match its hash in {MANIFEST}: it was changed or "
                                  "corrupted; re-run `ldlm export` or restore the file")
    return manifest


def file_hash(directory: Path, manifest: dict, name: str) -> str:
    """The sha256 the manifest (read by read_manifest) lists for the file `name` names."""
    wanted = inside(directory, name, f"the file {name!r} in {MANIFEST}").resolve()
    for listed, digest in manifest["files"].items():
        if (directory / listed).resolve() == wanted:
            return digest
    raise ExportError(f"{MANIFEST} names {name} but does not list its hash under \"files\": re-run `ldlm export`")


def _check_listing(directory: Path, manifest: dict) -> None:
    """Files on disk, files listed and files the loader opens: the same set, all inside the folder."""
    files = manifest["files"]
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise ExportError(f"{directory / MANIFEST}: \"files\" must map each file to its sha256; re-run `ldlm export`")
    listed = {inside(directory, name, f"the file entry {name!r} in {MANIFEST}").relative_to(directory).as_posix()
              for name in files}
    on_disk = set(folder_files(directory)) - {MANIFEST}
    for name in sorted(listed - on_disk):
        raise ExportError(f"{directory / name} is missing (listed in {MANIFEST}): the export is incomplete; re-run "
                          "`ldlm export` or restore the file")
    for name in sorted(on_disk - listed):
        raise ExportError(f"{directory / name} is not listed in {MANIFEST}, so its hash cannot be checked: every "
                          "file of an export must be listed; remove the file, or re-run `ldlm export`")
    for name in _opened_files(directory, manifest):
        if name not in listed:
            raise ExportError(f"{MANIFEST} names {name} as a graph file but does not list it under \"files\": "
                              "re-run `ldlm export`")

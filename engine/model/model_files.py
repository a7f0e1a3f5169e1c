"""What ldlm reads from a model folder: files inside the folder, architectures it knows, weights whose sizes match.

A checkpoint or an export is data, often written by someone else. transformers runs Python shipped beside a
config that names it (`auto_map`) once the user answers a prompt, resolves names it does not find on disk
against the model hub, and builds a model's modules from its config before reading a weight. So every folder
ldlm loads is checked here first, from its JSON and the safetensors headers alone:

- every file under the folder resolves inside it (no symlink out, no `..`, nothing but files and folders);
- a model config names an architecture ldlm runs (BERT-family encoders, GPT-2) and no custom code;
- a tokenizer config names a tokenizer class of transformers itself and no custom code;
- the weights' shapes, read from their headers, are the ones the config builds (checked on the meta device,
  which allocates nothing), so a hostile config cannot make the loader allocate more than the files hold;

and transformers then loads it with trust_remote_code=False and local files only.
"""

from __future__ import annotations

import contextlib
import json
import re
import stat
from collections.abc import Callable
from pathlib import Path

import torch

# model_type values of the encoders ldlm pools (AutoModel gives last_hidden_state from input_ids + attention_mask)
ENCODER_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet", "camembert", "albert",
                       "deberta-v2", "modernbert")
DECODER_MODEL_TYPES = ("gpt2",)
# tokenizer_class values transformers implements itself (the slow and fast names of each family ldlm loads);
# `TokenizersBackend` and `PreTrainedTokenizerFast` wrap a tokenizer.json without any model-specific code
TOKENIZER_CLASSES = frozenset(
    {"PreTrainedTokenizerFast", "TokenizersBackend", "GPT2Tokenizer", "GPT2TokenizerFast"}
    | {f"{family}Tokenizer{fast}" for family in ("Bert", "Roberta", "XLMRoberta", "DistilBert", "Electra", "MPNet",
                                                 "Camembert", "Albert", "DebertaV2") for fast in ("", "Fast")}
)
# the stack of blocks in each encoder family's weights (BERT's `encoder.layer.N.`); ALBERT shares one block
ENCODER_LAYER_STACKS = {"distilbert": "transformer.layer", "modernbert": "layers", "albert": None}
# a hub id as the hub spells them: NAME or OWNER/NAME
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_hub_id(name: str) -> bool:
    """NAME or OWNER/NAME, and no folder of that name here (a path is never taken for a hub id)."""
    return bool(_HUB_ID.match(name)) and not Path(name).exists()


class ModelFileError(ValueError):
    """A model folder ldlm will not read; the message names the file and what to do."""


def inside(root: Path, name: object, what: str) -> Path:
    """root / name, where `name` (from a manifest or config) must be a relative path that stays inside root,
    symlinks resolved."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ModelFileError(f"{what} is {name!r}: it must be a file name relative to {root}")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise ModelFileError(f"{what} is {name!r}, outside {root}: ldlm reads only files inside the folder it "
                             "loads; the folder was written by hand or tampered with")
    path = root / relative
    if not path.resolve().is_relative_to(root.resolve()):
        raise ModelFileError(f"{what} ({path}) resolves to {path.resolve()}, outside {root} (a symlink): ldlm reads "
                             "only files inside the folder it loads; replace the link with the file itself")
    return path


def folder_files(root: Path) -> list[str]:
    """The relative POSIX paths of every file under `root`, after checking that each entry is a regular file or
    folder that resolves inside it (a symlink within the folder is followed; one out of it, a FIFO or a device
    is refused)."""
    base, files = root.resolve(), []
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        target = path.resolve()
        if not target.is_relative_to(base):
            raise ModelFileError(f"{path} is a link to {target}, outside {root}: ldlm reads only files inside the "
                                 "folder it loads; replace the link with the file itself")
        mode = target.stat().st_mode
        if stat.S_ISREG(mode):
            files.append(name)
        elif not stat.S_ISDIR(mode):
            raise ModelFileError(f"{path} is not a regular file (a pipe, socket or device): remove it from {root}")
    return files


def read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileError(f"{path} is missing: {what} is incomplete; restore it or save it again") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path} is not valid JSON ({e}): {what} is corrupt; restore it or save it again") from e
    if not isinstance(value, dict):
        raise ModelFileError(f"{path} holds a JSON {type(value).__name__}, not an object: {what} is corrupt")
    return value


def _no_custom_code(config: dict, path: Path) -> None:
    for key in ("auto_map", "custom_pipelines"):
        if key in config:
            raise ModelFileError(f"{path} asks to run custom code ({key!r}): ldlm never runs code from a model "
                                 "folder; use a model of a standard architecture, saved without custom code")


def check_model_folder(folder: Path, model_types: tuple[str, ...], what: str) -> dict:
    """The folder's config.json, once it names one of `model_types` and no custom code."""
    path = folder / "config.json"
    config = read_json(path, what)
    _no_custom_code(config, path)
    if config.get("model_type") not in model_types:
        raise ModelFileError(f"{path} is a {config.get('model_type')!r} model; {what} must be one of "
                             f"{list(model_types)}")
    check_tokenizer_folder(folder, what)
    return config


def check_tokenizer_folder(folder: Path, what: str) -> None:
    """A tokenizer folder loads with transformers' own classes: no custom code, a class transformers defines."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.txt").is_file():
            raise ModelFileError(f"{folder} holds no tokenizer (tokenizer.json or tokenizer_config.json): {what} is "
                                 "incomplete; restore it or save it again")
        return
    config = read_json(path, what)
    _no_custom_code(config, path)
    name = config.get("tokenizer_class")
    if name is not None and name not in TOKENIZER_CLASSES:
        raise ModelFileError(f"{path} names tokenizer class {name!r}, which ldlm does not load; {what} must use one "
                             f"of {sorted(TOKENIZER_CLASSES)}")


def local_folder(name_or_path: str, what: str, *, download: bool = False) -> Path:
    """A pretrained model as a local folder: a path that exists, or a hub id from the local Hugging Face cache
    (downloaded first only with download=True, where the user named it themselves)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if not is_hub_id(name_or_path):
        raise ModelFileError(f"{what} {name_or_path!r} is neither a folder nor a hub id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name_or_path, local_files_only=not download))
    except LocalEntryNotFoundError as e:
        raise ModelFileError(f"{what} {name_or_path!r} is not in the local Hugging Face cache and ldlm does not "
                             f"download while loading: fetch it once (`hf download {name_or_path}`), or save the "
                             "model with its encoder bundled") from e
    except Exception as e:  # the hub client's errors: not found, gated, offline
        raise ModelFileError(f"{what} {name_or_path!r} could not be fetched ({type(e).__name__}: {e}): pass a local "
                             "folder") from e


@contextlib.contextmanager
def transformers_bars_off():
    """No "Loading weights" / "Writing model shards" bars from transformers on the user's terminal while ldlm
    loads or saves, unless they asked transformers for them (verbosity info or debug:
    `transformers.logging.set_verbosity_info()`)."""
    from transformers.utils import logging as hf_logging

    silence = hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() > hf_logging.INFO
    if silence:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if silence:
            hf_logging.enable_progress_bar()


def load_pretrained(cls, folder: Path, **kwargs):
    """`cls.from_pretrained` on a checked local folder: no custom code, no network, no bars."""
    with transformers_bars_off():
        return cls.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True, **kwargs)


def check_model_weights(folder: Path, config, layers_stack: str | None, what: str) -> None:
    """A transformers model folder's safetensors weights against its config (a PretrainedConfig): pickled
    weights (pytorch_model.bin) are refused, one model.safetensors is shape-checked before loading."""
    from transformers import MODEL_MAPPING

    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if not single.is_file():
        if index.is_file():
            return  # sharded (gigabytes, never a bundled encoder): transformers checks each shard as it loads it
        raise ModelFileError(f"{folder} holds no model.safetensors: ldlm loads safetensors weights only (never "
                             f"pickle); convert {what} to safetensors")
    layers = {layers_stack: config.num_hidden_layers} if layers_stack else {}
    model_class = MODEL_MAPPING[type(config)]  # the base model (BertModel, GPT2Model): its keys, less any head's
    check_weight_shapes(lambda: model_class(config), single, layers, f"{folder / 'config.json'}",
                        strip_prefix=f"{model_class.base_model_prefix}.")


def header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, without reading the weights (the library checks that the
    header's offsets fit the file)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ModelFileError(f"{path} is missing: the model is incomplete; restore it or save it again")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"{path} is not a readable safetensors file ({e}): it is corrupt; restore it") from e


def check_weight_shapes(build: Callable[[], torch.nn.Module], path: Path, layers: dict[str, int], what: str, *,
                        strip_prefix: str = "") -> None:
    """Refuse a config whose modules would not match the weights in `path`, before building them for real.

    `layers` maps each stack of blocks to the count the config asks for (e.g. {"blocks": 4}); it is compared
    with the header's keys first, since building a hostile count of blocks takes long even on the meta device.
    Then `build()` runs on the meta device (no memory) and every tensor's shape is compared; a tensor tied to
    another (GPT-2's LM head is its embedding) is stored once, under either name. `strip_prefix`: a prefix the
    file's keys may carry that the built module's do not (a base model saved inside a model with a head)."""
    shapes = {k.removeprefix(strip_prefix) if strip_prefix else k: v for k, v in header_shapes(path).items()}
    for stack, count in layers.items():
        pattern = re.compile(rf"^{re.escape(stack)}\.(\d+)\.")
        found = {int(m.group(1)) for k in shapes if (m := pattern.match(k))}
        stored = max(found) + 1 if found else 0
        if stored != count:
            raise ModelFileError(f"{what} asks for {count} {stack!r} blocks, {path} holds {stored}: the config does "
                                 "not belong to these weights; restore the model's config")
    with torch.device("meta"):
        tensors = build().state_dict(keep_vars=True)
    names_of: dict[int, list[str]] = {}
    for name, tensor in tensors.items():
        names_of.setdefault(id(tensor), []).append(name)
    wrong, missing = [], []
    for names in names_of.values():
        expected = tuple(tensors[names[0]].shape)
        stored = [shapes[n] for n in names if n in shapes]
        if not stored:
            missing.append(names[0])
        elif any(s != expected for s in stored):
            wrong.append(f"{names[0]}: file {stored[0]} vs config {expected}")
    if wrong or missing:
        problems = ([f"shapes differ for {wrong[:3]}"] if wrong else []) + \
            ([f"missing {sorted(missing)[:3]}"] if missing else [])
        raise ModelFileError(f"{path} does not match {what}: " + "; ".join(problems))

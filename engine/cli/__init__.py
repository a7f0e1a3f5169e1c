"""The `ldlm` command line: train, generate, reconstruct, vary, eval, baseline, bench, export, info, demo; one module
per command group, each adding its parsers (and the command each runs) to the one parser."""

from __future__ import annotations

import argparse
import sys

from ldlm.cli import bench, demo, evaluate, export, generate, train
from ldlm.runtimes.backends import BackendUnavailable

COMMAND_GROUPS = (train, generate, evaluate, bench, export, demo)  # in the order --help lists them
COMMANDS = {name: run for group in COMMAND_GROUPS for name, run in group.COMMANDS.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldlm", description="Latent diffusion language models: train, sample, decode.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.add_parsers(sub)
    return parser


# the pip extra that brings each optional package (pyproject.toml), for a one-line error when it is missing
EXTRA_OF_MODULE = {"sacrebleu": "eval", "mauve": "eval", "wordfreq": "eval", "onnx": "onnx", "onnxscript": "onnx",
                   "onnxruntime": "onnx", "ray": "ray", "matplotlib": "bench", "triton": "gpu"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight loading/saving bars say nothing to a CLI user
    from ldlm.model.checkpoint import CheckpointError

    try:
        COMMANDS[args.command](args)
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError, FloatingPointError, BackendUnavailable) as e:
        print(f"ldlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read or write the system refused (disk full, permissions): say where
        where = f" ({e.filename})" if e.filename else ""
        print(f"ldlm {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        extra = EXTRA_OF_MODULE.get((e.name or "").split(".")[0])
        if extra is None:  # not an optional package: a broken install, whose traceback helps
            raise
        print(f"ldlm {args.command}: error: this needs {e.name}, which is not installed: "
              f"pip install 'ldlm[{extra}]'", file=sys.stderr)
        return 2
    return 0

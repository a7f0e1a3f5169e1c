"""What the commands share: flags several take, reading a text file a flag names, loading the model, printing
results."""

from __future__ import annotations

import argparse
import json
import sys

from ldlm.model.config import SAMPLER_NAMES, TRAINING_PRECISIONS
from ldlm.runtimes.backends import BACKENDS


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default=None,
                   help="reverse-diffusion sampler (default: the checkpoint's, dpm++2m 20 for preset small; "
                        "ddpm always runs every timestep)")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps of ddim or dpm++2m (default: the checkpoint's, or 50 and 20)")
    p.add_argument("--eta", type=float, default=0.0, help="ddim noise scale: 0 deterministic, 1 ancestral (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise generator (default 0)")


def add_common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-beams", type=int, default=4, help="beams in the decoder's beam search (default 4)")
    p.add_argument("--device", default="cpu", help="torch device to run on, e.g. cpu or cuda (default cpu)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="implementation: auto picks an export directory's own (onnx or aoti), cuda-graph on CUDA "
                        "with triton, else reference")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="engine compute dtype (default float32, the parity mode; the reference is float32 only; "
                        "onnx runs float32 or float16 graphs)")
    p.add_argument("--onnx-provider", choices=["auto", "cpu", "cuda"], default="auto",
                   help="onnx backend: ONNX Runtime provider (default auto: CUDA if installed and --device cuda)")
    p.add_argument("--onnx-threads", type=int, default=0, help="onnx backend: intra-op threads (default 0: all cores)")
    p.add_argument("--onnx-opt-level", choices=["disable", "basic", "extended", "all"], default="all",
                   help="onnx backend: graph optimization level (default all)")
    p.add_argument("--int8", action="store_true",
                   help="onnx backend: run the int8 graphs (reverse transformer and decoder step; about 2x faster on "
                        "the CPU, E2E quality unchanged, most texts as fp32's)")
    p.add_argument("--onnx-cuda-graph", action="store_true",
                   help="onnx backend on CUDA: replay the reverse graph as ONNX Runtime CUDA graphs in the sampling loop")
    add_trust_flag(p)
    p.add_argument("--json", action="store_true", help="print one JSON object per line instead of plain text")
    p.add_argument("--no-progress", action="store_true", help="turn progress bars off")


def add_trust_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-native-code", action="store_true",
                   help="load an AOTInductor export that someone else wrote: its packages are native code that "
                        "runs when loaded (without the flag, only your own exports from this machine load)")


def add_training_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu",
                   help="torch device to train on, e.g. cuda (default cpu); the data drawn does not depend on it")
    p.add_argument("--precision", choices=TRAINING_PRECISIONS, default="fp32",
                   help="fp32, or bf16 autocast for the matmuls (weights, optimizer and losses stay fp32; "
                        "default fp32)")


def read_text_file(path: str, flag: str) -> str:
    """A UTF-8 text file named by a flag, with errors that name it."""
    from ldlm.inputs import read_user_file

    try:
        return read_user_file(path, flag, "a text file").decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {path} is not UTF-8 text ({e.reason} at byte {e.start}): re-encode it as "
                         "UTF-8") from None


def texts_from_args(args) -> list[str]:
    texts = list(args.texts)
    if args.file:
        texts += [line.strip() for line in read_text_file(args.file, "--file").splitlines() if line.strip()]
    if not texts:
        raise SystemExit("give texts as arguments or --file FILE (one text per line)")
    return texts


def print_results(args, inputs: list[str | None], outputs: list[str], first_index: int = 0, **settings) -> None:
    for i, (source, text) in enumerate(zip(inputs, outputs), start=first_index):
        if args.json:
            record = {"index": i, "text": text, **({"input": source} if source is not None else {}), **settings}
            print(json.dumps(record, ensure_ascii=False))
        else:
            print(text)


def onnx_options(args):
    from ldlm.runtimes.onnx_session import OnnxOptions

    return OnnxOptions(provider=args.onnx_provider, intra_op_threads=args.onnx_threads,
                       optimization_level=args.onnx_opt_level, int8_reverse=args.int8,
                       int8_decoder=args.int8, cuda_graph=args.onnx_cuda_graph)


def load_pipeline(args):
    from ldlm.pipeline import load

    pipe = load(args.checkpoint, device=args.device, backend=args.backend, dtype=args.dtype,
                onnx_options=onnx_options(args), trust_native_code=args.trust_native_code)
    print(f"backend: {pipe.backend} ({pipe.backend_reason})", file=sys.stderr)
    return pipe

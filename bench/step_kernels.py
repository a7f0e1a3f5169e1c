"""Kernels the engine launches per sampling step: every ATen op that does work (views and allocations left out)
in one step of the fused sampling loop, plus its Triton kernels (the fused update, the fused residual adds and
layer norms). Each is a launch on a GPU, which a
CUDA graph replays without the host but still runs one after another, so fewer, larger kernels make a faster
step. Runs on the CPU; the ops are the same on a GPU, where a few (attention, with several latent tokens)
launch more than one kernel each.

    python bench/step_kernels.py --preset base --batch 64
    python bench/step_kernels.py --preset base --batch 64 --decode    # one token of the beam decode
"""

from __future__ import annotations

import argparse
import os
from collections import Counter

os.environ.setdefault("TRITON_INTERPRET", "1")  # the engine imports its Triton kernel; it is not run here

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402

from ldlm.beam_search import BeamSearchConfig  # noqa: E402
from ldlm.benchmark import bench_components  # noqa: E402
from ldlm.config import ModelConfig  # noqa: E402
from ldlm.fused_sampler import FusedSampler  # noqa: E402
from ldlm.reverse import ReverseTransformer  # noqa: E402
from ldlm.schedule import NoiseSchedule  # noqa: E402
from ldlm.static_beam_search import StaticBeamSearch  # noqa: E402
from ldlm.step_tables import ddpm_tables  # noqa: E402

NO_KERNEL = {"view", "expand", "as_strided", "unsqueeze", "slice", "select", "t", "transpose", "permute", "split",
             "split_with_sizes", "_reshape_alias", "alias", "empty", "empty_strided", "empty_like", "detach",
             "_unsafe_view", "unbind", "squeeze", "lift_fresh"}


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in NO_KERNEL:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _counted_add_layer_norm(counter: CountOps):
    """The fused add + norm Triton kernel as one counted kernel; its torch equivalent runs uncounted."""
    def add_layer_norm(h, y, norm):
        counter.ops["add_layer_norm (Triton)"] += 1
        with _disable_current_modes():
            h.add_(y)
            return h, F.layer_norm(h, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return add_layer_norm


def step_kernels(preset: str, batch: int) -> Counter:
    """Ops of one sampling step of the engine's loop (DDPM, a noise draw)."""
    config = ModelConfig.from_preset(preset)
    sampler = FusedSampler(ReverseTransformer(config).eval(), ddpm_tables(NoiseSchedule.from_config(config)),
                           device="cpu", graphs=False, fused_norms=True)  # as on a GPU
    counter = CountOps()
    sampler.fused_update = lambda *args, **kwargs: None  # counted as one kernel below
    sampler.denoiser.add_layer_norm = _counted_add_layer_norm(counter)
    buf = sampler._buffers_for((batch, *config.latent_shape))
    with torch.no_grad(), counter:
        sampler._one_step(buf, torch.Generator().manual_seed(0), draw=True, from_table=False)
    counter.ops["fused_update (Triton)"] += 1
    return counter.ops


def decode_kernels(preset: str, batch: int, num_beams: int = 4) -> Counter:
    """Ops of one token of the engine's static-KV beam decode (GPT-2 step, beam selection, cache reorder)."""
    decoder = bench_components(preset).decoder.eval()
    tokens = min(64, decoder.gpt2.config.n_positions - decoder.config.n_prefix)  # the cache's length changes no count
    config = BeamSearchConfig(num_beams=num_beams, max_new_tokens=tokens)
    search = StaticBeamSearch(decoder, batch_size=batch, config=config, fused_norms=True)  # as on a GPU
    counter = CountOps()
    search.model.add_layer_norm = _counted_add_layer_norm(counter)
    with torch.no_grad():
        state = search._prefill()
        with counter:
            search.decode_step(state)
    return counter.ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--decode", action="store_true", help="count a beam-decode token (4 beams) instead")
    args = parser.parse_args()
    if args.decode:
        ops, what = decode_kernels(args.preset, args.batch), "kernels per decoded token (4 beams)"
    else:
        ops, what = step_kernels(args.preset, args.batch), "kernels per sampling step"
    print(f"{args.preset}, batch {args.batch}: {sum(ops.values())} {what}")
    for name, count in ops.most_common():
        print(f"  {count:3d}  {name}")


if __name__ == "__main__":
    main()

"""Kernels the engine launches per sampling step, or per decoded token (ldlm.fast.launches counts them on the CPU).

    python bench/gpu/step_kernels.py --preset base --batch 64
    python bench/gpu/step_kernels.py --preset base --batch 64 --decode    # one token of the beam decode
    python bench/gpu/step_kernels.py --preset base --batch 64 --fused-blocks   # every matmul fused with its neighbours
"""

from __future__ import annotations

import argparse

from ldlm.jobs.benchmark import bench_components
from ldlm.fast.launches import decode_kernels, step_kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--decode", action="store_true", help="count a beam-decode token (4 beams) instead")
    parser.add_argument("--fused-blocks", action="store_true", help="the step with ldlm.kernels.fused_linear")
    args = parser.parse_args()
    if args.decode:
        decoder = bench_components(args.preset).decoder.eval()
        ops, what = decode_kernels(decoder, args.batch), "kernels per decoded token (4 beams)"
    else:
        ops, what = step_kernels(args.preset, args.batch, fused_blocks=args.fused_blocks), "kernels per sampling step"
    print(f"{args.preset}, batch {args.batch}: {sum(ops.values())} {what}")
    for name, count in ops.most_common():
        print(f"  {count:3d}  {name}")


if __name__ == "__main__":
    main()

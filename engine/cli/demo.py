"""`ldlm demo`: the embedded default, trained once and cached, then sampled."""

from __future__ import annotations


def add_parsers(sub) -> None:
    p = sub.add_parser("demo", help="train the small preset on text shipped with Python (cached), then sample")
    p.add_argument("--data", nargs="+", metavar="FILE", help="train on these files instead of Python's documentation")
    p.add_argument("--cache-dir", default=None, help="where the trained demo model is kept (default ~/.cache/ldlm)")
    # the defaults are ldlm.demo's DEMO_*_STEPS, written out so that --help imports no torch (a test checks them)
    p.add_argument("--decoder-steps", type=int, default=400,
                   help="decoder training steps (default 400: about 8 minutes all told on an idle 2-core CPU)")
    p.add_argument("--diffusion-steps", type=int, default=300, help="reverse transformer training steps (default 300)")
    p.add_argument("-n", "--num-samples", type=int, default=5, help="unconditional samples to print (default 5)")
    p.add_argument("--no-progress", action="store_true", help="turn progress bars off")


def cmd_demo(args) -> None:
    from ldlm.demo import run_demo

    run_demo(data=args.data, cache_dir=args.cache_dir, decoder_steps=args.decoder_steps,
             diffusion_steps=args.diffusion_steps, num_samples=args.num_samples, progress=not args.no_progress)


# the command each parser of this group runs
COMMANDS = {"demo": cmd_demo}

"""CLI and import start-up: the median of ten fresh processes each of `ldlm --help`, `ldlm generate --help`,
a usage error, and `python -c "import ldlm"`, in wall time and CPU time (issue 19).

    python bench/cpu/cli_startup.py                          # the installed ldlm
    python bench/cpu/cli_startup.py --before /tmp/old        # and, interleaved in the same run, a copy of an older
                                                         # ldlm package put first on PYTHONPATH

The runs of the two alternate, so a busy machine slows both alike; CPU time (user + system of the child) is
less sensitive to other load than wall time.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "ldlm --help": [shutil.which("ldlm") or "ldlm", "--help"],
    "ldlm generate --help": [shutil.which("ldlm") or "ldlm", "generate", "--help"],
    "ldlm generate (usage error)": [shutil.which("ldlm") or "ldlm", "generate"],
    "python -c 'import ldlm'": [sys.executable, "-c", "import ldlm"],
}


def run_once(argv: list[str], pythonpath: str | None) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one fresh process."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", help="a folder holding an older `ldlm` package, timed beside the installed one")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    versions = {"installed": None, **({"before": args.before} if args.before else {})}
    times = {(name, v): [] for name in COMMANDS for v in versions}
    for _ in range(args.runs):
        for name, argv in COMMANDS.items():
            for version, path in versions.items():
                times[(name, version)].append(run_once(argv, path))
    header = "| command | " + " | ".join(f"{v} wall | {v} CPU" for v in versions) + " |"
    print(header + "\n|" + " --- |" * (1 + 2 * len(versions)))
    for name in COMMANDS:
        cells = []
        for version in versions:
            runs = times[(name, version)]
            cells += [f"{statistics.median(w for w, _ in runs):.2f} s", f"{statistics.median(c for _, c in runs):.2f} s"]
        print(f"| `{name}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

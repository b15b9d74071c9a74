"""CLI: ``python -m spacache_kernels.compile_check [--write-docs docs/kernels.md] [--json PATH]``."""

from __future__ import annotations

import argparse
import json
import sys

from spacache_kernels.compile_check.check import ARCHS, run_parallel, run_worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spacache_kernels.compile_check", description=__doc__)
    parser.add_argument(
        "--arch", default=",".join(str(a) for a in ARCHS), help="compute capabilities, e.g. 90,80"
    )
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one arch each)")
    parser.add_argument("-k", dest="case_filter", default=None, help="only cases whose label contains this")
    parser.add_argument(
        "--full", action="store_true", help="every integer specialization, and fp16 too (slower)"
    )
    parser.add_argument("--json", default=None, help="write all results here")
    parser.add_argument("--write-docs", default=None, help="write the markdown resource report here")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        result = run_worker(args.worker, args.case_filter, args.full)
        with open(args.out, "w") as fh:
            json.dump(result, fh)
        return 0

    try:
        archs = tuple(int(a) for a in args.arch.split(","))
    except ValueError:
        parser.error(f"--arch: expected comma-separated integers such as 90,80, got {args.arch!r}")
    bad = [a for a in archs if a not in ARCHS]
    if bad:
        parser.error(f"--arch: supported are {ARCHS}, got {bad}")
    result = run_parallel(archs, args.case_filter, args.jobs, args.full)
    from spacache_kernels.compile_check.report import render_markdown, summary_lines

    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    if args.write_docs:
        with open(args.write_docs, "w") as fh:
            fh.write(render_markdown(result))
    lines, failed = summary_lines(result)
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

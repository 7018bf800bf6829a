"""``dhvae remote`` (or ``dhvae-remote``): the service from a terminal, with progress bars.

export DHVAE_URL=http://127.0.0.1:8000 DHVAE_API_KEY=$(cat data/dev-api-key)
dhvae remote upload path/to/cohort/               # prints the cohort id
dhvae remote augment COHORT --n-pairs 500 --preset small --steps 2000 --wait --download augmented/
dhvae remote status JOB [--wait]
dhvae remote download JOB augmented/
dhvae remote evaluate COHORT --n-pairs 250 500 --seeds 5 --wait
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .client import Client, Job
from .errors import IntegrityError, JobFailed, ServiceError

DEFAULTS = argparse.ArgumentDefaultsHelpFormatter


def build_parser(prog: str = "dhvae-remote") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    ap.add_argument(
        "--url",
        default=os.environ.get("DHVAE_URL", "http://127.0.0.1:8000"),
        help="the service (env DHVAE_URL)",
    )
    ap.add_argument("--key", default=os.environ.get("DHVAE_API_KEY"), help="API key (env DHVAE_API_KEY)")
    ap.add_argument("--key-file", type=Path, help="read the API key from this file (e.g. data/dev-api-key)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--json", action="store_true", help="print the service's JSON instead of a summary")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("upload", help="upload a cohort folder or zip", formatter_class=DEFAULTS)
    p.add_argument("path", type=Path, help="a cohort folder (zipped on the fly) or a .zip")

    def job_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--wait", action="store_true", help="follow the job until it ends")
        p.add_argument(
            "--download", type=Path, metavar="DIR", help="after --wait, download and verify the dataset here"
        )

    p = sub.add_parser(
        "augment", help="train on a cohort and generate pairs (one job)", formatter_class=DEFAULTS
    )
    p.add_argument("cohort", help="cohort id (from upload)")
    p.add_argument("--n-pairs", type=int, required=True, help="synthetic pairs to generate")
    p.add_argument("--steps", type=int, default=300, help="training steps")
    p.add_argument("--preset", default="tiny", help="model size: tiny, small or paper")
    p.add_argument("--model", default="dhvae", help="generator")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    job_options(p)

    p = sub.add_parser(
        "evaluate", help="does augmenting this cohort help? (an evaluation job)", formatter_class=DEFAULTS
    )
    p.add_argument("cohort", help="cohort id")
    p.add_argument("--n-pairs", type=int, nargs="+", default=[250, 500], help="the N > 0 to try")
    p.add_argument("--seeds", type=int, default=5, help="U-Net seeds")
    p.add_argument("--preset", default="tiny", help="generator size")
    p.add_argument("--steps", type=int, default=300, help="generator training steps")
    p.add_argument("--wait", action="store_true", help="follow the job and print the report's verdicts")

    p = sub.add_parser("status", help="a job's state and progress", formatter_class=DEFAULTS)
    p.add_argument("job", help="job id")
    p.add_argument("--wait", action="store_true", help="follow the job until it ends")

    p = sub.add_parser(
        "download", help="download, unzip and verify a job's dataset", formatter_class=DEFAULTS
    )
    p.add_argument("job", help="job id")
    p.add_argument("dest", type=Path, help="folder to unzip into")

    p = sub.add_parser("cancel", help="cancel a job", formatter_class=DEFAULTS)
    p.add_argument("job", help="job id")
    return ap


def verdict_words(report: dict[str, Any]) -> str:
    """The report's recommendation, or its step-matched verdict, in one sentence per method."""
    if isinstance(report.get("recommendation"), dict):
        return str(report["recommendation"].get("words", ""))
    verdict: dict[str, Any] = report.get("verdict", {})
    v: dict[str, Any] = verdict.get("step_matched") or next(iter(verdict.values()), {})
    lines = [
        f"{name}: best N = {m['best_n']}, {100 * m['best']:.1f} % {v.get('metric')} "
        f"({100 * m['gain']:+.1f} points vs real-only{', beyond the seed spread' if m['beyond_seed_spread'] else ''})"
        for name, m in v.get("methods", {}).items()
    ]
    return "\n".join(lines) or "the report has no verdict"


def _print_job(job: Job, as_json: bool) -> None:
    print(json.dumps(job.data, indent=2) if as_json else repr(job))


def main(argv: list[str] | None = None, prog: str = "dhvae-remote") -> int:
    args = build_parser(prog).parse_args(argv)
    key = args.key_file.read_text().strip() if args.key_file else args.key
    if not key:
        print(f"{prog}: no API key: pass --key, --key-file or set DHVAE_API_KEY", file=sys.stderr)
        return 2
    client = Client(args.url, key, progress=not args.no_progress)
    try:
        if args.command == "upload":
            cohort = client.upload_cohort(args.path)
            print(json.dumps(cohort.data, indent=2) if args.json else cohort.id)
            for w in cohort.warnings:
                print(f"warning: {w}", file=sys.stderr)
            return 0
        if args.command == "augment":
            job = client.augment(
                args.cohort,
                n_pairs=args.n_pairs,
                steps=args.steps,
                preset=args.preset,
                model=args.model,
                seed=args.seed,
            )
        elif args.command == "evaluate":
            job = client.evaluate(
                args.cohort, n_pairs=args.n_pairs, seeds=args.seeds, preset=args.preset, steps=args.steps
            )
        elif args.command == "cancel":
            job = client.job(args.job).cancel()
        else:
            job = client.job(args.job)
        if args.command == "download":
            print(job.download(args.dest))
            return 0
        if getattr(args, "wait", False):
            job.wait()
        _print_job(job, args.json)
        if args.command == "evaluate" and job.state == "succeeded":
            print(verdict_words(job.report()))
        if getattr(args, "download", None):
            print(job.download(args.download))
        return 0
    except (ServiceError, JobFailed, IntegrityError, FileNotFoundError, ValueError, TimeoutError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())

"""``dhvae``: the command line. ingest | train | generate | augment | presets.

    dhvae augment --cohort ../shared/data/brats2015-deepmedic/train --preset tiny \\
        --steps 30 --n-pairs 12 --seed 7 --out augmented
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from imaging import __version__
from imaging.errors import CohortError, DHVAEError
from models.config import PRESETS
from models.registry import AUGMENTATIONS, DEFAULT, TRAINED

log = logging.getLogger("dhvae")
DEFAULTS = argparse.ArgumentDefaultsHelpFormatter  # every --help shows each flag's default


class ProgressBar:
    """Adapts :class:`imaging.progress.Progress` reports to one tqdm bar per stage."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar: Any = None
        self.stage: str | None = None

    def __call__(self, p) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if p.stage != self.stage:
            self.close()
            self.stage = p.stage
            self.bar = tqdm(total=p.total, initial=p.done, unit=p.unit, desc=p.stage, file=sys.stderr)
        self.bar.n = p.done
        keys = ("loss", "hvae", "rec", "lambda", "disc", "slices_per_s")
        post = {k: f"{p.metrics[k]:.4g}" for k in keys if k in p.metrics}
        if post:
            self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``--set loss.alpha=0.01 --set flow.beta0_convention=code`` -> dotted overrides (JSON values)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise DHVAEError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _cohort_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cohort", type=Path, required=True, help="cohort folder (nnU-Net, MSD or one folder per case)"
    )
    p.add_argument(
        "--channel", default="flair", help="image channel to model (default flair; PET cohorts: pet)"
    )
    p.add_argument("--label-rule", default="whole", help='"whole" (label > 0) or e.g. "labels:1,4"')
    p.add_argument(
        "--pet", action="store_true", help="robust percentile normalisation instead of per-slice min-max"
    )
    p.add_argument("--cache-dir", type=Path, default=Path(".cache/dhvae"), help="preprocessing cache")


def _train_args(p: argparse.ArgumentParser, models: tuple[str, ...]) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT,
        choices=models,
        help="generator: the dHVAE (default) or a baseline; augment also takes a donor insertion "
        "(insert_dhvae, insert_healthy_dhvae: a dHVAE's tumours pasted into the cohort's slices)",
    )
    p.add_argument("--preset", default="small", choices=sorted(PRESETS), help="see `dhvae presets`")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-model", type=Path, help="checkpoint to fine-tune from")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable"
    )
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")


def _gen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-pairs", type=int, required=True)
    p.add_argument("--slices-per-volume", type=int, default=1)
    p.add_argument("--min-mask-area", type=int, default=None, help="pixels (default 200 at 128x128, scaled)")
    p.add_argument(
        "--keep-background",
        dest="zero_background",
        action="store_false",
        help="keep the generator's grey background (default: 0 outside the brain, as in the real cases)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dhvae",
        description="Discriminative Hamiltonian VAE data augmentation",
        formatter_class=DEFAULTS,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does (INFO)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    # `dhvae remote ...` is the service's client (dhvae_client.cli); main() hands it over before parsing
    sub.add_parser(
        "remote",
        help="talk to a running service: upload, augment, status, download, evaluate",
        add_help=False,
    )

    p = sub.add_parser(
        "ingest", help="validate and preprocess a cohort; print its summary", formatter_class=DEFAULTS
    )
    _cohort_args(p)

    p = sub.add_parser("train", help="train (or fine-tune) a model on a cohort", formatter_class=DEFAULTS)
    _cohort_args(p)
    _train_args(p, TRAINED)
    p.add_argument("--model-dir", type=Path, required=True)

    p = sub.add_parser(
        "generate", help="generate synthetic pairs from a trained model", formatter_class=DEFAULTS
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="a trained model (MODEL_DIR/model.pt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default=None)
    _gen_args(p)

    p = sub.add_parser(
        "augment",
        help="ingest + train + generate: the augmented dataset in nnU-Net layout",
        formatter_class=DEFAULTS,
    )
    _cohort_args(p)
    _train_args(p, AUGMENTATIONS)
    _gen_args(p)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--real-cases",
        choices=["resampled", "uploaded"],
        default="resampled",
        help="the real cases in the dataset: resampled as the model saw them, or as uploaded (original "
        "grid, spacing and intensities)",
    )
    p.add_argument("--model-dir", type=Path, default=None, help="default: OUT/../.OUT.model")

    p = sub.add_parser(
        "presets", help="print every preset's config and parameter counts", formatter_class=DEFAULTS
    )
    p.add_argument("--json", action="store_true")
    return parser


def _presets(as_json: bool) -> int:
    from models.dhvae import DHVAE
    from models.network import count_parameters

    rows = {}
    for name, cfg in PRESETS.items():
        m = DHVAE(cfg)  # every preset is a dHVAE
        counts = {
            "encoder": count_parameters(m.encoder),
            "decoder": count_parameters(m.decoder),
            "discriminator": count_parameters(m.discriminator) if m.discriminator is not None else 0,
        }
        counts["total"] = sum(counts.values())
        rows[name] = {"config": cfg.to_dict(), "parameters": counts}
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        for name, r in rows.items():
            c = r["parameters"]
            described = r["config"]
            net, train, loss = described["network"], described["train"], described["loss"]
            print(
                f"{name:6s} C={net['base_channels']:<4d} encoder {c['encoder']:>11,d}  "
                f"decoder {c['decoder']:>11,d}  discriminator {c['discriminator']:>10,d}  total {c['total']:>11,d}"
            )
            print(
                f"       res blocks {net['num_res_blocks']}, channel mult {tuple(net['channel_mult'])}, "
                f"batch {train['batch_size']}, lr {train['lr']:g}, precision {train['precision']}, "
                f"alpha {loss['alpha']:g}, disc_start {loss['disc_start']}, perceptual {loss['perceptual']}"
            )
        print("(every field: dhvae presets --json)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["remote"]:
        from dhvae_client.cli import main as remote

        return remote(argv[1:], prog="dhvae remote")
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.command == "presets":
        return _presets(args.json)

    from imaging.cohort import CohortSpec
    from imaging.preprocess import PreprocessConfig
    from pipeline import pipeline

    bar = ProgressBar(enabled=not args.no_progress)
    flags = vars(args)
    try:
        if args.command == "generate":
            sample = pipeline.spec_from(pipeline.SampleSpec, flags)
            r = pipeline.generate(args.checkpoint, sample, out_dir=args.out, progress=bar, device=args.device)
            bar.close()
            print(
                f"{r.n_pairs} synthetic pairs in {r.out_dir} (acceptance {r.acceptance:.1%} of {r.draws} draws)"
            )
            return 0

        spec = CohortSpec(channel=args.channel, label_rule=args.label_rule)
        prep = PreprocessConfig(normalisation="pet_percentile" if args.pet else "minmax")
        ing = pipeline.ingest(args.cohort, cache_dir=args.cache_dir, spec=spec, prep=prep, progress=bar)
        if args.command == "ingest":
            bar.close()
            print(json.dumps(ing.summary, indent=2))
            return 0
        training = pipeline.spec_from(
            pipeline.TrainSpec, flags, base_checkpoint=args.base_model, overrides=parse_overrides(args.set)
        )
        if args.command == "train":
            ckpt = pipeline.train(ing, training, model_dir=args.model_dir, progress=bar, device=args.device)
            bar.close()
            print(f"model written to {ckpt}")
            return 0
        sample = pipeline.spec_from(pipeline.SampleSpec, flags)
        aug = pipeline.augment(
            ing,
            training,
            sample,
            out_dir=args.out,
            model_dir=args.model_dir,
            progress=bar,
            device=args.device,
        )
        bar.close()
        print(
            f"augmented dataset: {aug.out_dir} ({len(aug.ingest['cases'])} real cases + "
            f"{aug.generation.n_pairs} synthetic pairs from {args.model}, nnU-Net v2 raw layout)"
            + (f"; model: {aug.checkpoint}" if aug.checkpoint else "")
        )
        if aug.generation.resumed_from:
            print(
                f"(continued an earlier run in {aug.out_dir}: {aug.generation.resumed_from} pairs were already "
                "there, made with the same settings; delete the folder to start afresh)"
            )
        return 0
    except (DHVAEError, KeyError) as e:
        bar.close()
        message = str(e)
        if isinstance(e, CohortError) and getattr(args, "cohort", None) is not None:
            message = message.replace("  - .: ", f"  - {args.cohort}: ")  # the cohort folder itself
        print(f"dhvae: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        bar.close()
        print("dhvae: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

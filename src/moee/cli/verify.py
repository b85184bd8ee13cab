"""`moee verify PATH...`: recompute the digests an artefact records and compare (one line per
artefact); exit 0 when all match, 1 on a mismatch, 2 on a path that is no known artefact."""

from __future__ import annotations

import argparse


def add_verify(sub: argparse._SubParsersAction) -> None:
    """`moee verify`: check checkpoints and exports against the digests they record."""
    ve = sub.add_parser("verify", help="check a checkpoint or an export against the digests it "
                        "records (a flipped byte, an edited config)")
    ve.add_argument("paths", nargs="+", metavar="PATH",
                    help="a moee checkpoint folder, a Mixtral export folder, a GGUF file or an "
                    "ONNX file")
    ve.set_defaults(func=cmd_verify)


def cmd_verify(args: argparse.Namespace) -> int:
    from moee.export.verify import verify_path

    worst = 0
    for path in args.paths:
        verdict = verify_path(path)
        print(f"{path}: {verdict.message}", flush=True)
        worst = max(worst, verdict.status)
    return worst

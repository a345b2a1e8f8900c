"""``medgain infer``: the partner's one command — verify a package strictly, then run its inference."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medgain.cli._args import bounded

_UNSIGNED_BANNER = (
    "medgain infer: WARNING: --allow-unsigned: NO SIGNATURE IS CHECKED. The files are checked against the "
    "package's own manifest only; whoever changed the package could have changed the manifest too."
)


def _run_infer(args: argparse.Namespace) -> int:
    from medgain.partner import UNSIGNED_NOTICE, run_partner_inference
    from medgain.registry import PackageVerificationError

    if args.allow_unsigned:
        print(_UNSIGNED_BANNER, file=sys.stderr)
    try:
        result = run_partner_inference(
            args.package, args.input, args.output, public_key=args.public_key, allow_unsigned=args.allow_unsigned,
            pseudonymise_outputs=args.pseudonymise_outputs, input_csv=args.input_csv, num_workers=args.num_workers,
        )
    except PackageVerificationError as err:
        print(f"medgain infer: REFUSED, nothing was run: {err}", file=sys.stderr)
        return 1
    manifest = result["manifest"]
    checked = "signature and hashes" if result["signed"] else f"hashes only, UNSIGNED (see {UNSIGNED_NOTICE})"
    print(f"{args.package}: verified ({checked}); {manifest['model']} version {manifest['version']}")
    print(f"predictions: {result['output']}")
    if result["shareable"] is not None:
        print(f"shareable copy: {result['shareable']} (mapping kept in {result['output'] / 'pseudonym_map.csv'})")
    return 0


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """``medgain infer``: the partner's one command — verify a package strictly, then run its inference."""
    infer = subparsers.add_parser(
        "infer",
        help="verify a partner package (signature, then every file) and run its inference",
        description="Verify PACKAGE (zip or unpacked folder) strictly: the Ed25519 signature over manifest.json, "
        "then every entry listed, none missing, duplicated or linked, each file's size and sha256. The files are "
        "copied into a new private folder as they are hashed and the package's inference runs from there, in "
        "this process, with nothing of the package on Python's import path. A failure exits 1 naming the file "
        "and the reason, before any input is read. Outputs go to OUTPUT (new or empty), written whole or not at all.",
    )
    add = infer.add_argument
    add("package", type=Path, help="partner package zip or its unpacked folder")
    key = infer.add_mutually_exclusive_group(required=True)
    key.add_argument("--public-key", type=Path, help="signer's Ed25519 public key (PEM)")
    key.add_argument("--allow-unsigned", action="store_true",
                     help="check the hashes only, with no signature (said in the output and in OUTPUT)")
    add("--input", type=Path, required=True, help="folder of the images to score")
    add("--output", type=Path, required=True, help="output folder (must not exist, or be empty)")
    add("--input-csv", type=Path, help="clinical metadata table, for packages whose inference takes one")
    add("--pseudonymise-outputs", action="store_true",
        help="also write OUTPUT/shareable/ keyed by salted pseudonyms; the mapping stays in OUTPUT/pseudonym_map.csv")
    add("--num-workers", type=bounded(int, 0), help="data loader workers (default: the package's)")
    infer.set_defaults(func=_run_infer)

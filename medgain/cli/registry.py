"""``medgain review | promote | package | verify``: the model registry's review, gate and partner packages."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medgain.cli._args import bounded


def _run_review(args: argparse.Namespace) -> int:
    from medgain.registry import review_model

    review = review_model(
        args.model, args.version, args.data, args.out, split=args.split, against=args.against,
        tracking_uri=args.tracking_uri, n_bootstrap=args.n_bootstrap, gallery_size=args.gallery_size,
        bundles_dir=args.bundles_dir,
    )
    for name, figure in review["figures"].items():
        print(f"{review['split']}_{name:24s} {figure['value']:.4f}  [{figure['low']:.4f}, {figure['high']:.4f}]")
    print(f"report: {Path(args.out) / 'report.html'} (logged as {review['report_link']})")
    return 0


#: ``medgain promote`` exit codes: a usage error (bad arguments, gate file or alias) and a gate refusal differ
PROMOTE_USAGE, PROMOTE_REFUSED = 2, 3
_PROMOTE_EPILOG = """exit codes:
  0  promoted (or overridden with --reason)
  2  called wrongly: bad arguments, a malformed gate file (repeated or unknown key, a rule that is not
     '<figure> <op> <number>'), an unknown not_worse_than alias, an --alias that is neither
     champion / candidate / production nor held by the model without --new-alias, a first promotion not said
     with --first-champion, an unknown model or version
  3  refused: a failing gate rule (recorded on the version as promotion.<alias>.* tags), no review of this
     version's model file, or no finite operating threshold in its model file
  1  any other failure (e.g. the tracking server)"""


def _run_promote(args: argparse.Namespace) -> int:
    from medgain.registry import PromotionRefused, promote

    try:
        result = promote(
            args.model, args.version, args.alias, args.gate, args.reviewer, override=args.override,
            reason=args.reason, tracking_uri=args.tracking_uri, first_champion=args.first_champion,
            new_alias=args.new_alias,
        )
    except PromotionRefused as err:
        print(f"medgain promote: refused: {err}", file=sys.stderr)
        return PROMOTE_REFUSED
    except (ValueError, FileNotFoundError) as err:
        print(f"medgain promote: error: {err}", file=sys.stderr)
        return PROMOTE_USAGE
    for verdict in result["verdicts"]:
        value = "n/a" if verdict["value"] is None else f"{verdict['value']:.4f}"
        print(f"{'pass' if verdict['passed'] else 'FAIL'}  {verdict['rule']}  {value}  {verdict['why']}".rstrip())
    print(f"{args.model} version {args.version}: {result['decision']} to alias {args.alias!r}")
    return 0


def _run_package(args: argparse.Namespace) -> int:
    from medgain.registry import build_package

    manifest = build_package(
        args.model, args.out, tracking_uri=args.tracking_uri, sign_key=args.sign_key, wheel=args.wheel,
        include_wheel=not args.no_wheel, bundles_dir=args.bundles_dir, unpromoted=args.unpromoted,
    )
    signed = "signed" if "signing_key" in manifest else "UNSIGNED (partners must run it with --allow-unsigned)"
    promoted = "" if manifest["promoted"] else ", NOT PROMOTED (recorded in its model card)"
    print(f"{args.out}: {manifest['model']} version {manifest['version']}, {len(manifest['files'])} files, "
          f"{signed}{promoted}")
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    from medgain.registry import PackageVerificationError, verify_package

    if args.allow_unsigned:
        print("medgain verify: WARNING: --allow-unsigned: NO SIGNATURE IS CHECKED, only the files against the "
              "package's own manifest", file=sys.stderr)
    try:
        manifest = verify_package(args.package, args.public_key, allow_unsigned=args.allow_unsigned)
    except PackageVerificationError as err:
        print(f"medgain verify: FAILED: {err}", file=sys.stderr)
        return 1
    checked = "signature and hashes" if args.public_key else "hashes only, UNSIGNED: who made it is not checked"
    print(f"{args.package}: OK ({checked}); {manifest['model']} version {manifest['version']}")
    return 0


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """``medgain review | promote | package | verify``: the model registry's review, gate and partner packages."""
    tracking = {"help": "MLflow tracking / registry URI (default: $MLFLOW_TRACKING_URI)"}
    review = subparsers.add_parser(
        "review",
        help="evaluate a registered model version and write the reviewer's HTML report",
        description="Evaluate model NAME version V on a data split through its bundle's evaluate config; "
        "writes OUT/report.html (self-contained) and OUT/review.json, logs them on the version's run and links "
        "the report from the version.",
    )
    add = review.add_argument
    add("--model", required=True, help="registered model name")
    add("--version", required=True, help="model version")
    add("--data", type=Path, required=True,
        help="the evaluated data: a datalist JSON, a dermoscopy CSV, or the bundle's data folder (whole-slide, "
        "dermoscopy: dataset_dir)")
    add("--split", default="test", help="datalist split (default: %(default)s)")
    add("--against", help="alias of the model compared with on the same data (e.g. champion)")
    add("--out", type=Path, required=True, help="output folder")
    add("--n-bootstrap", type=bounded(int, 10), default=1000, help="bootstrap resamples (default: %(default)s)")
    add("--gallery-size", type=bounded(int, 0), default=8, help="frames per gallery category (default: %(default)s)")
    add("--bundles-dir", type=Path, help="folder of the bundle folders (default: the repository's bundles/)")
    add("--tracking-uri", **tracking)
    review.set_defaults(func=_run_review)
    promote = subparsers.add_parser(
        "promote",
        help="check a reviewed version against a gate and move a registry alias to it",
        description="Check the rules of GATE against the version's review; on pass move ALIAS to the version. "
        "The decision (reviewer, time, gate hash, each rule's value and verdict) is recorded as version tags.",
        epilog=_PROMOTE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = promote.add_argument
    add("--model", required=True, help="registered model name")
    add("--version", required=True, help="model version")
    add("--alias", default="champion",
        help="alias moved on pass: champion, candidate, production or one the model holds (default: %(default)s)")
    add("--new-alias", action="store_true",
        help="--alias is a new alias (refused otherwise, so that a typo creates none; recorded)")
    add("--gate", type=Path, required=True, help="gate YAML (rules, not_worse_than)")
    add("--reviewer", required=True, help="who decides (recorded)")
    add("--override", action="store_true", help="promote although rules fail (needs --reason; recorded)")
    add("--reason", help="why the gate is overridden")
    add("--first-champion", action="store_true",
        help="this promotion makes the first holder of the gate's not_worse_than alias (refused when one exists)")
    add("--tracking-uri", **tracking)
    promote.set_defaults(func=_run_promote)
    package = subparsers.add_parser(
        "package",
        help="a reviewed model version as an offline MONAI bundle zip for a partner hospital",
        description="Build a MONAI bundle zip (standalone inference, evaluate config, weights, TorchScript, model "
        "card, review report, LICENSE, medgain wheel, manifest with sha256 and size of every file, Ed25519 "
        "signature with --sign-key). The version must hold a promoted alias (champion / production) unless "
        "--unpromoted is given.",
    )
    add = package.add_argument
    add("--model", required=True, help="NAME@ALIAS or NAME@VERSION, e.g. capsule_endoscopy_gain@champion")
    add("--out", type=Path, required=True, help="zip file written")
    add("--sign-key", type=Path, help="Ed25519 private key (PEM) signing the manifest")
    add("--wheel", type=Path, help="medgain wheel to include (default: built from this source tree)")
    add("--no-wheel", action="store_true", help="leave the wheel out (requirements.txt pins medgain)")
    add("--unpromoted", action="store_true",
        help="package a version that holds no champion / production alias (recorded in its model card)")
    add("--bundles-dir", type=Path, help="folder of the bundle folders (default: the repository's bundles/)")
    add("--tracking-uri", **tracking)
    package.set_defaults(func=_run_package)
    verify = subparsers.add_parser(
        "verify",
        help="check a partner package's signature and files strictly",
        description="Check a package (zip or unpacked folder): the Ed25519 signature over manifest.json first, "
        "then that every entry is listed and no listed file is missing, duplicated, linked or at an unsafe path, "
        "then each file's size and sha256. Exits 1 naming the file and the reason. To run a package, use "
        "`medgain infer`, which does this check itself.",
    )
    verify.add_argument("package", type=Path, help="package zip or unpacked folder")
    key = verify.add_mutually_exclusive_group(required=True)
    key.add_argument("--public-key", type=Path, help="signer's Ed25519 public key (PEM)")
    key.add_argument("--allow-unsigned", action="store_true", help="check the hashes only, with no signature (loud)")
    verify.set_defaults(func=_run_verify)

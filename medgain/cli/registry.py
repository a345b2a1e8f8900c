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


def _run_promote(args: argparse.Namespace) -> int:
    from medgain.registry import PromotionRefused, promote

    try:
        result = promote(
            args.model, args.version, args.alias, args.gate, args.reviewer, override=args.override,
            reason=args.reason, tracking_uri=args.tracking_uri,
        )
    except PromotionRefused as err:
        print(f"medgain promote: refused: {err}", file=sys.stderr)
        return 2
    for verdict in result["verdicts"]:
        value = "n/a" if verdict["value"] is None else f"{verdict['value']:.4f}"
        print(f"{'pass' if verdict['passed'] else 'FAIL'}  {verdict['rule']}  {value}  {verdict['why']}".rstrip())
    print(f"{args.model} version {args.version}: {result['decision']} to alias {args.alias!r}")
    return 0


def _run_package(args: argparse.Namespace) -> int:
    from medgain.registry import build_package

    manifest = build_package(
        args.model, args.out, tracking_uri=args.tracking_uri, sign_key=args.sign_key, wheel=args.wheel,
        include_wheel=not args.no_wheel, bundles_dir=args.bundles_dir,
    )
    signed = "signed" if "signing_key" in manifest else "unsigned"
    print(f"{args.out}: {manifest['model']} version {manifest['version']}, {len(manifest['files'])} files, {signed}")
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    from medgain.registry import PackageVerificationError, verify_package

    try:
        manifest = verify_package(args.package, args.public_key, require_signature=args.require_signature)
    except PackageVerificationError as err:
        print(f"medgain verify: FAILED: {err}", file=sys.stderr)
        return 1
    checked = "hashes and signature" if args.public_key else "hashes (no public key: signer not checked)"
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
    )
    add = promote.add_argument
    add("--model", required=True, help="registered model name")
    add("--version", required=True, help="model version")
    add("--alias", default="champion", help="alias moved on pass (default: %(default)s)")
    add("--gate", type=Path, required=True, help="gate YAML (rules, not_worse_than)")
    add("--reviewer", required=True, help="who decides (recorded)")
    add("--override", action="store_true", help="promote although rules fail (needs --reason; recorded)")
    add("--reason", help="why the gate is overridden")
    add("--tracking-uri", **tracking)
    promote.set_defaults(func=_run_promote)
    package = subparsers.add_parser(
        "package",
        help="a reviewed model version as an offline MONAI bundle zip for a partner hospital",
        description="Build a MONAI bundle zip (standalone inference, evaluate config, weights, TorchScript, model "
        "card, review report, medgain wheel, manifest with sha256 of every file, optional Ed25519 signature).",
    )
    add = package.add_argument
    add("--model", required=True, help="NAME@ALIAS or NAME@VERSION, e.g. capsule_endoscopy_gain@champion")
    add("--out", type=Path, required=True, help="zip file written")
    add("--sign-key", type=Path, help="Ed25519 private key (PEM) signing the manifest")
    add("--wheel", type=Path, help="medgain wheel to include (default: built from this source tree)")
    add("--no-wheel", action="store_true", help="leave the wheel out (requirements.txt pins medgain)")
    add("--bundles-dir", type=Path, help="folder of the bundle folders (default: the repository's bundles/)")
    add("--tracking-uri", **tracking)
    package.set_defaults(func=_run_package)
    verify = subparsers.add_parser(
        "verify",
        help="check a partner package's file hashes and signature",
        description="Check every file of a package (zip or unpacked folder) against its manifest and, with "
        "--public-key, the Ed25519 signature; exits non-zero naming the first file that differs.",
    )
    verify.add_argument("package", type=Path, help="package zip or unpacked folder")
    verify.add_argument("--public-key", type=Path, help="signer's Ed25519 public key (PEM)")
    verify.add_argument("--require-signature", action="store_true", help="fail without a verified signature")
    verify.set_defaults(func=_run_verify)

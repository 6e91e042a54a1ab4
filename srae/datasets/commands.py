"""CLI subcommands ``srae synth birds|rooms`` and ``srae download cub|places|ade20k|vgg16|vgg19``."""

from __future__ import annotations

import argparse
from pathlib import Path

from srae import cli_types as T

DEFAULT_ROOT = Path("data/datasets")
# Where configs/cub.yaml and configs/places.yaml look (dataset.root), so that a dataset fetched
# with `srae download` is the one `srae run` finds rather than a second copy.
DEFAULT_ROOTS = {"cub": DEFAULT_ROOT / "cub", "places": DEFAULT_ROOT / "places", "ade20k": DEFAULT_ROOT / "places"}


def _synth(args: argparse.Namespace) -> int:
    from srae.datasets.synthetic import make_synthbirds, make_synthrooms

    make = make_synthbirds if args.kind == "birds" else make_synthrooms
    out = make(Path(args.out), classes=args.classes, per_class=args.per_class, size=args.size, seed=args.seed,
               design=args.design)
    print(out)
    return 0


def _download(args: argparse.Namespace) -> int:
    from srae.datasets.download import download
    from srae.errors import InputError

    if args.md5 is not None and args.url is None and args.name != "ade20k":
        # the built-in links serve the official files, which have their published checksums
        raise InputError(f"--md5 is for a file --url names (or a hand-placed ade20k zip); {args.name}'s "
                         "built-in link has its published checksum")
    root = Path(args.root) if args.root is not None else DEFAULT_ROOTS.get(args.name, DEFAULT_ROOT)
    if args.name not in ("vgg16", "vgg19") and root.exists() and not root.is_dir():
        raise InputError(f"--root {root}: is a file, not a directory")
    out = download(args.name, root, url=args.url, md5=args.md5, images=args.with_images,
                   retries=args.retries, timeout=args.timeout)
    print(out)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``synth`` and ``download`` subcommands."""
    p = subparsers.add_parser(
        "synth", help="generate a synthetic dataset (birds: CUB layout; rooms: ADE20K layout)",
        description="Generate a synthetic dataset with known class evidence, written in the real on-disk "
                    "format so the CUB / ADE20K readers load it. Deterministic for a seed; rerunning with the "
                    "same settings does nothing.",
    )
    p.add_argument("kind", choices=("birds", "rooms"))
    p.add_argument("--out", required=True, help="output directory (the dataset goes in a subfolder)")
    p.add_argument("--classes", type=int, default=4, help="number of classes (default 4)")
    p.add_argument("--per-class", type=int, default=48, help="images per class (default 48)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--seed", type=T.count(0), default=0, help="generator seed, >= 0 (default 0)")
    p.add_argument("--design", choices=("factorial", "unique"), default="factorial",
                   help="class design (default factorial): factorial shares every trait (rooms: object) between "
                        "two classes, so only a class's combination of traits tells it apart (rooms need 3 or "
                        "more classes); unique gives each class traits of its own when there are few classes")
    p.set_defaults(func=_synth)

    d = subparsers.add_parser(
        "download", help="download and unpack a dataset or pretrained VGG weights",
        description="Fetch CUB-200-2011, the Places365 categories and file lists, ADE20K (needs a registration "
                    "URL or a hand-placed zip) or torchvision's ImageNet VGG weights. Downloads resume, are "
                    "checked against their published checksums and are skipped when a verified copy exists. "
                    "VGG weights go to $TORCH_HOME/hub/checkpoints; --root is not used for them.",
    )
    d.add_argument("name", choices=("cub", "places", "ade20k", "vgg16", "vgg19"))
    d.add_argument("--root", default=None,
                   help=f"datasets directory (default: where configs/cub.yaml and places.yaml look: "
                        f"{DEFAULT_ROOTS['cub']} for cub, {DEFAULT_ROOTS['places']} for places and ade20k)")
    d.add_argument("--url", type=T.http_url, default=None,
                   help="use this http(s) URL instead of the built-in one (ADE20K: your link)")
    d.add_argument("--md5", type=T.md5, default=None,
                   help="md5 of the file --url names when it is not the official one (a repackaged mirror)")
    d.add_argument("--with-images", action="store_true", help="places: also fetch the 256 px images (~25 GB)")
    d.add_argument("--retries", type=T.count(0), default=4, help="retries per URL on transient errors (default 4)")
    d.add_argument("--timeout", type=T.seconds, default=60.0, help="socket timeout in seconds (default 60)")
    d.set_defaults(func=_download)

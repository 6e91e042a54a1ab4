"""``srae features CONFIG``: extract Z and logits of a dataset into the feature store.

This runs the feature stage on its own, for a dataset already on disk and a backbone
checkpoint already trained (``srae run`` does every stage, fitting the demo CNN and
generating or downloading the data as needed). Options override the config's values.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from srae.errors import InputError

log = logging.getLogger(__name__)


def read_dataset(kind: str, root: Path, *, class_names: list[str] | None = None,
                 places_root: Path | None = None, places_per_class: int | None = None):
    """The :class:`DatasetIndex` of a dataset on disk, read by the reader of its kind."""
    if kind in ("synthbirds", "cub"):
        from srae.datasets.cub import read_cub

        return read_cub(root, name=kind)
    from srae.datasets.ade20k import read_places_ade20k

    return read_places_ade20k(root, class_names=class_names, places_root=places_root,
                              places_per_class=places_per_class, name=kind)


def features_from_config(config, *, dataset_root: Path | None = None, checkpoint: Path | None = None,
                         store_root: Path | None = None, device: str | None = None,
                         batch_size: int | None = None, num_workers: int | None = None,
                         precision: str = "fp32", progress: bool = True) -> Path:
    """Extract the features described by an :class:`~srae.config.ExperimentConfig`.

    The dataset is read from ``dataset_root`` (default ``config.dataset.root``); the
    weights come from ``checkpoint`` (default ``config.backbone.checkpoint``; VGG without
    one uses the ImageNet weights of the torch hub cache). Returns the store's path.
    """
    from srae.backbones import build_backbone, load_backbone
    from srae.features import extract_features

    ds, bb_cfg, feat = config.dataset, config.backbone, config.features
    index = read_dataset(ds.kind, Path(dataset_root or ds.root), class_names=ds.class_names,
                         places_root=ds.places_root, places_per_class=ds.places_per_class)
    ckpt = checkpoint or bb_cfg.checkpoint
    if ckpt is None and bb_cfg.name == "demo_cnn":
        raise InputError("features: demo_cnn needs a trained checkpoint: pass --checkpoint or set "
                         "backbone.checkpoint (`srae run CONFIG` trains it)")
    if ckpt is not None and Path(ckpt).suffix == ".safetensors":
        backbone = load_backbone(ckpt)
        if backbone.name != bb_cfg.name or backbone.num_classes != index.num_classes:
            raise InputError(f"features: checkpoint {ckpt} holds {backbone.name} with {backbone.num_classes} "
                             f"classes; the config wants {bb_cfg.name} on {index.num_classes} classes")
    else:
        backbone = build_backbone(bb_cfg.name, index.num_classes, ckpt, pretrained=bb_cfg.pretrained,
                                  input_size=bb_cfg.input_size, seed=bb_cfg.fit.seed)
    return extract_features(
        index, backbone, Path(store_root or Path(config.cache_dir) / "features"), layer=feat.layer,
        device=device or config.stage_device(feat.device), batch_size=batch_size or feat.batch_size,
        num_workers=feat.num_workers if num_workers is None else num_workers, precision=precision,
        progress=progress)


def _run(args: argparse.Namespace) -> int:
    from srae.config import load_config
    from srae.features import open_features

    path = features_from_config(
        load_config(args.config), dataset_root=args.dataset_root, checkpoint=args.checkpoint,
        store_root=args.store_root, device=args.device, batch_size=args.batch_size,
        num_workers=args.workers, precision=args.precision, progress=not args.no_progress)
    fs = open_features(path)
    bad = len(fs.attrs.get("bad_inputs", []))
    print(f"{path}  ({len(fs)} images, Z {fs.z.shape[1]}-d, {fs.logits.shape[1]} classes"
          f"{f', {bad} unreadable' if bad else ''})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``features`` subcommand."""
    p = subparsers.add_parser(
        "features", help="extract Z (fc6) and logits of every image into the Zarr feature store",
        description="Run the CNN over every image of the config's dataset and store Z (fc6 after its ReLU) "
                    "and the logits in <cache_dir>/features/<fingerprint>.zarr. An interrupted run resumes "
                    "where it stopped; a finished store is reused. Needs the dataset on disk and, for the "
                    "demo CNN, a trained checkpoint (`srae run` does all stages).")
    p.add_argument("config", type=Path, help="experiment YAML file")
    p.add_argument("--dataset-root", type=Path, default=None, help="dataset directory (default: dataset.root)")
    p.add_argument("--checkpoint", type=Path, default=None, help="backbone weights (default: backbone.checkpoint)")
    p.add_argument("--store-root", type=Path, default=None, help="where stores go (default: <cache_dir>/features)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N (default: features.device)")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default: features.batch_size)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: features.num_workers)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="compute precision (stored as float32; part of the fingerprint)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)

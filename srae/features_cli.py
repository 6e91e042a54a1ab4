"""``srae features CONFIG``: extract Z and logits of a dataset into the feature store.

This runs the feature stage on its own, for a dataset already on disk and a backbone
already fitted (``srae run`` does every stage, fitting the backbone and generating or
downloading the data as needed). Options override the config's values. The dataset is
looked up where ``srae run`` keeps it (:func:`srae.datasets.common.dataset_dir`:
``<dataset.root>/<kind>-<hash>`` for synthetic data), and the weights where ``srae run``
leaves the fitted backbone (:func:`srae.fit_cache.fitted_dir`), so both commands explain
the same network.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from srae import cli_types as T
from srae.errors import InputError

CHECKPOINT_HINT = "<cache_dir>/backbones/<name>-<key>/model.safetensors"

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


def config_dataset_root(ds) -> Path:
    """The dataset directory of a :class:`~srae.config.DatasetConfig`: where ``srae run``
    generated or downloaded it; ``dataset.root`` itself when a dataset sits directly there
    (e.g. one written by ``srae synth``). A missing generated dataset is a one-line error."""
    from srae.datasets.common import dataset_dir

    path = dataset_dir(ds)
    if path.exists() or not ds.kind.startswith("synth"):
        return path
    root = Path(ds.root)
    if root.is_dir() and _holds_dataset(ds.kind, root):
        return root
    raise InputError(f"features: no generated {ds.kind} dataset at {path} (for these dataset.classes/per_class/"
                     "size/seed); `srae run CONFIG` generates it, or pass --dataset-root")


def _holds_dataset(kind: str, root: Path) -> bool:
    from srae.datasets.common import find_dataset_dir
    from srae.errors import SraeError

    try:
        find_dataset_dir(kind, root)
    except SraeError:
        return False
    return True


def config_weights(config, index) -> Path | None:
    """The weights ``srae run`` extracts features with for this config and dataset: with
    ``backbone.fit.epochs: 0``, ``backbone.checkpoint`` as it is (None: VGG's ImageNet
    weights); otherwise the finished fit ``srae run`` left in the cache
    (:func:`srae.fit_cache.fitted_dir`). No finished fit is a one-line error: features of
    the starting weights would silently explain another network (VGG with a random head)."""
    from srae.fit_cache import finished_fit, fitted_dir

    bb = config.backbone
    if bb.fit.epochs == 0:
        return None if bb.checkpoint is None else Path(bb.checkpoint)
    where = fitted_dir(config.cache_dir, bb, index.manifest_fingerprint(), index.num_classes)
    found = finished_fit(where)
    if found is None:
        raise InputError(f"features: no fitted {bb.name} for this config and dataset at {where} "
                         f"(backbone.fit.epochs {bb.fit.epochs}): run `srae run CONFIG` first, pass --checkpoint, "
                         "or set backbone.fit.epochs: 0 to use the starting weights as they are")
    log.info("features: using the %s that `srae run` fitted, %s", bb.name, found)
    return found


def features_from_config(config, *, dataset_root: Path | None = None, checkpoint: Path | None = None,
                         store_root: Path | None = None, device: str | None = None,
                         batch_size: int | None = None, num_workers: int | None = None,
                         precision: str = "fp32", progress: bool = True) -> Path:
    """Extract the features described by an :class:`~srae.config.ExperimentConfig`.

    The dataset is read from ``dataset_root`` (default: :func:`config_dataset_root`, where
    ``srae run`` put it); the weights come from ``checkpoint`` (default: those ``srae run``
    uses, :func:`config_weights`). Returns the store's path.
    """
    from srae.backbones import build_backbone, load_backbone
    from srae.devices import resolve_device
    from srae.features import extract_features

    ds, bb_cfg, feat = config.dataset, config.backbone, config.features
    if batch_size is not None and batch_size < 1:
        raise InputError(f"features: batch size {batch_size} must be >= 1")
    if num_workers is not None and num_workers < 0:
        raise InputError(f"features: workers {num_workers} must be >= 0")
    if device is not None:
        resolve_device(device)  # before the dataset is read and the backbone built
    if store_root is not None and Path(store_root).exists() and not Path(store_root).is_dir():
        raise InputError(f"features: store root {store_root} is a file, not a directory")
    root = Path(dataset_root) if dataset_root is not None else config_dataset_root(ds)
    index = read_dataset(ds.kind, root, class_names=ds.class_names,
                         places_root=ds.places_root, places_per_class=ds.places_per_class)
    ckpt = checkpoint if checkpoint is not None else config_weights(config, index)
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
        device=device or config.stage_device(feat.device),
        batch_size=feat.batch_size if batch_size is None else batch_size,
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
                    "where it stopped; a finished store is reused. Needs the dataset on disk and the backbone "
                    "`srae run` uses (`srae run` does all stages). The dataset is read where `srae run` keeps it "
                    "(<dataset.root>/<kind>-<hash> for synthetic data); the weights are the backbone `srae run` "
                    f"fitted for this config and dataset, found in {CHECKPOINT_HINT}, or backbone.checkpoint as "
                    "it is when backbone.fit.epochs is 0 (VGG without one: the ImageNet weights). --checkpoint "
                    "overrides both.")
    p.add_argument("config", type=Path, help="experiment YAML file")
    p.add_argument("--dataset-root", type=Path, default=None,
                   help="dataset directory (default: where `srae run` keeps the config's dataset)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help=f"backbone weights (default: those `srae run` uses: its fit in {CHECKPOINT_HINT}, "
                        "or backbone.checkpoint with fit.epochs 0)")
    p.add_argument("--store-root", type=Path, default=None, help="where stores go (default: <cache_dir>/features)")
    p.add_argument("--device", type=T.device, default=None, help="auto, cpu, cuda, cuda:N, mps (default: features.device)")
    p.add_argument("--batch-size", type=T.count(1), default=None, help="images per batch (default: features.batch_size)")
    p.add_argument("--workers", type=T.count(0), default=None, help="DataLoader workers (default: features.num_workers)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="compute precision (stored as float32; part of the fingerprint)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)

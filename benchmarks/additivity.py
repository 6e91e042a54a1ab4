"""Is a class logit the sum of its parts?  A diagnosis for concept separation (synthbirds).

For each class of a factorial synthbirds dataset and its fitted CNN (both from a pipeline
cache, e.g. one ``benchmarks/concept_sweep.py --root DIR`` wrote), test positives are redrawn
with evidence part a swapped, part b swapped, and both swapped (the same nuisance colours as
the single swaps). If y-hat were additive over the parts, the drop with both swapped would be
the sum of the single drops; the interaction ``drop(a+b) - drop(a) - drop(b)`` says how far
it is from that. A near-additive logit means an explanation with one x-feature per part
could be faithful: failing to separate the parts is then the explainer's doing.

    python -m benchmarks.additivity --root /tmp/cs --classes 4 12 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from srae.backbones import load_backbone
from srae.causal import draw_numbers, model_input
from srae.datasets import synthbirds as sb
from srae.datasets.counterfactual import counterfactuals, synth_params
from srae.datasets.cub import read_cub
from srae.fit_cache import MODEL_FILE, SUMMARY_FILE
from srae.masking import backbone_classifier

HERE = Path(__file__).resolve().parent


def _fitted(cache: Path, fingerprint: str) -> Path:
    """The backbone weights the pipeline fitted on the dataset with ``fingerprint``."""
    for summary in sorted(cache.glob(f"backbones/*/{SUMMARY_FILE}")):
        if json.loads(summary.read_text())["config"]["dataset"] == fingerprint:
            return summary.parent / MODEL_FILE
    raise SystemExit(f"no fitted backbone for dataset {fingerprint[:12]} under {cache}")


def interactions(root: Path, cache: Path, max_images: int = 16) -> list[dict]:
    """Per class: mean drops with a, b and both swapped, and the interaction."""
    stamps = sorted(root.rglob("synth.json"))
    if not stamps:
        raise SystemExit(f"no generated dataset under {root}")
    base = stamps[0].parent
    params, index = synth_params(base), read_cub(base.parent)
    bb = load_backbone(_fitted(cache, index.manifest_fingerprint()))
    classify = backbone_classifier(bb.model, bb.mean, bb.std)
    j = draw_numbers(index.images, int(params["per_class"]))
    out = []
    for c, pair in enumerate(sb.class_pairs(params)):
        a, b = sb.class_slots(pair)
        test = index.images[(index.images["split"] == "test") & (index.images["label"] == c)].sort_values("image_id")
        ys = []
        for i in test["image_id"].head(max_images):
            r = counterfactuals(params, c, int(j[int(i)]), [a, b, f"{a}+{b}"])
            imgs = [r["original"], r[a], r[b], r[f"{a}+{b}"]]
            ys.append(classify(np.stack([model_input(x, bb.input_size) for x in imgs]))[:, c])
        y = np.array(ys)
        da, db, dab = (y[:, 0] - y[:, k] for k in (1, 2, 3))
        out.append({"class": c, "parts": [a, b], "drop_a": float(da.mean()), "drop_b": float(db.mean()),
                    "drop_both": float(dab.mean()), "interaction": float((dab - da - db).mean())})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="How far is each class logit from a sum over its two evidence parts?")
    ap.add_argument("--root", type=Path, required=True, help="the --root of a concept_sweep run")
    ap.add_argument("--classes", type=int, nargs="+", default=[4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args(argv)
    lines = ["| classes | seed | class | parts | drop a | drop b | drop both | interaction (% of both) |",
             "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for classes, seed in ((k, s) for k in args.classes for s in args.seeds):
        for r in interactions(args.root / f"data-{classes}-{seed}", args.root / "cache"):
            share = r["interaction"] / r["drop_both"] if r["drop_both"] > 0 else float("nan")
            lines.append(f"| {classes} | {seed} | {r['class'] + 1} | {'+'.join(r['parts'])} | {r['drop_a']:.2f} | "
                         f"{r['drop_b']:.2f} | {r['drop_both']:.2f} | {r['interaction']:+.2f} ({share:+.0%}) |")
    text = "\n".join(lines)
    (HERE / "additivity.md").write_text("# Additivity of the class logit over its evidence parts "
                                        "(benchmarks/additivity.py)\n\n" + text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The demo's dataset and CNN, as `make demo` builds them: the CNN uses both evidence parts."""

from __future__ import annotations

from srae.causal import draw_numbers, measure_part_effects, summarise_effects
from srae.config import ExperimentConfig
from srae.datasets.counterfactual import synth_params
from srae.datasets.cub import read_cub
from srae.datasets.synthetic import make_synthbirds
from srae.fit import fit
from srae.masking import backbone_classifier


def test_the_demo_cnn_uses_both_evidence_parts_of_every_class(tmp_path):
    """Each class of the demo (factorial design) is told apart only by its two traits; the CNN
    fitted as the demo fits it must rest on both: each evidence part used, with at least 20% of
    the class's summed effect, and the non-evidence controls unused."""
    cfg = ExperimentConfig()
    d, f = cfg.dataset, cfg.backbone.fit
    root = make_synthbirds(tmp_path, classes=d.classes, per_class=d.per_class, size=d.size, seed=d.seed,
                           design=d.design)
    index = read_cub(tmp_path)
    res = fit(index, tmp_path / "fit", backbone=cfg.backbone.name, epochs=f.epochs, lr=f.lr, batch_size=f.batch_size,
              weight_decay=f.weight_decay, seed=f.seed, augment=f.augment, device="cpu", num_workers=0,
              progress=False)
    j = draw_numbers(index.images, d.per_class)
    test = index.images[index.images["split"] == "test"].sort_values("image_id")
    draws = [(int(i), int(c), int(j[int(i)])) for c, g in test.groupby("label")
             for i in g["image_id"].head(cfg.causal.max_images)]
    classify = backbone_classifier(res.backbone.model, res.backbone.mean, res.backbone.std)
    summary = summarise_effects(measure_part_effects(classify, synth_params(root), draws, res.backbone.input_size))
    for c, s in summary.groupby("category"):
        evidence, controls = s[s["evidence"]], s[~s["evidence"]]
        assert len(evidence) == 2 and evidence["used"].all(), s
        assert (evidence["share"] >= 0.2).all(), s
        assert not controls["used"].any(), s

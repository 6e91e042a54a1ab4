"""The Places path end to end: synthetic rooms in the ADE20K layout, locality from object masks."""

from pathlib import Path

import pandas as pd
from conftest import tiny_pipeline_config


def test_rooms_pipeline_scores_locality_on_object_masks(prefect_api, tmp_path):
    from flows.pipeline import pipeline

    cfg = tiny_pipeline_config(tmp_path, **{"dataset.kind": "synthrooms", "name": "tiny-rooms",
                                            "explainer.methods": ["SRAE", "NN"]})
    report = Path(pipeline(cfg))
    assert report.is_file()
    m = pd.read_parquet(report.parent / "metrics.parquet")
    assert {"SRAE", "NN", "ExcitationBP"} <= set(m["method"])
    loc = m[(m["metric"] == "locality") & (m["split"] == "test")]
    # object-mask locality is an entropy over the labelled objects: finite and non-negative
    assert set(loc["method"]) >= {"SRAE", "NN", "ExcitationBP"}
    assert (loc["value"] >= 0).all() and loc["value"].notna().all()
    assert set(m.loc[m["method"] == "SRAE", "category"]) == {0, 1}
    # synthetic rooms carry ground-truth evidence objects: concept recovery is scored in [0, 1]
    rec = m[m["metric"] == "concept_recovery"]["value"]
    assert len(rec) and rec.between(0, 1).all()

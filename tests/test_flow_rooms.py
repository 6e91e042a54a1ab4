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
    # the causal stage swaps each evidence object and a control object in counterfactual rooms
    import json

    from srae.datasets.synthrooms import ROOM_OBJECTS

    eff = m[m["metric"] == "part_effect"]
    parts = {(int(c), json.loads(h)["part"]) for c, h in zip(eff["category"], eff["hparams"])}
    rooms = ["bathroom", "bedroom"]
    assert parts == {(c, p) for c in (0, 1) for p in [*ROOM_OBJECTS[rooms[c]], "control"]}
    assert set(eff["method"]) == {"CNN"}

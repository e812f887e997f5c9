"""train.ablation's reading of a defaults build's record: the stage plan it prints comes from build.json or, for a
build of awaker-tiny alone, build-awaker.json (values this test writes)."""
import json

from moevl.train import ablation


def test_stage_plan_from_either_build_record(tmp_path):
    assert ablation.build_record(tmp_path) == {}
    plan = {"steps": {"awaker.1": 300, "awaker.2": 250, "moellava.moe": 400}, "batch": 16,
            "batches": {"awaker.1": 64}}
    (tmp_path / "build-awaker.json").write_text(json.dumps({"plan": plan}))
    assert ablation.stage_plan(ablation.build_record(tmp_path)) == {"awaker.1": "300 x 64", "awaker.2": "250 x 16"}
    (tmp_path / "build.json").write_text(json.dumps({"plan": {"steps": {"awaker.3": 5}, "batch": 2}}))
    assert ablation.stage_plan(ablation.build_record(tmp_path)) == {"awaker.3": "5 x 2"}  # both models' record first

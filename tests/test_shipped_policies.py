"""Every checkpoint shipped in checkpoints/ loads against the current rule registry and optimises a zoo model."""

from pathlib import Path

import onnx
import pytest

from xrlflow.agents.checkpoint import load_policy, read_meta
from xrlflow.rules import RULE_FINGERPRINT, rule_names

SHIPPED = sorted(p for p in (Path(__file__).resolve().parents[1] / "checkpoints").iterdir() if (p / "run.json").is_file())


def test_at_least_one_policy_ships():
    assert SHIPPED, "checkpoints/ holds no trained policy"


@pytest.mark.parametrize("run", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_policy_matches_the_registry_and_optimises(run, tmp_path):
    meta = read_meta(run)
    assert meta["rule_fingerprint"] == RULE_FINGERPRINT
    assert meta["rule_names"] == rule_names()
    assert sum(f.stat().st_size for f in run.iterdir()) <= 20 * 2**20
    load_policy(run)

    from xrlflow.agents.policy_search import search_with_policy
    from xrlflow.optimizer import OptimizeConfig, optimize
    from xrlflow.search import SearchConfig
    from xrlflow.zoo import export_model

    device = meta["train_config"]["device"]
    model = export_model("squeezenet", small=True)
    result = optimize(model, OptimizeConfig(policy=str(run), latency="cost", device=device, search_config=SearchConfig(rollouts=1, steps=20)),
                      policy_searcher=search_with_policy)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.report["verification"]["ok"]
    assert result.report["latency"]["after"]["ms"] <= result.report["latency"]["before"]["ms"]
    assert result.report["rewrites"], "the policy applied no rewrite to SqueezeNet (its Fire modules always admit some)"


def test_a_checkpoint_of_another_registry_is_refused_naming_the_shipped_one(tmp_path):
    import shutil

    from xrlflow.errors import BadInputError
    from xrlflow.shipped import DEFAULT_POLICY

    run = tmp_path / "old-run"
    shutil.copytree(SHIPPED[0], run)
    meta = read_meta(run)
    meta["rule_fingerprint"] = "0123456789abcdef"
    (run / "run.json").write_text(__import__("json").dumps(meta))
    with pytest.raises(BadInputError, match=f"0123456789abcdef.*{DEFAULT_POLICY}"):
        load_policy(run)

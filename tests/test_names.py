"""A mistyped zoo model, rule or shipped policy name is answered with the nearest known one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from xrlflow.errors import BadInputError
from xrlflow.names import did_you_mean


def test_did_you_mean():
    assert did_you_mean("bert-bsae", ["bert-base", "vit-base", "gpt2"]) == " (did you mean 'bert-base'?)"
    assert did_you_mean("squeezenet", ["bert-base", "vit-base", "gpt2"]) == ""


def test_wrong_zoo_name_suggests_the_nearest():
    from xrlflow.zoo import get_entry

    with pytest.raises(BadInputError, match=r"^unknown zoo model 'bert-bsae' \(did you mean 'bert-base'\?\); known models: bert-base, "):
        get_entry("bert-bsae")
    with pytest.raises(BadInputError) as caught:
        get_entry("nothing-like-it")
    assert "did you mean" not in str(caught.value)


def test_wrong_rule_names_suggest_the_nearest():
    from xrlflow.rules import select_rules

    with pytest.raises(BadInputError) as caught:
        select_rules(["merge-paralel-conv"], ["zzz"])
    assert str(caught.value) == "unknown rule(s) merge-paralel-conv (did you mean 'merge-parallel-conv'?), zzz; `xrlflow rules` lists them"


def test_cli_wrong_zoo_name_is_one_line():
    result = subprocess.run([sys.executable, "-m", "xrlflow.cli", "zoo", "export", "resnet-50", "-o", os.devnull],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "xrlflow: error: unknown zoo model 'resnet-50' (did you mean 'resnet50'?); known models: "
        + ", ".join(e.name for e in __import__("xrlflow.zoo", fromlist=["list_models"]).list_models())
    ]

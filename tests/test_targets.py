"""Target kinds have one list (datamodules/targets.py); the config's help text must name exactly those."""

from __future__ import annotations

import re

import pytest

from datamodules.config import TargetConfig
from datamodules.targets import FUTURE_KINDS, KINDS, MULTILABEL, MULTILABEL_KINDS, PROBE_KINDS, STATIC_KINDS, evaluation_kind
from experiments.config import attribute_docs


def test_target_config_help_names_exactly_the_kinds():
    doc = attribute_docs(TargetConfig)["kind"]
    static, future = doc.split(" or ")
    assert tuple(re.findall(r"\w+", static.split("(")[0])) == STATIC_KINDS, doc
    assert tuple(re.findall(r"\w+", future.split("(")[0])) == FUTURE_KINDS, doc
    assert set(MULTILABEL_KINDS) <= set(KINDS) and len(set(KINDS)) == len(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_every_config_kind_maps_to_one_evaluation_kind(kind):
    two, many = evaluation_kind(kind, 2), evaluation_kind(kind, 5)
    if kind in MULTILABEL_KINDS:
        assert two == many == MULTILABEL
    else:
        assert (two, many) == PROBE_KINDS

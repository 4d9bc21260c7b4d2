"""Plan validation and JSON round trip."""

from __future__ import annotations

import json

import pytest

import asaf_fx
from asaf_fx import Group, Plan
from asaf_fx.synthetic import synthetic_table


def make_plan(**overrides) -> Plan:
    fields = {
        "groups": (Group(0, 2, 0.1), Group(2, 3, 0.05)),
        "flops": 2.75,
        "dense_flops": 3.0,
        "predicted_degradation": 0.004,
        "max_degradation": 0.01,
        "method": "exact",
    }
    return Plan(**{**fields, **overrides})


def test_layer_sparsity_and_ratio():
    plan = make_plan()
    assert plan.layer_sparsity == (0.1, 0.1, 0.05)
    assert plan.num_layers == 3
    assert plan.flops_ratio == pytest.approx(2.75 / 3.0)


def test_json_round_trip_of_a_solved_plan():
    plan = asaf_fx.solve(synthetic_table(10), 0.01)
    again = Plan.from_json(plan.to_json(), num_layers=10)
    assert again == plan
    assert again.stats["states"] == plan.stats["states"]


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ((), "groups is empty"),
        ((Group(1, 3, 0.1),), "start at layer 0"),
        ((Group(0, 2, 0.1), Group(3, 4, 0.1)), "group 1 is layers \\[3, 4\\)"),
        ((Group(0, 0, 0.1),), "non-empty"),
        ((Group(0, 2, 1.0),), r"sparsity 1.0; it must lie in \[0, 1\)"),
    ],
)
def test_invalid_groups_are_refused(groups, message):
    with pytest.raises(ValueError, match=message):
        make_plan(groups=groups)


def test_plan_for_another_layer_count_is_refused():
    text = make_plan().to_json()
    with pytest.raises(ValueError, match="covers 3 decoder layers but the model has 30"):
        Plan.from_json(text, num_layers=30)


def test_other_schema_version_is_refused():
    body = json.loads(make_plan().to_json())
    body["schema"] = "asaf_fx.plan/0"
    with pytest.raises(ValueError, match="schema 'asaf_fx.plan/0'"):
        Plan.from_json(json.dumps(body))


def test_inconsistent_or_malformed_json_is_refused():
    body = json.loads(make_plan().to_json())
    body["num_layers"] = 4
    with pytest.raises(ValueError, match="num_layers 4 disagrees"):
        Plan.from_json(json.dumps(body))
    del body["flops"]
    with pytest.raises(ValueError, match="missing or malformed field"):
        Plan.from_json(json.dumps(body))
    with pytest.raises(ValueError, match="not JSON"):
        Plan.from_json("{")

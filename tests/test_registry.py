from __future__ import annotations

import json

import pytest
import torch

import jdoptim
from jdoptim import (
    Aggregator,
    Constant,
    GramianWeightedAggregator,
    Mean,
    UPGrad,
    Weighting,
    build,
    get_spec,
    list_aggregators,
    register,
    to_config,
    unregister,
)

FIRST_AGGREGATORS = ["constant", "dualproj", "imtlg", "mean", "mgda", "random", "sum", "upgrad"]


def test_the_first_aggregators_are_registered_under_their_lower_cased_class_names():
    names = list_aggregators()
    for name in FIRST_AGGREGATORS:
        assert name in names
        assert get_spec(name).cls.__name__.lower() == name
    assert names == sorted(names)


def test_list_aggregators_filters_with_a_case_insensitive_wildcard():
    assert list_aggregators("UPG*") == ["upgrad"]
    assert list_aggregators("no-such-*") == []


def test_weightings_are_registered_and_declare_gramian_use():
    assert "upgradweighting" in jdoptim.list_weightings()
    assert get_spec("upgradweighting").gramian_based
    assert get_spec("crmogmweighting").gramian_based
    assert not get_spec("excessmtlweighting").gramian_based
    assert get_spec("upgrad").gramian_based
    assert get_spec("upgrad").kind == "aggregator"
    assert get_spec("meanweighting").kind == "weighting"


def test_build_accepts_a_name_or_a_mapping_and_does_not_mutate_it():
    config = {"name": "upgrad", "pref_vector": [1.0, 2.0], "reg_eps": 0.5}
    aggregator = build(config)
    assert isinstance(aggregator, UPGrad)
    assert config == {"name": "upgrad", "pref_vector": [1.0, 2.0], "reg_eps": 0.5}
    assert aggregator.weighting.reg_eps == 0.5
    assert isinstance(build("MEAN"), Mean)


def test_to_config_writes_every_argument_and_serialises_tensors():
    config = to_config(Constant(torch.tensor([0.5, 1.5])))
    assert config == {"name": "constant", "weights": [0.5, 1.5]}
    config = to_config(UPGrad())
    assert set(config) == {"name", "pref_vector", "norm_eps", "reg_eps", "solver"}
    json.dumps(config)


def test_unknown_name_lists_close_matches_and_valid_choices():
    with pytest.raises(ValueError, match=r"'upgrd'.*Did you mean 'upgrad'.*Valid choices"):
        build("upgrd")


def test_unknown_argument_lists_valid_arguments():
    with pytest.raises(ValueError, match=r"'reg_esp'.*Did you mean 'reg_eps'.*norm_eps"):
        build({"name": "upgrad", "reg_esp": 1.0})


@pytest.mark.parametrize("config", [3, ["upgrad"], None])
def test_config_of_the_wrong_type_is_a_type_error(config):
    with pytest.raises(TypeError, match="registry name or a mapping"):
        build(config)


def test_config_needs_a_string_name():
    with pytest.raises(ValueError, match="'name' key"):
        build({"reg_eps": 1.0})
    with pytest.raises(TypeError, match="must be a string"):
        build({"name": 3})


def test_invalid_argument_values_are_rejected_by_the_constructor():
    with pytest.raises(ValueError, match="Invalid reg_eps value: -1"):
        build({"name": "upgrad", "reg_eps": -1})
    with pytest.raises(ValueError, match="Invalid max_iters value: 0"):
        build({"name": "mgda", "max_iters": 0})
    with pytest.raises(ValueError, match="Invalid solver value: 'cvxpy'"):
        UPGrad(solver="cvxpy")
    with pytest.raises(ValueError, match="non-empty 1-D"):
        Constant([])
    with pytest.raises(ValueError, match="finite"):
        Constant([1.0, float("nan")])
    with pytest.raises(ValueError, match="Invalid seed value"):
        jdoptim.Random(seed=1.5)


def test_wrong_number_of_preferences_names_both_counts():
    with pytest.raises(ValueError, match="3 preferences but the Jacobian has 2 rows"):
        UPGrad(pref_vector=[1.0, 1.0, 1.0])(torch.ones(2, 4))
    with pytest.raises(ValueError, match="1 weights but the Jacobian has 2 rows"):
        Constant([1.0])(torch.ones(2, 4))


def test_nested_configs_build_recursively():
    @register(name="wrapped_for_test")
    class Wrapped(GramianWeightedAggregator):
        def __init__(self, weighting: Weighting) -> None:
            super().__init__(weighting)

    try:
        config = {
            "name": "wrapped_for_test",
            "weighting": {"name": "mgdaweighting", "max_iters": 7},
        }
        aggregator = build(config)
        assert aggregator.weighting.max_iters == 7
        assert to_config(aggregator) == {
            "name": "wrapped_for_test",
            "weighting": {
                "name": "mgdaweighting",
                "solver": "active_set",
                "epsilon": 0.001,
                "max_iters": 7,
            },
        }
    finally:
        unregister("wrapped_for_test")


def test_register_rejects_non_methods_and_name_clashes():
    with pytest.raises(TypeError, match="Only Aggregator, Weighting and Scalarizer"):
        register(int)

    with pytest.raises(ValueError, match="already registered"):

        @register(name="upgrad")
        class Other(Aggregator):
            def _aggregate(self, matrix):
                return matrix.sum(0)


def test_unregistered_classes_cannot_be_configured():
    class Unregistered(Aggregator):
        def _aggregate(self, matrix):
            return matrix.sum(0)

    with pytest.raises(ValueError, match="not registered"):
        to_config(Unregistered())


def test_repr_derives_from_the_constructor_signature():
    assert repr(UPGrad(pref_vector=[1.0, 3.0], reg_eps=0.1, solver="quadprog")) == (
        "UPGrad(pref_vector=[1.0, 3.0], norm_eps=0.0, reg_eps=0.1, solver='quadprog')"
    )
    assert repr(jdoptim.MGDA(max_iters=5)) == (
        "MGDA(solver='active_set', epsilon=0.001, max_iters=5)"
    )


def test_tensor_arguments_follow_the_module_to_another_dtype():
    aggregator = UPGrad(pref_vector=[1.0, 3.0]).to(torch.float64)
    assert aggregator.weighting.pref_vector.dtype == torch.float64
    assert "pref_vector" not in aggregator.state_dict()


def test_random_with_a_seed_saves_its_generator_state():
    aggregator = jdoptim.Random(seed=3)
    J = torch.randn(4, 5)
    aggregator(J)
    state = aggregator.state_dict()
    expected = aggregator(J)
    restored = jdoptim.Random(seed=3)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored(J), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no seed"):
        jdoptim.Random().load_state_dict(state)

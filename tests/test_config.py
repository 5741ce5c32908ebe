import dataclasses

import pytest

from slowfast_adapter import SlowFastConfig


def test_defaults_are_the_reference_release():
    config = SlowFastConfig()
    assert (config.temporal_sampling_stride, config.temporal_pooling_stride, config.min_fast_frames) == (1, 4, 16)
    assert config.resolve_hybrid_layers(28) == [0, 8, 16, 24]
    assert config.gate == "dynamic_tanh" and config.kv_init == "from_llm" and config.query_rope


def test_every_field_is_documented():
    for field in dataclasses.fields(SlowFastConfig):
        assert len(field.metadata.get("help", "")) > 20, field.name


def test_json_round_trip():
    config = SlowFastConfig(temporal_pooling_stride=6, hybrid_layers=[3, 1], query_tokens="all", gate="static_tanh")
    again = SlowFastConfig.from_json_string(config.to_json_string())
    assert again == config and again.hybrid_layers == [1, 3]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"temporal_pooling_stride": 0}, ValueError, "temporal_pooling_stride must be >= 1"),
        ({"spatial_pooling_stride": 1.5}, TypeError, "must be an int"),
        ({"min_fast_frames": True}, TypeError, "must be an int"),
        ({"query_tokens": "txt"}, ValueError, "query_tokens must be one of"),
        ({"gate": "sigmoid"}, ValueError, "gate must be one of"),
        ({"kv_init": "zeros"}, ValueError, "kv_init must be one of"),
        ({"hybrid_layers": []}, ValueError, "hybrid_layers is empty"),
        ({"hybrid_layers": [1, 1]}, ValueError, "duplicates"),
        ({"query_rope": "yes"}, TypeError, "query_rope must be True or False"),
    ],
)
def test_invalid_values_are_refused_with_a_clear_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        SlowFastConfig(**kwargs)


def test_layer_placement():
    assert SlowFastConfig(hybrid_layer_interval=2, hybrid_layer_start=1).resolve_hybrid_layers(6) == [1, 3, 5]
    with pytest.raises(ValueError, match="do not exist"):
        SlowFastConfig(hybrid_layers=[0, 9]).resolve_hybrid_layers(4)
    with pytest.raises(ValueError, match="past the last decoder layer"):
        SlowFastConfig(hybrid_layer_start=4).resolve_hybrid_layers(4)


def test_unknown_fields_from_another_version_are_refused():
    with pytest.raises(ValueError, match="incompatible version"):
        SlowFastConfig.from_dict({**SlowFastConfig().to_dict(), "future_field": 1})

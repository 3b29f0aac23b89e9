import json

import pytest

from kvplug.config import resolve_config


def test_default_is_full():
    config = resolve_config(None, environ={})
    assert config.policy == "full" and dict(config.params) == {} and config.sources == ()


def test_unknown_policy_names_valid_choices():
    with pytest.raises(ValueError, match=r"unknown kvplug policy 'nonsense'.*'full'"):
        resolve_config(None, environ={"KVPLUG_POLICY": "nonsense"})


def test_policy_name_is_case_insensitive():
    assert resolve_config(None, environ={"KVPLUG_POLICY": "FULL"}).policy == "full"


def test_unknown_parameter_is_rejected():
    with pytest.raises(ValueError, match=r"policy 'full' has no parameter 'budget'"):
        resolve_config({"kvplug": {"budget": 128}}, environ={})


def test_engine_key_type_and_range():
    with pytest.raises(ValueError, match=r"'log_every_steps' must be int, got 'often'"):
        resolve_config({"kvplug": {"log_every_steps": "often"}}, environ={})
    with pytest.raises(ValueError,
                       match=r"'log_every_steps' must be in \[0, 9223372036854775807\], got -1"):
        resolve_config(None, environ={"KVPLUG_CONFIG": '{"log_every_steps": -1}'})


def test_precedence_config_env_then_policy_env_then_additional_config(tmp_path):
    path = tmp_path / "kv.toml"
    path.write_text('policy = "full"\nlog_every_steps = 7\nlog_request_stats = false\n')
    env = {"KVPLUG_CONFIG": str(path), "KVPLUG_POLICY": "full"}
    config = resolve_config({"kvplug": {"log_every_steps": 3}}, environ=env)
    assert config.log_every_steps == 3            # --additional-config wins
    assert config.log_request_stats is False      # from the TOML file
    assert config.sources == ("KVPLUG_CONFIG", "KVPLUG_POLICY", "--additional-config")
    # KVPLUG_POLICY overrides the file's policy; --additional-config overrides both
    with pytest.raises(ValueError, match="'other'"):
        resolve_config({"kvplug": {"policy": "other"}}, environ=env)


def test_config_file_json_and_errors(tmp_path):
    good = tmp_path / "kv.json"
    good.write_text(json.dumps({"policy": "full", "log_every_steps": 5}))
    assert resolve_config(None, environ={"KVPLUG_CONFIG": str(good)}).log_every_steps == 5
    bad = tmp_path / "kv.yaml"
    bad.write_text("policy: full")
    with pytest.raises(ValueError, match=r"must end in \.json or \.toml"):
        resolve_config(None, environ={"KVPLUG_CONFIG": str(bad)})
    with pytest.raises(ValueError, match="neither inline JSON nor an existing file"):
        resolve_config(None, environ={"KVPLUG_CONFIG": str(tmp_path / "missing.json")})
    with pytest.raises(ValueError, match="not valid JSON"):
        resolve_config(None, environ={"KVPLUG_CONFIG": "{policy: full}"})
    with pytest.raises(ValueError, match="must be an object"):
        resolve_config({"kvplug": "full"}, environ={})


def test_draft_policy_is_validated():
    draft = {"policy": "streamingllm", "budget": 256}
    config = resolve_config({"kvplug": {"draft": draft}}, environ={})
    assert config.draft.as_dict() == draft and config.policy == "full"
    assert '"policy": "streamingllm"' in config.describe()
    with pytest.raises(ValueError, match=r"draft 'policy': unknown kvplug policy 'nope'"):
        resolve_config({"kvplug": {"draft": {"policy": "nope"}}}, environ={})
    with pytest.raises(ValueError, match=r"'draft' must be dict, got 'quest'"):
        resolve_config({"kvplug": {"draft": "quest"}}, environ={})
    with pytest.raises(ValueError, match=r"draft: policy 'snapkv' has stages \['prefill_compress'\]"):
        resolve_config({"kvplug": {"draft": {"policy": "snapkv", "budget": 64}}}, environ={})
    with pytest.raises(ValueError, match=r"verifying policy 'quest' must read every token"):
        resolve_config({"kvplug": {"policy": "quest", "budget": 64, "draft": draft}}, environ={})
    with pytest.raises(ValueError, match=r"draft cannot be combined with switch_to"):
        resolve_config({"kvplug": {"draft": draft, "switch_to": [{"policy": "full"}]}},
                       environ={})


def test_first_tier_is_validated():
    draft = {"policy": "streamingllm", "budget": 256}
    config = resolve_config({"kvplug": {"draft": draft, "first_tier": {"num_tokens": 2}}},
                            environ={})
    assert config.first_tier.as_dict() == {"method": "ngram", "num_tokens": 2, "min_n": 2,
                                           "max_n": 5}
    assert 'first_tier={"method": "ngram"' in config.describe()
    assert resolve_config({"kvplug": {"draft": draft}}, environ={}).first_tier is None
    bad = [({"method": "eagle"}, r"'method': 'eagle' is not one of \['ngram'\]"),
           ({"num_tokens": 0}, r"'num_tokens' must be an int in \[1, 64\], got 0"),
           ({"max_n": True}, r"'max_n' must be an int in \[1, 64\], got True"),
           ({"min_n": 4, "max_n": 3}, r"min_n 4 exceeds max_n 3"),
           ({"n": 3}, r"unknown keys \['n'\]; valid keys: \['max_n', 'method', 'min_n', "
                      r"'num_tokens'\]"),
           ("ngram", r"'first_tier' must be dict, got 'ngram'")]
    for tier, message in bad:
        with pytest.raises(ValueError, match=message):
            resolve_config({"kvplug": {"draft": draft, "first_tier": tier}}, environ={})
    with pytest.raises(ValueError, match=r"first_tier proposes tokens for the draft policy: "
                                         r"set 'draft' too"):
        resolve_config({"kvplug": {"first_tier": {}}}, environ={})


def test_store_policy_is_validated():
    """A store policy (no stage, a store of its own) under a selection policy."""
    config = resolve_config({"kvplug": {"policy": "quest", "budget": 256,
                                        "store": {"policy": "zipcache", "streaming_gap": 64}}},
                            environ={})
    assert config.store.as_dict() == {"policy": "zipcache", "streaming_gap": 64}
    assert 'store={"policy": "zipcache"' in config.describe()
    with pytest.raises(ValueError, match=r"store: policy 'quest' .* is not a store policy"):
        resolve_config({"kvplug": {"policy": "quest", "budget": 64,
                                   "store": {"policy": "quest", "budget": 64}}}, environ={})
    with pytest.raises(ValueError, match=r"the policy over it, 'snapkv' .* must only select"):
        resolve_config({"kvplug": {"policy": "snapkv", "budget": 64,
                                   "store": {"policy": "zipcache"}}}, environ={})
    with pytest.raises(ValueError, match=r"store 'policy': unknown kvplug policy 'zip'"):
        resolve_config({"kvplug": {"policy": "quest", "budget": 64, "store": {"policy": "zip"}}},
                       environ={})
    with pytest.raises(ValueError, match=r"store: policy 'zipcache': .*bits_other"):
        resolve_config({"kvplug": {"policy": "quest", "budget": 64,
                                   "store": {"policy": "zipcache", "bits_other": 3}}}, environ={})
    with pytest.raises(ValueError, match=r"store cannot be combined with switch_to or draft"):
        resolve_config({"kvplug": {"policy": "quest", "budget": 64,
                                   "store": {"policy": "zipcache"},
                                   "switch_to": [{"policy": "full"}]}}, environ={})


# -- malformed configs: accepted, or refused with a ValueError naming the bad key ----------

import dataclasses  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kvplug.config import ENGINE_KEYS  # noqa: E402
from kvplug.policies import POLICIES  # noqa: E402

# every key a config may hold, plus names no policy has
KNOWN_KEYS = sorted({"policy", *ENGINE_KEYS} | {f.name for cls in POLICIES.values()
                                                for f in dataclasses.fields(cls)})
KEYS = st.one_of(st.sampled_from(KNOWN_KEYS), st.sampled_from(["budgett", "Policy", "", "é"]),
                 st.text(min_size=1, max_size=8))
SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-10**4, max_value=10**4),
    st.sampled_from([2**63, -2**63 - 1, 10**40, 2**63 - 1]),          # huge ints
    st.floats(allow_nan=True, allow_infinity=True),                   # NaN / inf included
    st.sampled_from(sorted(POLICIES)), st.text(max_size=12))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=3)), max_leaves=8)
SWITCH = st.lists(st.one_of(VALUES, st.fixed_dictionaries(
    {"policy": st.sampled_from(sorted(POLICIES))}, optional={"budget": VALUES, "x": VALUES})),
    max_size=2)
CONFIGS = st.one_of(
    st.dictionaries(KEYS, VALUES, max_size=5),
    st.fixed_dictionaries({"policy": st.sampled_from(sorted(POLICIES))},
                          optional={k: VALUES for k in KNOWN_KEYS if k != "policy"}),
    st.fixed_dictionaries({"policy": st.sampled_from(sorted(POLICIES)), "switch_to": SWITCH}))


def _all_keys(value) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _all_keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in _all_keys(v)}
    return set()


def _finite(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=CONFIGS, inline=st.booleans())
def test_any_config_is_accepted_or_refused_naming_its_bad_key(data, inline, tmp_path_factory):
    """Through either source, a config is valid (finite numbers only, every key known) or a
    ValueError naming one of its keys; nothing else escapes, and nothing engine-side runs."""
    if inline:
        environ = {"KVPLUG_CONFIG": json.dumps(data)}   # NaN/Infinity written as JSON allows
        additional = None
    else:
        environ, additional = {}, {"kvplug": data}
    try:
        config = resolve_config(additional, environ=environ)
    except ValueError as e:
        message = str(e)
        # a bad key is quoted; a missing or conflicting parameter is named as a word
        assert (any(repr(k) in message for k in _all_keys(data) | {"policy"})
                or any(re.search(rf"\b{k}\b", message) for k in KNOWN_KEYS)), message
        return
    assert _finite(data), f"accepted a non-finite number: {data}"
    assert config.policy == str(data.get("policy", "full")).lower()
    assert set(data) <= set(KNOWN_KEYS)


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(max_size=40).map(lambda t: "{" + t),
                      st.sampled_from(['{"policy": NaN}', '{"budget": Infinity, "policy": "quest"}',
                                       '{"policy": "quest", "budget": -Infinity}',
                                       '{"policy": "quest", "budget": 1' + "0" * 5000 + "}",
                                       '{"policy": ' + "[" * 100000, '{"a": {"b": [1, {"c": '
                                       '[null]}]}, "policy": "full"}', '{"policy": "full",}'])))
def test_inline_json_text_is_parsed_or_refused_with_a_value_error(text):
    try:
        resolve_config(None, environ={"KVPLUG_CONFIG": text})
    except ValueError as e:
        assert "KVPLUG_CONFIG" in str(e) or "'" in str(e), str(e)


@pytest.mark.parametrize("text, key", [
    ('{"policy": "quest", "budget_ratio": NaN}', "'budget_ratio'"),
    ('{"policy": "quest", "budget_ratio": Infinity}', "'budget_ratio'"),
    ('{"policy": "quest", "budget": 1e999}', "'budget'"),          # a float where an int goes
    ('{"policy": "quest", "budget": 9223372036854775808}', "'budget'"),
    ('{"policy": "full", "log_every_steps": 9223372036854775808}', "'log_every_steps'"),
    ('{"policy": "full", "switch_to": [{"policy": "quest", "budget_ratio": NaN}]}',
     "'budget_ratio'"),
    ('{"policy": "full", "switch_to": [[1]]}', "'switch_to'"),
    ('{"policy": {"name": "full"}}', "'policy'"),
])
def test_non_finite_huge_and_nested_values_name_their_key(text, key):
    with pytest.raises(ValueError, match=key):
        resolve_config(None, environ={"KVPLUG_CONFIG": text})


def test_malformed_config_files_are_value_errors(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text('{"policy": ' + "[" * 100000 + "]" * 100000 + "}")
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00policy")
    toml_nan = tmp_path / "nan.toml"
    toml_nan.write_text('policy = "quest"\nbudget_ratio = nan\n')
    for path, match in [(deep, "not valid JSON"), (binary, "cannot be read as text"),
                        (toml_nan, "'budget_ratio' must be a finite number")]:
        with pytest.raises(ValueError, match=match):
            resolve_config(None, environ={"KVPLUG_CONFIG": str(path)})

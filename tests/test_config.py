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
    with pytest.raises(ValueError, match=r"'log_every_steps' must be >= 0, got -1"):
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
    with pytest.raises(ValueError, match=r"draft: unknown kvplug policy 'nope'"):
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

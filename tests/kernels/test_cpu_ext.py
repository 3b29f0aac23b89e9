"""Where kvplug's C++ CPU kernels are built (no build here)."""

from kvplug.kernels import cpu_ext


def test_each_checkout_of_the_sources_builds_into_its_own_directory(monkeypatch, tmp_path):
    """ninja rebuilds when the source paths in its build file change, so two checkouts
    sharing a build directory rebuilt each other's kernels at their first use (a server
    stalled for a minute); the machine's tag stays, the sources' directory is added."""
    here = cpu_ext._build_tag()
    monkeypatch.setattr(cpu_ext, "__file__", str(tmp_path / "kernels" / "cpu_ext.py"))
    there = cpu_ext._build_tag()
    assert here != there and here.rsplit("-", 1)[0] == there.rsplit("-", 1)[0]

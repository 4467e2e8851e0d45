"""The template library: every template has a test file of its own, run by
`rbee policy test` as users run it, and the YAML templates decide like the
Rhai templates they translate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import rbee.templates as library
from rbee.scheduler import Policy

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "python" / "rbee" / "templates"
TESTS = TEMPLATES / "tests"

SEEDS = ["cost-optimizer", "eu-compliance", "home", "latency-optimizer",
         "multi-modal-router", "platform-scheduler"]
ADDED = ["deadline-aware", "fill-first", "power-of-two", "quiet-hours", "sticky-sessions",
         "vram-fit"]
# YAML template -> the Rhai template it says the same as.
YAML_VERSIONS = {
    "eu-compliance-rules": "eu-compliance",
    "home-rules": "home",
    "multi-modal-rules": "multi-modal-router",
    "platform-rules": "platform-scheduler",
    "quiet-hours-rules": "quiet-hours",
    "sticky-sessions-rules": "sticky-sessions",
}


def policy_test(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "rbee.cli", "policy", "test", *args],
                            capture_output=True, text=True, timeout=120)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_the_library_lists_every_template():
    assert library.names() == sorted(SEEDS + ADDED + list(YAML_VERSIONS))
    for name in library.names():
        assert library.description(name), name
        assert library.filename(name).startswith(name + ".")
        assert library.policy_format(name) == ("yaml" if name in YAML_VERSIONS else "rhai")
        assert library.source(library.filename(name)) == library.source(name)
        policy = Policy.from_source(library.source(name), name=library.filename(name),
                                    format=library.policy_format(name))
        assert policy.format == library.policy_format(name)
    with pytest.raises(KeyError, match="no template named 'home.yaml'"):
        library.source("home.yaml")


def test_every_template_has_a_test_file():
    tested = sorted(p.name.removesuffix(".test.yaml") for p in TESTS.glob("*.test.yaml"))
    assert tested == library.names()


@pytest.mark.parametrize("name", sorted(SEEDS + ADDED + list(YAML_VERSIONS)))
def test_each_template_passes_its_tests(name):
    result = policy_test(str(TESTS / f"{name}.test.yaml"), "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 0, json.dumps(report, indent=2)
    (file,) = report["files"]
    assert file["policy"].endswith(library.filename(name))
    assert file["error"] is None and file["failed"] == 0
    assert len(file["cases"]) >= 4
    if name in YAML_VERSIONS:
        # Every rule of a shipped YAML template is exercised by its tests.
        assert all(rule["hits"] > 0 for rule in file["rules"]), file["rules"]


@pytest.mark.parametrize("yaml_name, rhai_name", sorted(YAML_VERSIONS.items()))
def test_yaml_templates_decide_like_their_rhai_versions(yaml_name, rhai_name):
    """The Rhai template's own test file passes with the YAML template."""
    result = policy_test(str(TESTS / f"{rhai_name}.test.yaml"),
                         "--policy", str(TEMPLATES / f"{yaml_name}.yaml"))
    assert result.returncode == 0, result.stdout


def test_the_whole_folder_passes_in_one_run():
    result = policy_test(str(TESTS))
    assert result.returncode == 0, result.stdout
    summary = result.stdout.strip().splitlines()[-1]
    assert f"0 failed in {len(library.names())} files" in summary


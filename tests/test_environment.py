"""environment.yml must describe the same environment as pyproject.toml (its single source of truth)."""

import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_installs_the_project_with_its_dev_extra():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    python = next(d for d in conda if d.startswith("python"))
    assert SpecifierSet(project["requires-python"]).contains(python.split("=")[-1])
    assert any(line.startswith("-e .[") and "dev" in line for line in pip)
    # Anything else named in the yml must be a declared dependency, so the two cannot drift apart.
    declared = {Requirement(r).name.lower() for r in project["dependencies"]}
    declared |= {Requirement(r).name.lower() for extra in project["optional-dependencies"].values() for r in extra}
    named = {d.split("=")[0].lower() for d in conda if not d.startswith(("python", "pip"))}
    named |= {Requirement(line).name.lower() for line in pip if not line.startswith("-e")}
    assert named <= declared, f"in environment.yml but not in pyproject.toml: {sorted(named - declared)}"

"""Package details a user or a packager relies on: licence, typing marker, citation, project URLs."""

from pathlib import Path

import pytest
import yaml

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parents[1]


def test_licence_is_apache_2_in_the_file_and_the_metadata():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_packages_are_marked_typed():
    assert (ROOT / "soflow_core" / "py.typed").is_file()
    assert (ROOT / "kernels" / "soflow_kernels" / "py.typed").is_file()


def test_citation_names_the_paper_and_the_software():
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["type"] == "software"
    paper = citation["preferred-citation"]
    assert "2512.15657" in paper["url"] and paper["title"].startswith("SoFlow: Solution Flow Models")
    assert citation["version"] == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_project_urls_point_at_the_paper_and_the_official_code():
    urls = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]
    assert set(urls.values()) == {"https://arxiv.org/abs/2512.15657", "https://github.com/zlab-princeton/SoFlow"}


def test_every_required_dependency_is_imported_by_the_library():
    import re

    requirements = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    sources = "\n".join(p.read_text() for p in (ROOT / "soflow_core").rglob("*.py"))
    # beartype checks the jaxtyping annotations at run time when enabled (the tests do, through jaxtyping's
    # import hook); nothing imports it by name
    checker_only = {"beartype"}
    for requirement in requirements:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).replace("-", "_")
        if name in checker_only:
            continue
        assert re.search(rf"^\s*(import|from) {name}\b", sources, re.M), f"{name} is required but never imported"

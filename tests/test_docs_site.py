"""The built documentation renders its maths with no network, in a real browser.

The site is built with ``mkdocs build --strict`` (or taken from ``SOFLOW_DOCS_SITE``, a folder already built),
then a few pages are opened in headless Chromium with every host name unresolvable, so nothing can come from a
CDN. After MathJax has run, the text a reader sees must hold no raw TeX delimiter (``\\(``, ``\\[``, ``$$``) and
the pages must hold typeset maths.

Without Chromium (``/usr/bin/chromium`` or ``SOFLOW_CHROMIUM``) or without the docs extra the test skips and
says why, unless ``SOFLOW_REQUIRE_BROWSER=1`` (set by ``.ci/run``), which makes both mandatory.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("index.html", "method/index.html", "conventions/index.html", "api/losses/index.html")
RAW_TEX = ("\\(", "\\)", "\\[", "\\]", "$$")
REQUIRED = os.environ.get("SOFLOW_REQUIRE_BROWSER") == "1"


def _missing(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"SOFLOW_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


def _chromium() -> str:
    candidate = os.environ.get("SOFLOW_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(candidate).is_file():
        _missing("no Chromium (apt-get install chromium, or set SOFLOW_CHROMIUM to its path)")
    return candidate


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    built = os.environ.get("SOFLOW_DOCS_SITE")
    if built:
        return Path(built)
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mathjax") is None:
        _missing('the docs extra is not installed (pip install -e ".[docs]")')
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


class _VisibleText(HTMLParser):
    """The text a reader sees: everything outside scripts, styles, code and MathJax's screen-reader copy."""

    HIDDEN = frozenset({"script", "style", "code", "pre", "mjx-assistive-mml", "noscript", "template"})

    def __init__(self) -> None:
        super().__init__()
        self.hidden_depth = 0
        self.chunks: list[str] = []
        self.typeset = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag == "mjx-container":
            self.typeset += 1
        if tag in self.HIDDEN:
            self.hidden_depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in self.HIDDEN and self.hidden_depth:
            self.hidden_depth -= 1

    def handle_data(self, data: str) -> None:
        if not self.hidden_depth:
            self.chunks.append(data)


def rendered_dom(chromium: str, page: Path, profile: Path) -> str:
    """The page's DOM after its scripts ran, in headless Chromium that cannot reach any host."""
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # offline: no CDN, no web font can load
        "--virtual-time-budget=20000",
        "--dump-dom",
        page.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("page", PAGES)
def test_maths_renders_offline(site: Path, page: str, tmp_path: Path) -> None:
    chromium = _chromium()
    html = site / page
    assert html.is_file(), f"{page} is not in the built site {site}"
    parser = _VisibleText()
    parser.feed(rendered_dom(chromium, html, tmp_path / "profile"))
    text = "".join(parser.chunks)
    raw = [delimiter for delimiter in RAW_TEX if delimiter in text]
    assert not raw, f"{page}: raw TeX {raw} visible, e.g. …{text[text.find(raw[0]) - 80 : text.find(raw[0]) + 80]}…"
    assert parser.typeset > 0, f"{page}: no typeset maths (mjx-container) found"


def test_site_holds_mathjax_and_no_cdn(site: Path) -> None:
    assert (site / "assets" / "mathjax" / "tex-mml-chtml.js").is_file()
    for page in PAGES:
        text = (site / page).read_text(encoding="utf-8")
        assert "unpkg.com" not in text and "cdn.jsdelivr" not in text, page

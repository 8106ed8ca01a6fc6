"""The built documentation renders its maths with no network and reads well at 1280 px, in a real browser.

The site is built with ``mkdocs build --strict`` (or taken from ``SOFLOW_DOCS_SITE``, a folder already built),
then its pages are opened in headless Chromium with every host name unresolvable, so nothing can come from a
CDN. After MathJax has run, the text a reader sees must hold no raw TeX delimiter (``\\(``, ``\\[``, ``$$``) and
the pages must hold typeset maths.

Every page of the nav is also laid out 1280 px wide and measured in the page itself: no identifier in a table
may break inside a word (a line break between two word characters of a ``code`` element), no table may stick
out of the text column without scrolling in its own box, a table of formulas must fit the column, and no line
that installs (``pip install``) may be cut off in its code box.
A full-page screenshot of each page goes to ``SOFLOW_DOCS_SCREENSHOTS`` (``.ci/run`` keeps them with the run's
artefacts) or, unset, to a temporary folder that the test session prints at its end.

Without Chromium (``/usr/bin/chromium`` or ``SOFLOW_CHROMIUM``) or without the docs extra the test skips and
says why, unless ``SOFLOW_REQUIRE_BROWSER=1`` (set by ``.ci/run``), which makes both mandatory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

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


# ------------------------------------------------------------------ every page at 1280 px


def _nav_pages(nav: list) -> list[str]:
    """The built HTML path of every page in the mkdocs nav, in nav order."""
    found: list[str] = []
    for entry in nav:
        for value in entry.values() if isinstance(entry, dict) else [entry]:
            if isinstance(value, list):
                found += _nav_pages(value)
            elif value == "index.md":
                found.append("index.html")
            else:
                found.append(value.removesuffix(".md").removesuffix("/index") + "/index.html")
    return found


NAV_PAGES = _nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"])
WIDTH = 1280

# Runs in the page after MathJax has typeset it; writes what it finds into a JSON script element.
_MEASURE = r"""
(function () {
  function midWordBreaks(element) {
    const found = [];
    const range = document.createRange();
    const walker = document.createTreeWalker(element, NodeFilter.SHOW_TEXT);
    let top = null, previous = "";
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      const text = node.textContent;
      for (let i = 0; i < text.length; i++) {
        range.setStart(node, i);
        range.setEnd(node, i + 1);
        const rects = range.getClientRects();
        if (rects.length) {
          if (top !== null && rects[0].top > top + 2 && /\w/.test(previous) && /\w/.test(text[i])) {
            found.push(element.textContent);
          }
          top = rects[0].top;
        }
        previous = text[i];
      }
    }
    return found;
  }
  function measure() {
    const article = document.querySelector(".md-content__inner") || document.body;
    const right = article.getBoundingClientRect().right;
    const out = {height: document.documentElement.scrollHeight, midword: [], overflowing: [], maths_scrolling: []};
    out.scrolling_install = [];
    for (const table of article.querySelectorAll("table")) {
      for (const code of table.querySelectorAll("td code, th code")) out.midword.push(...midWordBreaks(code));
      const box = table.closest(".md-typeset__scrollwrap") || table.parentElement;
      const scrolls = ["auto", "scroll"].includes(getComputedStyle(box).overflowX);
      if (!scrolls && table.getBoundingClientRect().right > right + 1) {
        out.overflowing.push(table.rows[0].textContent.trim().slice(0, 100));
      }
      if (table.querySelector("mjx-container") && table.getBoundingClientRect().width > box.clientWidth + 1) {
        out.maths_scrolling.push(table.rows[0].textContent.trim().slice(0, 100));
      }
    }
    const context = document.createElement("canvas").getContext("2d");
    for (const code of article.querySelectorAll("pre > code")) {
      const style = getComputedStyle(code);
      context.font = style.font;
      const room = code.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
      for (const line of code.textContent.split("\n")) {
        if (/pip install/.test(line) && context.measureText(line).width > room + 1) out.scrolling_install.push(line);
      }
    }
    const node = document.createElement("script");
    node.type = "application/json";
    node.id = "soflow-measure";
    node.textContent = JSON.stringify(out);
    document.body.appendChild(node);
  }
  window.addEventListener("load", function () {
    const typeset = window.MathJax && MathJax.startup && MathJax.startup.promise;
    (typeset || Promise.resolve()).then(measure);
  });
})();
"""


@pytest.fixture(scope="module")
def measured_site(site: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the site whose nav pages carry the measuring script."""
    copy = tmp_path_factory.mktemp("measured") / "site"
    shutil.copytree(site, copy)
    for page in NAV_PAGES:
        html = copy / page
        if html.is_file():
            text = html.read_text(encoding="utf-8")
            html.write_text(text.replace("</body>", f"<script>{_MEASURE}</script></body>", 1), encoding="utf-8")
    return copy


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the screenshots go: ``SOFLOW_DOCS_SCREENSHOTS``, else a temporary folder printed at the end."""
    chosen = os.environ.get("SOFLOW_DOCS_SCREENSHOTS")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    yield folder
    print(f"\nscreenshots of the docs at {WIDTH} px: {folder}", file=sys.__stderr__)


def _browser(chromium: str, profile: Path, *options: str) -> list[str]:
    return [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--virtual-time-budget=20000",
        *options,
    ]


@pytest.mark.parametrize("page", NAV_PAGES)
def test_page_reads_at_1280_px(site: Path, measured_site: Path, screenshots: Path, page: str, tmp_path: Path) -> None:
    chromium = _chromium()
    assert (site / page).is_file(), f"{page} is in the nav but not in the built site {site}"
    done = subprocess.run(
        [
            *_browser(chromium, tmp_path / "a", f"--window-size={WIDTH},900", "--dump-dom"),
            (measured_site / page).as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.search(r'<script type="application/json" id="soflow-measure">(.*?)</script>', done.stdout, re.S)
    assert found, f"{page}: the measuring script did not run"
    measured = json.loads(found.group(1))
    # the screenshot first, so that a failing page can be looked at
    shot = screenshots / (page.removesuffix("index.html").strip("/").replace("/", "__") or "home")
    height = min(max(measured["height"], 600), 16000)  # Chromium's largest capture
    done = subprocess.run(
        [
            *_browser(chromium, tmp_path / "b", f"--window-size={WIDTH},{height}", f"--screenshot={shot}.png"),
            (site / page).as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and Path(f"{shot}.png").read_bytes()[:4] == b"\x89PNG", done.stderr[-3000:]
    assert not measured["midword"], f"{page}: identifiers in tables broken inside a word: {measured['midword']}"
    assert not measured["overflowing"], (
        f"{page}: tables wider than the column, not scrolling: {measured['overflowing']}"
    )
    assert not measured["maths_scrolling"], (
        f"{page}: tables of formulas wider than the column: {measured['maths_scrolling']}"
    )
    assert not measured["scrolling_install"], f"{page}: install commands cut off: {measured['scrolling_install']}"


def test_api_member_lists_cover_every_public_name() -> None:
    """An API directive that lists its members (to lead with the main class) names every name of ``__all__``."""
    import importlib

    missing = []
    for source in sorted((ROOT / "docs" / "api").glob("*.md")):
        text = source.read_text(encoding="utf-8")
        for module, listed in re.findall(r"^::: (soflow_core[\w.]*)\n((?:    .*\n)*)", text, re.M):
            members = re.findall(r"^        - (\w+)$", listed, re.M)
            if members:
                names = getattr(importlib.import_module(module), "__all__", [])
                missing += [f"{source.name}: {module}.{name}" for name in names if name not in members]
    assert not missing, f"public names left out of the API pages' member lists: {missing}"

"""MkDocs hook: ship MathJax with the site, so its maths renders with no network.

MathJax 3 comes from the ``django-static-mathjax`` wheel (in the ``docs`` extra; it only holds MathJax's files,
Django is not needed). After a build, the part of MathJax the pages load — the ``tex-mml-chtml`` component, the
TeX extensions it autoloads, its CHTML fonts, its menu and accessibility modules — is copied to
``<site>/assets/mathjax/``, which ``mkdocs.yml`` names in ``extra_javascript``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

# what tex-mml-chtml.js loads, as paths inside MathJax's es5/ folder
_MATHJAX_PARTS = ("tex-mml-chtml.js", "input/tex/extensions", "output/chtml", "ui", "a11y")
SITE_FOLDER = "assets/mathjax"


def mathjax_es5_folder() -> Path:
    """MathJax's ``es5`` folder inside the installed ``django-static-mathjax`` package."""
    try:
        import mathjax  # the import name of django-static-mathjax
    except ModuleNotFoundError as error:
        raise SystemExit(
            'the docs need MathJax from the "docs" extra: pip install -e ".[docs]" (django-static-mathjax)'
        ) from error
    folder = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    if not (folder / "tex-mml-chtml.js").is_file():
        raise SystemExit(f"django-static-mathjax is installed but holds no MathJax 3 es5 build at {folder}")
    return folder


def on_post_build(config, **kwargs) -> None:
    """Copy MathJax into the built site."""
    source = mathjax_es5_folder()
    target = Path(config["site_dir"]) / SITE_FOLDER
    for part in _MATHJAX_PARTS:
        if (source / part).is_dir():
            shutil.copytree(source / part, target / part, dirs_exist_ok=True)
        else:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / part, target / part)

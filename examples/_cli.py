"""Command lines built from a config dataclass: one flag per field, whose ``--help`` line is the field's doc.

Every script under ``examples/`` and ``benchmarks/`` with a config dataclass builds its parser here, so the
flags, their help, their defaults and their choices come from one place:

* **help**: the field's documentation, taken from the ``# comment`` after the field in the class body or from the
  ``Attributes:`` section of the class docstring (a base class's fields keep their own docs). A field with no
  doc is an error when the parser is built, so ``--help`` never shows a bare flag.
* **default**: the value in the default preset; where presets differ, their values are listed too.
* **choices**: a ``Literal[...]`` annotation, or ``choices={"field": (...)}`` for values known only at run time
  (each item of a ``tuple[...]`` field is checked against them).
* **types**: ``bool`` fields are ``--flag/--no-flag``; ``tuple[X, ...]`` fields read ``a,b,c``; ``X | None``
  fields read ``X``.
* ``--preset NAME`` picks the base configuration (the word means that in every script); ``presets_help`` says
  in one line what each preset is.

``resolve_config`` returns the preset with every given flag replacing its field. Scripts with no config
dataclass (``sample.py``, ``export_pretrained.py``) use ``HelpFormatter``, which shows each flag's default.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

_ATTRIBUTE = re.compile(r"^(\w+)(?: \([^)]*\))?:\s*(.*)$")


def _attributes_section(doc: str | None) -> dict[str, str]:
    """``name: text`` entries of a Google-style ``Attributes:`` section (continuation lines joined)."""
    if not doc:
        return {}
    lines = inspect.cleandoc(doc).splitlines()
    try:
        start = lines.index("Attributes:")
    except ValueError:
        return {}
    docs: dict[str, str] = {}
    name = None
    for line in lines[start + 1 :]:
        if line and not line.startswith(" "):
            break  # the next section
        body = line.strip()
        match = _ATTRIBUTE.match(body) if line.startswith("    ") and not line.startswith("     ") else None
        if match:
            name = match.group(1)
            docs[name] = match.group(2)
        elif name and body:
            docs[name] += " " + body
    return docs


def _field_comments(cls: type) -> dict[str, str]:
    """Field comments in the body of ``cls`` (its own fields only): ``name: T = v  # doc`` or ``# doc`` lines above."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = {}
    comment_at = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    lines = source.splitlines()
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        inside = [row for row in range(node.lineno, node.end_lineno + 1) if row in comment_at]
        if inside:  # name: type = value  # doc (or a comment inside a value that the formatter wrapped)
            comments[node.target.id] = " ".join(comment_at[row] for row in inside)
            continue
        above, row = [], node.lineno - 1  # or the comment lines right above the field
        while row in comment_at and lines[row - 1].lstrip().startswith("#"):
            above.insert(0, comment_at[row])
            row -= 1
        if above:
            comments[node.target.id] = " ".join(above)
    return comments


def field_docs(config_cls: type) -> dict[str, str]:
    """The documentation of every field of ``config_cls``, from its class body comments or docstring.

    Args:
        config_cls: A dataclass.

    Returns:
        ``{field name: doc}``; a subclass's doc of a field wins over its base's.
    """
    docs: dict[str, str] = {}
    for cls in reversed(config_cls.__mro__):
        if dataclasses.is_dataclass(cls):
            docs.update(_attributes_section(cls.__doc__))
            docs.update(_field_comments(cls))
    return docs


def _plain(doc: str) -> str:
    """A field doc as a terminal shows it: no reST literal markup, no final full stop, ``%`` escaped."""
    return doc.replace("``", "").rstrip(".").replace("%", "%%")


def flag_name(field: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + field.replace("_", "-")


def show_value(value: Any) -> str:
    """A config value as ``--help`` shows it (tuples as ``a,b,c``, large ints with ``_``)."""
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "(empty)"
    if isinstance(value, str):
        return repr(value) if value == "" else value
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:_}"
    return str(value)


def _strip_none(annotation: Any) -> Any:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def _checked(kind: Callable[[str], Any], choices: Sequence[Any] | None) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        value = kind(text)
        if choices is not None and value not in choices:
            raise argparse.ArgumentTypeError(f"unknown {text!r}; choose from {', '.join(map(str, choices))}")
        return value

    convert.__name__ = getattr(kind, "__name__", "value")
    return convert


def _comma_list(kind: Callable[[str], Any], choices: Sequence[Any] | None) -> Callable[[str], tuple]:
    item = _checked(kind, choices)

    def convert(text: str) -> tuple:
        return tuple(item(v.strip()) for v in text.split(",") if v.strip())

    convert.__name__ = "comma-separated list"
    return convert


def _default_text(name: str, presets: Mapping[str, Any], default_preset: str) -> str:
    values = {preset: getattr(config, name) for preset, config in presets.items()}
    default = values[default_preset]
    others = [f"{preset}: {show_value(value)}" for preset, value in values.items() if value != default]
    text = f"default: {show_value(default)}"
    if others:
        text += f" (preset {default_preset}; " + "; ".join(others) + ")"
    return text.replace("%", "%%")


def add_config_arguments(
    parser: argparse.ArgumentParser,
    config_cls: type,
    presets: Mapping[str, Any],
    default_preset: str,
    *,
    presets_help: Mapping[str, str] | None = None,
    choices: Mapping[str, Sequence[Any]] | None = None,
    exclude: Sequence[str] = (),
) -> None:
    """Add ``--preset`` and one flag per field of ``config_cls`` (see the module docstring).

    Args:
        parser: The parser to extend.
        config_cls: The config dataclass.
        presets: Named instances of ``config_cls``.
        default_preset: The preset used without ``--preset``.
        presets_help: One line per preset saying what it is.
        choices: Allowed values of fields whose annotation does not say them.
        exclude: Fields that get no flag.

    Raises:
        TypeError: A field has no documentation, or a type that has no command-line form.
    """
    choices = dict(choices or {})
    described = presets_help or {}
    lines = [f"{name}: {described[name]}" if name in described else name for name in presets]
    docs = field_docs(config_cls)
    hints = typing.get_type_hints(config_cls)
    preset = _preset_name(presets, _field_values(config_cls, hints, choices, exclude))
    metavar = "{" + ",".join(presets) + "}"
    parser.add_argument(
        "--preset",
        type=preset,
        metavar=metavar,
        default=default_preset,
        help=("base configuration, one of: " + "; ".join(lines) + f" (default: {default_preset})").replace("%", "%%"),
    )
    # the word the benchmarks and the latent extractor used before; hidden, kept so old command lines still run
    parser.add_argument("--config", dest="preset", type=preset, metavar=metavar, help=argparse.SUPPRESS)
    for f in dataclasses.fields(config_cls):
        if f.name in exclude or not f.init:
            continue
        if not docs.get(f.name):
            raise TypeError(f"{config_cls.__name__}.{f.name} has no documentation to show in --help")
        flag = flag_name(f.name)
        annotation = _strip_none(hints[f.name])
        allowed = choices.get(f.name)
        help_text = _plain(docs[f.name]) + "; " + _default_text(f.name, presets, default_preset)
        if annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        if typing.get_origin(annotation) is Literal:
            allowed = typing.get_args(annotation)
            annotation = type(allowed[0])
        if typing.get_origin(annotation) is tuple:
            item = typing.get_args(annotation)[0]
            item = _strip_none(item)
            if typing.get_origin(item) is Literal:
                allowed = typing.get_args(item)
                item = type(allowed[0])
            if allowed is not None:
                help_text += "; items from: " + ", ".join(map(str, allowed))
            convert = _comma_list(item, allowed)
            parser.add_argument(flag, type=convert, default=None, metavar="A,B,...", help=help_text)
            continue
        if annotation not in (int, float, str):
            raise TypeError(f"{config_cls.__name__}.{f.name}: no command-line form for {hints[f.name]!r}")
        metavar = "{" + ",".join(map(str, allowed)) + "}" if allowed is not None and len(allowed) <= 6 else None
        if allowed is not None and metavar is None:
            help_text += "; choices: " + ", ".join(map(str, allowed))
        parser.add_argument(flag, type=_checked(annotation, allowed), default=None, metavar=metavar, help=help_text)


def _field_values(
    config_cls: type, hints: Mapping[str, Any], choices: Mapping[str, Sequence[Any]], exclude: Sequence[str]
) -> dict[str, str]:
    """``{value: flag}`` for the string values that a field's flag accepts (its ``Literal`` or given choices)."""
    values: dict[str, str] = {}
    for f in dataclasses.fields(config_cls):
        if f.name in exclude or not f.init:
            continue
        annotation = _strip_none(hints[f.name])
        if typing.get_origin(annotation) is tuple:
            annotation = _strip_none(typing.get_args(annotation)[0])
        allowed = typing.get_args(annotation) if typing.get_origin(annotation) is Literal else choices.get(f.name, ())
        for value in allowed:
            if isinstance(value, str):
                values.setdefault(value, flag_name(f.name))
    return values


def _preset_name(presets: Mapping[str, Any], field_values: Mapping[str, str]) -> Callable[[str], str]:
    """The ``--preset`` converter: a preset's name, or an error that points to the flag a field value belongs to."""

    def preset(text: str) -> str:
        if text in presets:
            return text
        message = f"unknown preset {text!r}; choose from {', '.join(presets)}"
        if text in field_values:  # e.g. a recipe name given to --preset, which names a run size
            flag = field_values[text]
            message += f". {text!r} is a value of {flag}: pass {flag} {text}"
        raise argparse.ArgumentTypeError(message)

    preset.__name__ = "preset"
    return preset


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """For parsers written by hand: the description as written, and each flag's default after its help."""


def config_parser(
    description: str | None,
    config_cls: type,
    presets: Mapping[str, Any],
    default_preset: str,
    **options: Any,
) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` whose description is ``description`` and whose flags are ``config_cls``'s fields.

    Args:
        description: Shown at the top of ``--help`` (usually the script's docstring).
        config_cls: The config dataclass.
        presets: Named instances of ``config_cls``.
        default_preset: The preset used without ``--preset``.
        **options: ``presets_help``, ``choices``, ``exclude`` of ``add_config_arguments``.

    Returns:
        The parser.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, config_cls, presets, default_preset, **options)
    return parser


def resolve_config(args: argparse.Namespace, config_cls: type, presets: Mapping[str, Any]) -> Any:
    """The preset ``args.preset`` with every field flag that was given replacing its value.

    Args:
        args: Parsed by a parser from ``config_parser`` / ``add_config_arguments``.
        config_cls: The config dataclass.
        presets: Named instances of ``config_cls``.

    Returns:
        The resolved config.
    """
    given = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls) if getattr(args, f.name, None) is not None
    }
    return dataclasses.replace(presets[args.preset], **given)


# the pip name of an optional import, where it differs from the module name
_PIP_NAMES = {"PIL": "pillow", "yaml": "pyyaml", "torch.utils.tensorboard": "tensorboard", "sklearn": "scikit-learn"}


def optional_import(module: str, purpose: str, extra: str = "examples") -> Any:
    """Import an optional dependency, or fail with a message naming the extra that installs it.

    Args:
        module: The module to import (``"tqdm"``, ``"PIL.Image"``, ``"h5py"``, ...).
        purpose: What needs it, in words (``"the progress bar"``).
        extra: The ``pyproject.toml`` extra that installs it.

    Returns:
        The imported module.

    Raises:
        ModuleNotFoundError: It is not installed; the message says ``pip install -e ".[extra]"``.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        top = module.split(".")[0]
        if error.name is not None and error.name != top and not module.startswith(error.name):
            raise  # something inside it is missing, not the package itself
        package = _PIP_NAMES.get(module, _PIP_NAMES.get(top, top))
        raise ModuleNotFoundError(
            f'{purpose} needs {package}, from the "{extra}" extra: pip install -e ".[{extra}]" '
            f"(or pip install {package})",
            name=error.name,
        ) from error

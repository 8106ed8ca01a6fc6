r"""Checkpoint I/O for the backbones: one reader for every file layout, models rebuilt from their weights, and
shareable pretrained folders.

**Reading.** [`read_state_dict`][soflow_core.nets.checkpoints.read_state_dict] takes a path or an
in-memory mapping and tells apart

* a bare state dict (``.pt``/``.pth``, or a ``.safetensors`` file);
* a training file that holds several entries: the official SoFlow training code saves
  ``{"model": ..., "ema_model": ..., <optimizer state>, <step>}``, this project's trainers save
  ``{"model": ..., "ema": ..., "optimizer": ..., "config": ...}``. EMA weights win whenever an
  EMA entry (``"ema"``, ``"ema_model"``) is present; otherwise ``"model"`` or ``"state_dict"``
  is used, or the entry you name;
* key prefixes shared by every key: ``"network."`` (the official wrapper object keeps its
  network under the attribute ``network``), ``"module."`` (DDP) and ``"_orig_mod."``
  (``torch.compile``), stripped in any nesting;
* a pretrained folder written by ``save_pretrained`` (see below).

Files are read with ``torch.load(weights_only=True)`` only, which allows tensors, plain containers
and (for the ``args`` of SiT's training files) ``argparse.Namespace``. The returned
[`CheckpointOrigin`][soflow_core.nets.checkpoints.CheckpointOrigin] says which entry and prefix
were used; the loaders also log it (logger ``soflow_core.nets.checkpoints``, level INFO).

**Loading.** [`load_weights`][soflow_core.nets.checkpoints.load_weights] checks every key and
shape against an existing model before it copies anything;
[`load_backbone`][soflow_core.nets.checkpoints.load_backbone] builds the model too, reading its
size from the shapes (the DiT size and label table, the SongUNet's channels, levels and
attention resolutions). What the shapes cannot tell (a DiT's number of heads for an
unregistered size, whether its last label row is the null class) is asked for by name.

**Pretrained folders.** ``model.save_pretrained(directory)`` writes ``config.json`` (the class,
the constructor arguments that rebuild it, the path and parameterization it samples with, a
SHA-256 of the weights and free-form metadata) and ``model.safetensors``, the format the
Hugging Face ecosystem expects; ``DiT.from_pretrained(directory)`` (or any backbone class)
rebuilds the model bit for bit. Both files are written atomically, the weights first, so a
crash never leaves a folder that loads. Safetensors is an optional dependency
(``pip install "soflow-core[pretrained]"``), imported only when a ``.safetensors`` file is
read or written.
"""

import argparse
import inspect
import json
import logging
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from soflow_core._files import atomic_save, atomic_write, sha256_file
from soflow_core._validation import check_bool
from soflow_core.parameterizations import AbstractParam, make_param, param_name
from soflow_core.paths import AbstractPath, make_path, path_name

__all__ = [
    "CONFIG_FILE",
    "PRETRAINED_FORMAT",
    "WEIGHTS_FILE",
    "AbstractBackbone",
    "CheckpointContents",
    "CheckpointOrigin",
    "LoadReport",
    "LoadedBackbone",
    "load_backbone",
    "load_weights",
    "read_state_dict",
    "resolve_config",
    "state_shape",
]

logger = logging.getLogger(__name__)

PRETRAINED_FORMAT = "soflow-pretrained-v1"
"""The ``format`` field of a pretrained folder's ``config.json``."""
CONFIG_FILE = "config.json"
"""The configuration file of a pretrained folder."""
WEIGHTS_FILE = "model.safetensors"
"""The weights file of a pretrained folder."""

_EMA_ENTRIES = ("ema", "ema_model")  # this project's trainers, the official training code
_RAW_ENTRIES = ("model", "state_dict")
_KEY_PREFIXES = ("module.", "_orig_mod.", "network.")
_SAFE_GLOBALS = [argparse.Namespace]  # allowed in weights_only loads besides tensors and containers
_INSTALL = 'pip install "soflow-core[pretrained]"'
_SHOWN = 5
_BACKBONES: dict[str, type["AbstractBackbone"]] = {}


def _listing(title: str, items: Sequence[str]) -> str:
    more = f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return f"{len(items)} {title}: {', '.join(items[:_SHOWN])}{more}"


def _safetensors() -> ModuleType:
    try:
        import safetensors.torch
    except ImportError as error:
        raise ImportError(f".safetensors files need the safetensors package: {_INSTALL}") from error
    return safetensors.torch


# ---------------------------------------------------------------------------- the backbone base class


class AbstractBackbone(nn.Module):
    """Base of the backbones that save and rebuild themselves (``DiT``, ``SongUNet``, ``MLPBackbone``).

    A subclass states its constructor arguments as [`config`][soflow_core.nets.checkpoints.AbstractBackbone.config]
    and reads them back from a state dict in ``config_from_state``; ``signature_keys`` are the
    keys that identify its state dicts. Subclasses are registered by class name, which is what
    a pretrained folder's ``config.json`` records.
    """

    signature_keys: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _BACKBONES.setdefault(cls.__name__, cls)

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this network (JSON values; runtime switches left out)."""
        raise NotImplementedError(f"{type(self).__name__} does not state its configuration")

    @classmethod
    def config_from_state(cls, state: Mapping[str, Tensor], **hints: Any) -> dict[str, Any]:
        """The constructor arguments of the network a state dict belongs to, read from its shapes.

        Args:
            state: The state dict (prefixes stripped).
            **hints: Constructor arguments the shapes cannot tell, or that must agree with them.

        Returns:
            Keyword arguments for the constructor.

        Raises:
            ValueError: If the shapes are inconsistent, or a hint is unknown or contradicts them.
        """
        raise NotImplementedError(f"{cls.__name__} cannot read its configuration from a state dict")

    @classmethod
    def describe_state(cls, state: Mapping[str, Tensor]) -> str:
        """One line on the network a state dict would fit, for error messages.

        Args:
            state: The state dict (prefixes stripped).

        Returns:
            The description.
        """
        try:
            config = cls.config_from_state(state)
        except ValueError as error:
            return f"a {cls.__name__} state dict ({error})"
        return f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in config.items())})"

    def save_pretrained(
        self,
        directory: str | os.PathLike,
        *,
        path: AbstractPath | str = "linear",
        param: AbstractParam | str = "euler",
        metadata: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write this network as a shareable folder: ``config.json`` and ``model.safetensors``.

        The weights are written as they are (dtype and values), then the configuration; each
        file atomically. ``config.json`` records the class, the constructor arguments
        ([`config`][soflow_core.nets.checkpoints.AbstractBackbone.config]), the path and
        parameterization to sample with, the SHA-256 of the weights and
        ``metadata``. Existing files of the same names are replaced.

        Args:
            directory: The folder (created if needed).
            path: The noising path the network was trained with (multi-step sampling re-noises along it).
            param: The parameterization f = a·x + b·F it was trained with.
            metadata: JSON-serialisable extras (training config, step, scores, licence, ...).

        Returns:
            The folder.

        Raises:
            ValueError: If ``metadata`` is not JSON-serialisable or the weights are not materialised.

        Examples:
            >>> import tempfile
            >>> from soflow_core.nets import DiT
            >>> net = DiT(input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=1, num_heads=2)
            >>> with tempfile.TemporaryDirectory() as tmp:
            ...     same = DiT.from_pretrained(net.save_pretrained(tmp))
            >>> all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), same.state_dict().values()))
            True
        """
        names = {
            "path": path_name(make_path(path) if isinstance(path, str) else path),
            "param": param_name(make_param(param) if isinstance(param, str) else param),
        }
        folder = Path(directory)
        state = {}
        for key, value in self.state_dict().items():
            if value.is_meta or type(value) is not Tensor:
                raise ValueError(
                    f"{key} is not a materialised tensor ({type(value).__name__} on {value.device}); "
                    "save a full, unsharded copy of the network (for instance the EMA copy)"
                )
            state[key] = value.detach().to("cpu").contiguous()
        document = {
            "format": PRETRAINED_FORMAT,
            "class": type(self).__name__,
            "config": self.config,
            "sampling": names,
            "weights": {},
            "metadata": dict(metadata or {}),
        }
        try:
            json.dumps(document, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ValueError(f"metadata must be JSON-serialisable: {error}") from error
        safetensors = _safetensors()
        folder.mkdir(parents=True, exist_ok=True)
        weights = folder / WEIGHTS_FILE
        atomic_save(weights, lambda tmp: safetensors.save_file(state, str(tmp), metadata={"format": "pt"}))
        document["weights"] = {
            "file": WEIGHTS_FILE,
            "sha256": sha256_file(weights),
            "bytes": weights.stat().st_size,
            "parameters": sum(v.numel() for v in self.parameters()),
            "dtypes": sorted({str(v.dtype).removeprefix("torch.") for v in state.values()}),
        }
        document["versions"] = {"torch": str(torch.__version__)}
        text = json.dumps(document, indent=2) + "\n"
        atomic_write(folder / CONFIG_FILE, lambda f: f.write(text.encode()))
        logger.info("saved %s to %s", type(self).__name__, folder)
        return folder

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        verify: bool = True,
        **overrides: Any,
    ) -> "AbstractBackbone":
        """Rebuild a network from a folder written by ``save_pretrained``, in eval mode.

        Called on a backbone class, the folder must hold that class (or a subclass); called on
        ``AbstractBackbone``, any registered class.

        Args:
            directory: The folder.
            device: Where to put the network (default: the CPU).
            dtype: A floating dtype to cast to (default: the stored dtype, bit for bit).
            verify: Check the SHA-256 of the weights against ``config.json``.
            **overrides: Constructor arguments that replace the stored ones (``dropout``,
                ``gradient_checkpointing``, ...); shapes must still match.

        Returns:
            The network.

        Raises:
            ValueError: If the folder holds another class, or see
                [`load_backbone`][soflow_core.nets.checkpoints.load_backbone].
        """
        contents = read_state_dict(directory, verify=verify)
        if contents.pretrained is None:
            raise ValueError(f"{directory} is not a pretrained folder ({CONFIG_FILE} + {WEIGHTS_FILE})")
        stored = _backbone_class(contents.pretrained.get("class"))
        if not issubclass(stored, cls):
            raise ValueError(f"{directory} holds a {stored.__name__}, not a {cls.__name__}")
        return load_backbone(contents, device=device, dtype=dtype, **overrides).model


def _backbone_class(name: object) -> type[AbstractBackbone]:
    if not isinstance(name, str) or name not in _BACKBONES:
        raise ValueError(f"unknown backbone class {name!r}; known: {', '.join(sorted(_BACKBONES))}")
    return _BACKBONES[name]


def _same(a: object, b: object) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def resolve_config(cls: type, inferred: Mapping[str, Any], hints: Mapping[str, Any]) -> dict[str, Any]:
    """Merge constructor arguments read from weights with given ones; a given one may not contradict a read one.

    Args:
        cls: The backbone class.
        inferred: Arguments read from the shapes.
        hints: Arguments given by the caller.

    Returns:
        The merged keyword arguments.

    Raises:
        ValueError: If a hint is not a constructor argument of ``cls`` or contradicts the weights.
    """
    accepted = [
        n for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self" and p.kind.name != "VAR_KEYWORD"
    ]
    unknown = sorted(set(hints) - set(accepted))
    if unknown:
        raise ValueError(
            f"{cls.__name__} has no argument {', '.join(unknown)}; its arguments are {', '.join(accepted)}"
        )
    clashes = [
        f"{k}={v!r} (the weights say {inferred[k]!r})"
        for k, v in hints.items()
        if k in inferred and not _same(v, inferred[k])
    ]
    if clashes:
        raise ValueError(f"the checkpoint does not fit the given arguments: {'; '.join(clashes)}")
    return {**inferred, **hints}


def state_shape(state: Mapping[str, Tensor], key: str, ndim: int) -> tuple[int, ...]:
    """The shape of ``state[key]``, which must exist with ``ndim`` dimensions.

    Args:
        state: The state dict.
        key: The entry.
        ndim: Its expected number of dimensions.

    Returns:
        The shape.

    Raises:
        ValueError: If the key is missing or has another number of dimensions.
    """
    value = state.get(key)
    if not isinstance(value, Tensor):
        raise ValueError(f"the state dict has no {key}")
    if value.ndim != ndim:
        raise ValueError(f"{key} must have {ndim} dimensions; got shape {tuple(value.shape)}")
    return tuple(int(n) for n in value.shape)


def _backbone_class_of(state: Mapping[str, Tensor]) -> type[AbstractBackbone]:
    """The registered class whose signature keys the state dict holds."""
    found = [c for c in _BACKBONES.values() if "signature_keys" in vars(c) and c.signature_keys <= state.keys()]
    if len(found) != 1:
        names = ", ".join(sorted(c.__name__ for c in _BACKBONES.values() if "signature_keys" in vars(c)))
        keys = sorted(state)
        raise ValueError(
            f"the state dict fits {'none' if not found else 'more than one'} of the backbones ({names}); "
            + _listing("key(s)", keys)
        )
    return found[0]


# ---------------------------------------------------------------------------- reading


@dataclass(frozen=True, kw_only=True)
class CheckpointOrigin:
    """Where a state dict came from and how it was unwrapped.

    Attributes:
        location: The file or folder read, or ``"<mapping>"`` for an in-memory dict.
        layout: ``"state dict"``, ``"training checkpoint"``, ``"safetensors file"`` or ``"pretrained folder"``.
        entry: The entry of a training checkpoint that was used (``"ema_model"``, ``"ema"``,
            ``"model"``, nested ones joined by ``/``), or None.
        prefix: The key prefix that was stripped (``"network."``, ``"module._orig_mod."``, ...), or ``""``.
    """

    location: str
    layout: str
    entry: str | None = None
    prefix: str = ""

    @property
    def ema(self) -> bool:
        """Whether the weights are an EMA entry of a training checkpoint."""
        return self.entry is not None and self.entry.split("/")[0] in _EMA_ENTRIES

    def __str__(self) -> str:
        text = f"{self.layout} {self.location}"
        if self.entry is not None:
            text += f", entry {self.entry!r} ({'EMA' if self.ema else 'raw, not EMA'} weights)"
        return text + (f", key prefix {self.prefix!r} stripped" if self.prefix else "")


@dataclass(frozen=True, kw_only=True)
class CheckpointContents:
    """A state dict as read from a checkpoint, with its origin.

    Attributes:
        state: Parameter and buffer names (prefixes stripped) to tensors, on the CPU.
        origin: Where it came from.
        pretrained: The ``config.json`` of a pretrained folder, else None.
    """

    state: dict[str, Tensor]
    origin: CheckpointOrigin
    pretrained: dict[str, Any] | None = None

    @property
    def backbone_class(self) -> type[AbstractBackbone]:
        """The backbone class the weights belong to (recorded in a pretrained folder, else recognised by its keys).

        Raises:
            ValueError: If no registered class, or more than one, fits.
        """
        if self.pretrained is not None:
            return _backbone_class(self.pretrained.get("class"))
        return _backbone_class_of(self.state)


def _is_state_dict(obj: Mapping[str, object]) -> bool:
    return bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def _unwrap(obj: object, entry: str | None, *, outer: bool = True) -> tuple[Mapping[str, object], str | None]:
    """The state dict inside a checkpoint and the entry it came from (EMA entries first)."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"a checkpoint must be a state dict (a mapping); got {type(obj).__name__}")
    if entry is not None:
        if entry not in obj:
            raise ValueError(f"entry {entry!r} is not in the checkpoint; its keys are {sorted(map(str, obj))[:10]}")
        inner, sub = _unwrap(obj[entry], None, outer=False)
        return inner, entry if sub is None else f"{entry}/{sub}"
    if _is_state_dict(obj):
        return obj, None
    for key in (*_EMA_ENTRIES, *_RAW_ENTRIES):
        if isinstance(obj.get(key), Mapping):
            inner, sub = _unwrap(obj[key], None, outer=False)
            return inner, key if sub is None else f"{key}/{sub}"
    if not outer:  # an entry's value: the caller reports what in it is not a tensor
        return obj, None
    odd = [str(k) for k, v in obj.items() if not isinstance(v, Tensor)]
    raise ValueError(
        f"checkpoint is neither a state dict nor a container with one of "
        f"{(*_EMA_ENTRIES, *_RAW_ENTRIES)}; " + _listing("non-tensor entries", odd)
    )


def _strip_prefixes(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """Drop the DDP, torch.compile and wrapper prefixes that every key shares; return what was dropped."""
    out, dropped = dict(state), ""
    changed = True
    while changed and out:
        changed = False
        for prefix in _KEY_PREFIXES:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                dropped += prefix
                changed = True
    return out, dropped


def _torch_load(path: Path) -> object:
    try:
        # SiT's training files keep their command line as an argparse.Namespace of plain values.
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(
            f"{path} cannot be read with torch.load(weights_only=True): {str(error).splitlines()[0]}. "
            "Only tensors and plain containers load safely; save the state dict (net.state_dict()) instead."
        ) from error


def _read_pretrained(folder: Path, verify: bool) -> CheckpointContents:
    config_path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a pretrained folder: {CONFIG_FILE} is missing "
            f"(save_pretrained writes {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    try:
        document = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from error
    if not isinstance(document, dict) or document.get("format") != PRETRAINED_FORMAT:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise ValueError(f"{config_path} has format {found!r}, not {PRETRAINED_FORMAT!r}")
    for key in ("class", "config", "weights"):
        if key not in document:
            raise ValueError(f"{config_path} has no {key!r} field")
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: the pretrained folder {folder} is incomplete")
    if verify:
        expected = document["weights"].get("sha256")
        if sha256_file(weights) != expected:
            raise ValueError(
                f"{weights} does not match the SHA-256 in {config_path}: the folder is incomplete, "
                "damaged, or its two files come from different saves"
            )
    state = _safetensors().load_file(str(weights))
    origin = CheckpointOrigin(location=str(folder), layout="pretrained folder")
    return CheckpointContents(state=state, origin=origin, pretrained=document)


def read_state_dict(
    source: "CheckpointContents | Mapping[str, object] | str | os.PathLike",
    *,
    entry: str | None = None,
    verify: bool = True,
) -> CheckpointContents:
    """Read the state dict of a checkpoint in any supported layout, unwrapped and without prefixes.

    Args:
        source: A pretrained folder, a ``.safetensors`` file, a ``.pt``/``.pth`` file (bare
            state dict or training checkpoint), an in-memory mapping of either kind, or
            contents already read (returned as they are).
        entry: The entry of a training checkpoint to use; None picks an EMA entry when there
            is one (``"ema"``, ``"ema_model"``), else ``"model"`` or ``"state_dict"``.
        verify: For a pretrained folder, check the SHA-256 of its weights.

    Returns:
        The state dict and where it came from.

    Raises:
        FileNotFoundError: If the path does not exist, or a pretrained folder lacks a file.
        ValueError: If the file cannot be read safely, holds no recognisable state dict, or
            ``entry`` is given for a source without entries.
        TypeError: If ``source`` is neither a path nor a mapping.

    Examples:
        >>> import torch
        >>> official = {"model": {"network.w": torch.zeros(2)}, "ema_model": {"network.w": torch.ones(2)}, "steps": 9}
        >>> contents = read_state_dict(official)
        >>> contents.state
        {'w': tensor([1., 1.])}
        >>> print(contents.origin)
        training checkpoint <mapping>, entry 'ema_model' (EMA weights), key prefix 'network.' stripped
    """
    check_bool("verify", verify)
    if isinstance(source, CheckpointContents):
        if entry is not None:
            raise ValueError(f"entry={entry!r} was given for contents already read from {source.origin.location}")
        return source
    location = "<mapping>"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        location = str(path)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        if path.is_dir() or path.suffix == ".safetensors":
            if entry is not None:
                raise ValueError(f"entry={entry!r} was given, but {path} holds a single state dict")
            if path.is_dir():
                return _read_pretrained(path, verify)
            state, prefix = _strip_prefixes(_safetensors().load_file(str(path)))
            return CheckpointContents(
                state=state, origin=CheckpointOrigin(location=location, layout="safetensors file", prefix=prefix)
            )
        source = _torch_load(path)  # type: ignore[assignment]
    if not isinstance(source, Mapping):
        raise TypeError(f"a checkpoint must be a path or a mapping; got {type(source).__name__}")
    inner, used = _unwrap(source, entry)
    odd = [str(k) for k, v in inner.items() if not isinstance(v, Tensor)]
    if odd:
        raise ValueError(f"entry {used!r} is not a state dict; " + _listing("non-tensor values", odd))
    state, prefix = _strip_prefixes(inner)  # type: ignore[arg-type]
    layout = "state dict" if used is None else "training checkpoint"
    return CheckpointContents(
        state=state, origin=CheckpointOrigin(location=location, layout=layout, entry=used, prefix=prefix)
    )


# ---------------------------------------------------------------------------- loading


@dataclass(frozen=True, kw_only=True)
class LoadReport:
    """What [`load_weights`][soflow_core.nets.checkpoints.load_weights] loaded.

    Attributes:
        origin: Where the weights came from (entry, prefix).
        missing: Model keys the checkpoint did not provide (always empty when strict).
    """

    origin: CheckpointOrigin
    missing: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class LoadedBackbone:
    """A network built by [`load_backbone`][soflow_core.nets.checkpoints.load_backbone] and what came with it.

    Attributes:
        model: The network, in eval mode.
        config: The constructor arguments it was built with.
        origin: Where the weights came from.
        path: The noising path recorded by a pretrained folder, else None.
        param: The parameterization recorded by a pretrained folder, else None.
        metadata: The free-form metadata of a pretrained folder, else None.
    """

    model: AbstractBackbone
    config: dict[str, Any]
    origin: CheckpointOrigin
    path: AbstractPath | None = None
    param: AbstractParam | None = None
    metadata: dict[str, Any] | None = None


def _unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside DDP (``.module``) and torch.compile (``._orig_mod``) wrappers, possibly nested."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    for _ in range(4):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if isinstance(model, AbstractBackbone) or not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def _check_fits(model: nn.Module, state: Mapping[str, Tensor], *, strict: bool) -> list[str]:
    """Compare keys and shapes with the model's; raise one error that lists every problem. Returns missing keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if mismatched or (strict and (missing or unexpected)):
        problems = [
            _listing(title, items)
            for title, items in (
                ("missing key(s)", missing),
                ("unexpected key(s)", unexpected),
                ("shape mismatch(es)", mismatched),
            )
            if items
        ]
        try:
            described = _backbone_class_of(state).describe_state(state)
        except ValueError:
            described = None
        fits = f"\nthe checkpoint looks like: {described}" if described else ""
        ours = type(model).__name__
        if isinstance(model, AbstractBackbone):
            ours += "(" + ", ".join(f"{k}={v!r}" for k, v in model.config.items()) + ")"
        raise ValueError(f"checkpoint does not fit this {ours}:\n" + "\n".join(problems) + fits)
    return missing


def load_weights(
    model: nn.Module,
    source: "CheckpointContents | Mapping[str, object] | str | os.PathLike",
    *,
    strict: bool = True,
    entry: str | None = None,
) -> LoadReport:
    """Load a checkpoint in any supported layout into ``model``, after checking every key and shape.

    See [`read_state_dict`][soflow_core.nets.checkpoints.read_state_dict] for the layouts and
    the choice of entry (EMA weights win). Nothing is loaded unless the check passes: otherwise
    a ``ValueError`` lists the missing keys, unexpected keys and shape mismatches (the first
    few of each, with counts) and the network the checkpoint would fit. Values are copied into
    the model's own tensors (and dtype).

    Args:
        model: The network to load into (DDP and compiled wrappers are unwrapped).
        source: A checkpoint path, a mapping, or contents already read.
        strict: Require exactly the model's keys; when False, missing and unexpected keys are
            allowed (missing ones are reported) but shapes must still match.
        entry: The entry of a training checkpoint, or None to prefer EMA weights.

    Returns:
        Which entry and prefix were used, and the missing keys.

    Raises:
        ValueError: If keys or shapes do not match the model.
        TypeError: If ``model`` is not a module or the checkpoint not a mapping of tensors.

    Examples:
        >>> from soflow_core.nets import DiT
        >>> src = DiT(input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=1, num_heads=2)
        >>> dst = DiT(input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=1, num_heads=2)
        >>> official = {"model": {}, "ema_model": {f"network.{k}": v for k, v in src.state_dict().items()}}
        >>> load_weights(dst, official).origin.entry
        'ema_model'
    """
    check_bool("strict", strict)
    model = _unwrap_model(model)
    contents = read_state_dict(source, entry=entry)
    missing = _check_fits(model, contents.state, strict=strict)
    expected = model.state_dict()
    model.load_state_dict({k: v for k, v in contents.state.items() if k in expected}, strict=not missing)
    logger.info("loaded %s into %s", contents.origin, type(model).__name__)
    return LoadReport(origin=contents.origin, missing=tuple(missing))


def load_backbone(
    source: "CheckpointContents | Mapping[str, object] | str | os.PathLike",
    *,
    entry: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    verify: bool = True,
    **hints: Any,
) -> LoadedBackbone:
    """Build the network a checkpoint holds and load it: no model needed beforehand.

    A pretrained folder records its class and configuration (``hints`` then override stored
    arguments). Any other layout is recognised by its keys and the configuration is read from
    its shapes through the class's ``config_from_state``; ``hints`` give what shapes cannot
    tell (a DiT's ``num_classes``, which decides whether the last label row is the null class;
    ``num_heads`` for a size not in ``DIT_SIZES``; a SongUNet's ``dropout``) and must agree with
    what they can. The network is built on the ``meta`` device and takes the checkpoint's
    tensors as they are (so its dtype), then moves to ``device``/``dtype``.

    Args:
        source: A checkpoint path, a mapping, or contents already read.
        entry: The entry of a training checkpoint, or None to prefer EMA weights.
        device: Where to put the network (default: the CPU).
        dtype: A floating dtype to cast to (default: the stored one).
        verify: For a pretrained folder, check the SHA-256 of its weights.
        **hints: Constructor arguments (see above).

    Returns:
        The network in eval mode, its configuration, origin, and (from a pretrained folder) the
        path, parameterization and metadata it was saved with.

    Raises:
        ValueError: If the layout, class, configuration or shapes do not fit, naming what
            would (see [`load_weights`][soflow_core.nets.checkpoints.load_weights]).

    Examples:
        >>> from soflow_core.nets import SongUNet
        >>> net = SongUNet(img_resolution=8, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
        >>> loaded = load_backbone({"ema_model": {f"network.{k}": v for k, v in net.state_dict().items()}})
        >>> loaded.config["channel_mult"], loaded.config["attn_resolutions"]
        ([1, 2], [4])
    """
    contents = read_state_dict(source, entry=entry, verify=verify)
    cls = contents.backbone_class
    path = param = metadata = None
    if contents.pretrained is not None:
        config = resolve_config(cls, {}, {**contents.pretrained["config"], **hints})
        sampling = contents.pretrained.get("sampling") or {}
        path = make_path(sampling["path"]) if "path" in sampling else None
        param = make_param(sampling["param"]) if "param" in sampling else None
        metadata = contents.pretrained.get("metadata")
    else:
        config = cls.config_from_state(contents.state, **hints)
    with torch.device("meta"):
        try:
            model = cls(**config)
        except TypeError as error:
            raise ValueError(f"the configuration does not build a {cls.__name__}: {error}") from error
    _check_fits(model, contents.state, strict=True)
    model.load_state_dict(contents.state, strict=True, assign=True)
    model.to(device=device or "cpu", dtype=dtype).eval()
    logger.info("built %s from %s", cls.__name__, contents.origin)
    return LoadedBackbone(
        model=model, config=model.config, origin=contents.origin, path=path, param=param, metadata=metadata
    )

"""A network and how to sample it, from any checkpoint the examples accept.

Shared by sample.py and export_pretrained.py.

``--ckpt`` may be

* a run folder of the example trainers (its newest valid checkpoint, verified against its
  manifest) or one of its ``step-*.pt`` files: the network is built from the run's config and the
  path and parameterization are those of the run's objective preset;
* a pretrained folder (``config.json`` + ``model.safetensors``): it records the network, the path
  and the parameterization;
* an official SoFlow training file (entries ``model`` and ``ema_model``, keys ``network.*``), a
  bare state dict (``.pt``/``.pth``) or a ``.safetensors`` file: the network (DiT or SongUNet) and
  its size are read from the shapes; ``--model`` names the DiT size to expect (needed for a size
  the weights cannot tell, such as the small test sizes), ``--num-classes`` says how many classes
  a DiT label table holds (1000 or 1001 rows both fit 1000 classes: with and without the null
  row). The path and parameterization are ``--path``/``--param``, else the ``noising_type`` and
  ``coefficient_type`` of a ``config.yaml`` in the file's folder or the one above (the official
  training config, which the released models ship beside their checkpoints), else linear/euler;
* a released model folder as the official repository ships it (``config.yaml`` and a ``ckpts/``
  folder): ``--ckpt-steps N`` picks the checkpoint file of step N in ``ckpts/`` (the one whose
  name holds the number N), as the official ``inference.py --ckpt-steps N`` does.

EMA weights are used whenever the file holds them; ``--entry`` picks another entry.
"""

import argparse
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _training as T
import torch
from _resume import load_run_checkpoint
from torch import nn

from soflow_core import SoFlowObjective
from soflow_core.nets import DiT, SongUNet, load_backbone, load_weights, read_state_dict
from soflow_core.parameterizations import AbstractParam, make_param, param_name
from soflow_core.paths import AbstractPath, make_path, path_name


@dataclass(frozen=True)
class OpenedModel:
    """A network in eval mode, the path and parameterization it samples with, and where it came from."""

    net: nn.Module
    path: AbstractPath
    param: AbstractParam
    source: str  # what was loaded, in words
    metadata: dict[str, Any]  # what an export records about the source


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that name the model to open (``--help`` shows their defaults: use ``_cli.HelpFormatter``)."""
    parser.add_argument("--ckpt", required=True, help="run folder, step-*.pt, pretrained folder, official .pt, ...")
    parser.add_argument("--ckpt-steps", type=int, default=None, help="step of the checkpoint in <--ckpt>/ckpts/")
    parser.add_argument(
        "--weights",
        default="ema",
        choices=("ema", "raw"),
        help="the EMA weights, or the raw (last optimizer step) weights of a training checkpoint",
    )
    parser.add_argument("--entry", default=None, help="entry of a training file to read (overrides --weights)")
    parser.add_argument("--model", default=None, help=f"DiT size to expect: {', '.join(T.ALL_DIT_SIZES)}")
    parser.add_argument("--num-classes", type=int, default=1000, help="classes of a DiT label table")
    parser.add_argument("--path", default=None, choices=("linear", "trig"), help="noising path (re-noising)")
    parser.add_argument("--param", default=None, choices=("euler", "trig"), help="parameterization")


def _entry(args: argparse.Namespace) -> str | None:
    """The training-file entry to read: ``--entry``, else the one ``--weights`` names (None: the file's EMA one)."""
    if args.entry is not None:
        return args.entry
    return "model" if args.weights == "raw" else None


def check_source_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.model is not None and args.model not in T.ALL_DIT_SIZES:
        parser.error(f"--model must be one of {', '.join(T.ALL_DIT_SIZES)}; got {args.model!r}")
    if args.num_classes < 1:
        parser.error(f"--num-classes must be >= 1; got {args.num_classes}")
    if not Path(args.ckpt).exists():
        parser.error(f"--ckpt {args.ckpt} does not exist")


def image_shape(net: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of the network's inputs."""
    if isinstance(net, DiT):
        return net.in_channels, net.input_size, net.input_size
    if isinstance(net, SongUNet):
        return net.in_channels, net.img_resolution, net.img_resolution
    raise SystemExit(f"sampling images needs a DiT or a SongUNet; got {type(net).__name__}")


def _sampling(args: argparse.Namespace, path: AbstractPath | None, param: AbstractParam | None, where: str):
    """--path/--param over what the source records, over linear/euler; say when they override the source."""
    chosen = []
    for flag, saved, make, name, default in (
        ("path", path, make_path, path_name, "linear"),
        ("param", param, make_param, param_name, "euler"),
    ):
        given = getattr(args, flag)
        if given is not None and saved is not None and given != name(saved):
            warnings.warn(f"--{flag} {given} overrides {name(saved)!r}, which {where} records", stacklevel=2)
        chosen.append(make(given) if given is not None else saved or make(default))
    return chosen


def released_checkpoint(folder: Path, steps: int | None) -> Path | None:
    """The checkpoint file of a released model folder (``config.yaml`` + ``ckpts/``), or None for other paths."""
    if not (folder.is_dir() and (folder / "ckpts").is_dir()):
        return None
    files = sorted(p for p in (folder / "ckpts").iterdir() if p.suffix in (".pt", ".pth", ".safetensors"))
    if steps is not None:
        files = [p for p in files if steps in [int(d) for d in re.findall(r"\d+", p.stem)]]
    if len(files) != 1:
        listed = ", ".join(p.name for p in sorted((folder / "ckpts").iterdir())) or "nothing"
        wanted = f"one for step {steps}" if steps is not None else "a single one (or pass --ckpt-steps N)"
        raise SystemExit(f"{folder / 'ckpts'} holds {listed}; need {wanted}")
    return files[0]


def official_sampling(checkpoint: Path) -> tuple[dict[str, str], Path | None]:
    """``noising_type`` and ``coefficient_type`` of the official ``config.yaml`` beside a checkpoint (any nesting)."""
    found = [c for c in (checkpoint.parent / "config.yaml", checkpoint.parent.parent / "config.yaml") if c.is_file()]
    if not found:
        return {}, None
    try:
        import yaml
    except ImportError:
        log(f"{found[0]} not read: it needs pyyaml (pip install pyyaml); pass --path and --param")
        return {}, None

    def walk(node: object):
        if isinstance(node, dict):
            for key, value in node.items():
                yield key, value
                yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)

    pairs = dict(walk(yaml.safe_load(found[0].read_text())))
    names = {"path": pairs.get("noising_type"), "param": pairs.get("coefficient_type")}
    return {k: str(v) for k, v in names.items() if v is not None}, found[0]


def _dit_size_hints(args: argparse.Namespace) -> dict[str, int]:
    if args.model is None:
        return {}
    size = T.ALL_DIT_SIZES[args.model]
    return {
        "patch_size": size.patch_size,
        "hidden_size": size.hidden_size,
        "depth": size.depth,
        "num_heads": size.num_heads,
    }


def open_model(args: argparse.Namespace) -> OpenedModel:
    """The network of ``args.ckpt`` (see the module docstring), float32 on the CPU, in eval mode."""
    source = Path(args.ckpt)
    released = released_checkpoint(source, args.ckpt_steps)
    if released is None and args.ckpt_steps is not None:
        raise SystemExit(f"--ckpt-steps needs a released model folder (config.yaml + ckpts/); {source} is not one")
    source = released or source
    run = load_run_checkpoint(source)  # verified, loadable and complete; unusable ones reported and skipped
    if run is not None:
        run_file, payload = run
        config = payload["config"]
        net = T.build_net(config)
        try:
            report = load_weights(net, payload, entry=_entry(args) or "ema")
        except ValueError as error:
            raise SystemExit(f"--ckpt {run_file}: {error}") from error
        # the path and parameterization the run trained with (runs recorded before the recipe flags: the preset's)
        preset = SoFlowObjective.from_preset(config["task"])
        trained_path = make_path(config["path"]) if "path" in config else preset.path
        trained_param = make_param(config["param"]) if "param" in config else preset.param
        path, param = _sampling(args, trained_path, trained_param, f"the run's config ({run_file})")
        described = f"run checkpoint {run_file} (step {payload['step']}), entry {report.origin.entry!r}"
        metadata = {"source": str(run_file), "step": payload["step"], "entry": report.origin.entry, "run": config}
        return OpenedModel(net.float().eval(), path, param, described, metadata)

    try:
        contents = read_state_dict(source, entry=_entry(args))
        cls = contents.backbone_class
        hints: dict[str, Any] = {}
        if args.model is not None and cls is not DiT:
            raise ValueError(f"it holds a {cls.__name__}, but --model {args.model} names a DiT size")
        if contents.pretrained is not None:
            stored = {k: contents.pretrained["config"].get(k) for k in _dit_size_hints(args)}
            if stored != _dit_size_hints(args):
                raise ValueError(f"it holds a DiT with {stored}, not --model {args.model}")
        elif cls is DiT:
            hints = _dit_size_hints(args)
            if "y_embedder.embedding_table.weight" in contents.state:
                hints["num_classes"] = args.num_classes
        loaded = load_backbone(contents, dtype=torch.float32, **hints)
        path, param, where = loaded.path, loaded.param, str(source)
        if contents.pretrained is None:
            names, yaml_file = official_sampling(source)
            path = make_path(names["path"]) if "path" in names else None
            param = make_param(names["param"]) if "param" in names else None
            where = str(yaml_file)
    except ValueError as error:
        raise SystemExit(f"--ckpt {source}: {error}") from error
    path, param = _sampling(args, path, param, where)
    metadata = {"source": str(loaded.origin), "entry": loaded.origin.entry, "saved": loaded.metadata}
    return OpenedModel(loaded.model, path, param, str(loaded.origin), metadata)


def describe(model: OpenedModel) -> str:
    net = model.net
    config = getattr(net, "config", {})
    return (
        f"{type(net).__name__}({', '.join(f'{k}={v}' for k, v in config.items())}) from {model.source}; "
        f"path {path_name(model.path)}, param {param_name(model.param)}"
    )


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)

"""Write a model as a shareable pretrained folder: config.json + model.safetensors (EMA weights).

    # the EMA weights of a run (its newest valid checkpoint, verified)
    python examples/export_pretrained.py --ckpt runs/dit_b4 --out published/dit_b4
    # a released SoFlow checkpoint, converted (EMA entry; size read from the weights)
    python examples/export_pretrained.py --ckpt SoFlow/XL-2-cond/ckpts/<step 1200000>.pt --out published/xl2

--ckpt takes the same sources as sample.py (see examples/_models.py). The folder records the
network's class and constructor arguments, the path and parameterization to sample with, a
SHA-256 of the weights and where they came from (for a run: the checkpoint, step and training
config). It loads without this project's training code:

    from soflow_core.nets import AbstractBackbone
    net = AbstractBackbone.from_pretrained("published/dit_b4")

and samples with ``python examples/sample.py --ckpt published/dit_b4``; the trainers fine-tune
from it with ``--init published/dit_b4``.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _models as M
from _cli import HelpFormatter


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    M.add_source_arguments(parser)
    parser.add_argument("--out", required=True, help="the pretrained folder to write")
    args = parser.parse_args(argv)
    M.check_source_arguments(parser, args)
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse(argv)
    model = M.open_model(args)
    M.log(f"exporting {M.describe(model)}")
    folder = model.net.save_pretrained(args.out, path=model.path, param=model.param, metadata=model.metadata)
    print(f"wrote {folder / 'config.json'} and {folder / 'model.safetensors'}")
    return folder


if __name__ == "__main__":
    main()

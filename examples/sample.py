"""Draw N samples at 1 or 2 NFE from a SoFlow model into an ADM-evaluator .npz and a PNG grid.

    # EMA weights of a run (its newest valid checkpoint, verified), 50k samples for FID
    torchrun --nproc_per_node 8 examples/sample.py --ckpt runs/dit_b4 --vae checkpoints/sd-vae-ft-mse \\
        --num-samples 50000 --nfe 1 --out runs/samples/dit_b4_nfe1.npz
    # a released SoFlow model (git clone https://huggingface.co/zlab-princeton/SoFlow): its EMA weights,
    # the size read from the weights, path and parameterization from its config.yaml
    torchrun --nproc_per_node 8 examples/sample.py --ckpt SoFlow/XL-2-cond --ckpt-steps 1200000 \\
        --vae checkpoints/sd-vae-ft-mse --num-samples 50000 --nfe 2 --out runs/samples/xl2_nfe2.npz
    # the raw (not EMA) weights of a short run: an EMA of a few hundred steps is still mostly the initial weights
    python examples/sample.py --ckpt runs/dit_imagenet_tiny --weights raw --num-samples 16 --out /tmp/raw.npz
    # a pretrained folder (config.json + model.safetensors)
    python examples/sample.py --ckpt published/dit_b4 --vae checkpoints/sd-vae-ft-mse --out runs/samples/b4.npz

--ckpt takes a run folder or step-*.pt file of the example trainers, a pretrained folder, an
official SoFlow training file (or a released model folder with --ckpt-steps), a bare state dict
or a .safetensors file; the DiT or SongUNet and its size are read from the weights (see
examples/_models.py for --model, --num-classes, --entry, --path, --param). Class labels of a
conditional DiT are drawn uniformly at random per sample (not class-balanced), with no
inference-time guidance (ω is baked in at training). Sample i draws its noise and label from a
seed derived from (--seed, i), and the re-noising of 2-NFE sampling from (--seed, batch), so
the output does not depend on the number of ranks. Each rank writes its batches to a part file;
rank 0 concatenates them in order into ``arr_0`` (uint8, N×H×W×3), what the ADM evaluator
reads, and writes ``<out>.png`` with the first ``--grid`` samples; ``--out`` (default
``runs/samples/<checkpoint name>-nfe<N>.npz``) is git-ignored there. Four-channel models are
SD-VAE latent models and need ``--vae`` to give images; without it the first three latent
channels are written (not for FID).
"""

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _models as M
from _cli import HelpFormatter
from _images import latent_preview, save_grid
from _runtime import Runtime, barrier, distributed_runtime
from _sampling import draw_samples

from soflow_core.nets import DiT
from soflow_core.train.latents import to_uint8_images

DEFAULT_OUT = "runs/samples/<checkpoint name>-nfe<N>.npz"  # filled in from --ckpt, --ckpt-steps and --nfe


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    M.add_source_arguments(parser)
    parser.add_argument("--num-samples", type=int, default=50_000, help="samples to draw (50 000 for FID)")
    parser.add_argument("--nfe", type=int, default=1, choices=(1, 2), help="network evaluations per sample")
    parser.add_argument("--batch-size", type=int, default=125, help="samples per batch and rank")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-sample noise")
    parser.add_argument("--vae", default=None, help="local SD-VAE-ft-MSE folder (diffusers layout)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="the .npz of uint8 samples to write")
    parser.add_argument("--grid", type=int, default=64, help="samples in the PNG grid")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to sample")
    args = parser.parse_args(argv)
    M.check_source_arguments(parser, args)
    if args.num_samples < 1 or args.batch_size < 1:
        parser.error(f"--num-samples and --batch-size must be >= 1; got {args.num_samples}, {args.batch_size}")
    if args.out == DEFAULT_OUT:
        args.out = default_out(args.ckpt, args.ckpt_steps, args.nfe)
    return args


def default_out(ckpt: str, ckpt_steps: int | None, nfe: int) -> str:
    """``runs/samples/<checkpoint name>[-<steps>]-nfe<N>.npz``: git-ignored, one file per source and NFE."""
    name = Path(ckpt.rstrip("/\\")).name
    name = name[: -len(Path(name).suffix)] if Path(name).suffix in (".pt", ".pth", ".safetensors") else name
    steps = f"-{ckpt_steps}" if ckpt_steps is not None else ""
    return f"runs/samples/{name or 'model'}{steps}-nfe{nfe}.npz"


def sample_batch(model: M.OpenedModel, first: int, count: int, args, device: torch.device, vae) -> np.ndarray:
    """Samples ``first`` … ``first + count − 1`` as uint8 NHWC (``_sampling``: the in-loop FID draws the same)."""
    net = model.net
    shape = M.image_shape(net)

    def to_images(x: torch.Tensor) -> torch.Tensor:
        if shape[0] != 4:  # pixels in [-1, 1]
            return to_uint8_images(x)
        if vae is None:
            return latent_preview(x)
        from _vae import decode_latents

        return to_uint8_images(decode_latents(vae, x))

    images = draw_samples(
        net,
        first=first,
        count=count,
        nfe=args.nfe,
        seed=args.seed,
        shape=shape,
        num_classes=net.num_classes if isinstance(net, DiT) else None,
        param=model.param,
        path=model.path,
        device=device,
        to_images=to_images,
    )
    return images.cpu().numpy()


def main(argv: list[str] | None = None) -> Path | None:
    args = parse(argv)
    with distributed_runtime(args.device) as runtime:
        return run(args, runtime)


def run(args: argparse.Namespace, runtime: Runtime) -> Path | None:
    device = runtime.device
    model = M.open_model(args)
    model.net.to(device).requires_grad_(False)
    latent = M.image_shape(model.net)[0] == 4
    if runtime.is_main:
        M.log(f"sampling {M.describe(model)}")
    vae = None
    if latent and args.vae:
        from _vae import load_vae

        vae = load_vae(args.vae, device=device, dtype=torch.float32)
    elif latent and runtime.is_main:
        M.log("no --vae: writing the first three latent channels, not images (not for FID)")

    out = Path(args.out)
    parts = out.parent / f".{out.name}.parts"
    if runtime.is_main:
        shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir(parents=True)
    barrier(runtime)
    starts = list(range(0, args.num_samples, args.batch_size))
    for b in range(runtime.rank, len(starts), runtime.world_size):  # batch b goes to rank b mod world
        count = min(args.batch_size, args.num_samples - starts[b])
        images = sample_batch(model, starts[b], count, args, device, vae)
        np.save(parts / f"batch-{b:07d}.npy", images)
    barrier(runtime)
    if not runtime.is_main:
        return None
    arr = np.concatenate([np.load(parts / f"batch-{b:07d}.npy") for b in range(len(starts))])
    shutil.rmtree(parts)
    np.savez(out, arr_0=arr)
    save_grid(arr[: args.grid], out.with_suffix(".png"))
    print(
        f"wrote {out} ({arr.shape[0]} samples, {arr.shape[1]}x{arr.shape[2]}, NFE {args.nfe}) "
        f"and {out.with_suffix('.png')}"
    )
    return out


if __name__ == "__main__":
    main()

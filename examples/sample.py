"""Draw N samples at 1 or 2 NFE from a SoFlow model into an ADM-evaluator .npz and a PNG grid.

    # EMA weights of a run (its newest valid checkpoint, verified), 50k samples for FID
    torchrun --nproc_per_node 8 examples/sample.py --ckpt runs/dit_b4 --vae models/sd-vae-ft-mse \\
        --num-samples 50000 --nfe 1 --out samples/dit_b4_nfe1.npz
    # a published SoFlow checkpoint
    python examples/sample.py --published SoFlow-XL-2.pt --model DiT-XL/2 --vae models/sd-vae-ft-mse \\
        --num-samples 50000 --nfe 2 --out samples/xl2_nfe2.npz

Class labels are drawn uniformly at random per sample (not class-balanced), with no
inference-time guidance (ω is baked in at training). Sample i draws its noise and label from a
seed derived from (--seed, i), and the re-noising of 2-NFE sampling from (--seed, batch), so
the output does not depend on the number of ranks. Each rank writes its batches to a part file;
rank 0 concatenates them in order into ``arr_0`` (uint8, N×H×W×3), what the ADM evaluator
reads, and writes ``<out>.png`` with the first ``--grid`` samples. Latent models need ``--vae``
to give images; without it the first three latent channels are written (not for FID).
"""

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _training as T

from soflow_core import SoFlowObjective, sample_few_step, sample_one_step
from soflow_core.nets import load_weights
from soflow_core.seeding import seeded_generator
from soflow_core.train.checkpoint import latest_valid_checkpoint, load_checkpoint
from soflow_core.train.latents import to_uint8_images

_RENOISE = 1  # key that separates the re-noising seeds from the per-sample seeds


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="a run folder (newest valid checkpoint) or a step-*.pt file")
    source.add_argument("--published", help="a published SoFlow DiT checkpoint (.pt)")
    parser.add_argument("--model", default=None, help="DiT size of --published, e.g. DiT-XL/2")
    parser.add_argument("--num-classes", type=int, default=1000, help="classes of --published")
    parser.add_argument("--num-samples", type=int, default=50_000)
    parser.add_argument("--nfe", type=int, default=1, choices=(1, 2))
    parser.add_argument("--batch-size", type=int, default=125, help="samples per batch and rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae", default=None, help="local SD-VAE-ft-MSE folder (diffusers layout)")
    parser.add_argument("--out", default="samples/samples.npz")
    parser.add_argument("--grid", type=int, default=64, help="samples in the PNG grid")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    if args.published and args.model not in T.ALL_DIT_SIZES:
        parser.error(f"--published needs --model, one of {', '.join(T.ALL_DIT_SIZES)}; got {args.model!r}")
    if args.num_samples < 1 or args.batch_size < 1:
        parser.error(f"--num-samples and --batch-size must be >= 1; got {args.num_samples}, {args.batch_size}")
    return args


def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    """The EMA network and its run config (task, model size, classes)."""
    if args.published:
        config = {"task": "imagenet", "model": args.model, "num_classes": args.num_classes}
        net = T.build_net(config)
        load_weights(net, args.published)  # prefers the EMA entry
        return net, config
    path = Path(args.ckpt)
    if path.is_dir():
        found = latest_valid_checkpoint(path / "checkpoints") or latest_valid_checkpoint(path)
        if found is None:
            raise SystemExit(f"no valid checkpoint in {path} (looked in {path / 'checkpoints'} and {path})")
        path = found
    payload = load_checkpoint(path)  # verified against its manifest
    config = payload["config"]
    net = T.build_net(config)
    net.load_state_dict(payload["ema"])
    print(f"loaded the EMA weights of {path} (step {payload['step']})", file=sys.stderr)
    return net, config


@torch.no_grad()
def sample_batch(net, config: dict, first: int, count: int, args, device: torch.device, vae) -> np.ndarray:
    latent = config["task"] == "imagenet"
    shape = (4, 32, 32) if latent else (3, 32, 32)
    noises, labels = [], []
    for i in range(first, first + count):
        generator = seeded_generator(args.seed, i)
        noises.append(torch.randn(shape, generator=generator))
        if latent:
            labels.append(torch.randint(0, config["num_classes"], (), generator=generator))
    noise = torch.stack(noises).to(device)
    cond = torch.stack(labels).to(device) if latent else None
    objective = SoFlowObjective.from_preset(config["task"])  # the path and parameterization of training
    if args.nfe == 1:
        x = sample_one_step(net, noise, param=objective.param, cond=cond)
    else:
        renoise = seeded_generator(args.seed, _RENOISE, first)
        x = sample_few_step(
            net, noise, param=objective.param, path=objective.path, num_steps=args.nfe, cond=cond, generator=renoise
        )
    if not latent:
        return to_uint8_images(x).cpu().numpy()
    if vae is None:
        return T.latent_preview(x).cpu().numpy()
    from _vae import decode_latents

    return to_uint8_images(decode_latents(vae, x)).cpu().numpy()


def main(argv: list[str] | None = None) -> Path | None:
    args = parse(argv)
    with T.distributed_runtime(args.device) as runtime:
        return run(args, runtime)


def run(args: argparse.Namespace, runtime: T.Runtime) -> Path | None:
    device = runtime.device
    net, config = load_model(args)
    net = net.to(device).eval().requires_grad_(False)
    vae = None
    if config["task"] == "imagenet" and args.vae:
        from _vae import load_vae

        vae = load_vae(args.vae, device=device, dtype=torch.float32)
    elif config["task"] == "imagenet" and runtime.is_main:
        print("no --vae: writing the first three latent channels, not images (not for FID)", file=sys.stderr)

    out = Path(args.out)
    parts = out.parent / f".{out.name}.parts"
    if runtime.is_main:
        shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir(parents=True)
    T.barrier(runtime)
    starts = list(range(0, args.num_samples, args.batch_size))
    for b in range(runtime.rank, len(starts), runtime.world_size):  # batch b goes to rank b mod world
        count = min(args.batch_size, args.num_samples - starts[b])
        images = sample_batch(net, config, starts[b], count, args, device, vae)
        np.save(parts / f"batch-{b:07d}.npy", images)
    T.barrier(runtime)
    if not runtime.is_main:
        return None
    arr = np.concatenate([np.load(parts / f"batch-{b:07d}.npy") for b in range(len(starts))])
    shutil.rmtree(parts)
    np.savez(out, arr_0=arr)
    T.save_grid(arr[: args.grid], out.with_suffix(".png"))
    print(
        f"wrote {out} ({arr.shape[0]} samples, {arr.shape[1]}x{arr.shape[2]}, NFE {args.nfe}) "
        f"and {out.with_suffix('.png')}"
    )
    return out


if __name__ == "__main__":
    main()

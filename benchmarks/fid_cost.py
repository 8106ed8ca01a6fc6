"""The share of a training run's time that in-loop FID takes, from counted FLOPs, for every released run.

    python benchmarks/fid_cost.py                                   # the released runs at the trainers' defaults
    python benchmarks/fid_cost.py --fid-samples 50000 --out fid_cost-50k   # FID-50K at every evaluation

Every evaluation of in-loop FID (examples/_fid.py) draws ``--fid-samples`` samples of the EMA
weights at each NFE of ``--fid-nfe`` (a DiT or SongUNet forward pass per NFE), decodes them with
the SD-VAE for a latent model, and runs the Inception on them; ``--fid-every`` steps of training
pass between evaluations. FLOPs are counted, not estimated: the forward passes of the DiT, the
SongUNet, the SD-VAE-ft-MSE decoder (diffusers' AutoencoderKL with its configuration) and
torch-fidelity's Inception-v3 at 299 px run once on the meta device under
``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add; no weights, no compute).
Training FLOPs per image are those ``benchmarks/dit_throughput.py`` counted for one full step
(``--train-flops``; a DiT size it did not count takes its forward pass times their mean ratio,
4.52 forward-pass equivalents; the SongUNet step takes 4.0, counted the same way).

Two shares are reported: of FLOPs, and of time when the Inception runs in full float32 (as
``soflow_core.metrics.fid`` runs it: no TF32) on CUDA cores while everything else runs on tensor
cores, each at the same fraction of its datasheet peak (``--fp32-slowdown``: H100 SXM, 494.7
TF32 over 66.9 FP32 TFLOP/s). Both are the same on any number of GPUs: training and FID spread
over the ranks alike. Rank 0's Fréchet distances (a few CPU seconds per evaluation) are left out.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import _training as T
import train_dit_cifar10 as cifar
import train_dit_imagenet as imagenet
from _common import RESULTS, config_parser, environment, resolve_config, write_rows

ROOT = Path(__file__).resolve().parents[1]
# the SD-VAE-ft-MSE configuration (stabilityai/sd-vae-ft-mse, config.json): decoder from 32x32x4 to 256x256x3
SD_VAE = {
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
}
DIT_FORWARD_EQUIVALENTS = 4.52  # training step / forward pass, counted for B/4, B/2, M/2, XL/2 (4.51-4.53)
UNET_FORWARD_EQUIVALENTS = 4.0  # the same for the CIFAR-10 SongUNet step (docs/examples.md)
RUNS = ("B-4-cond", "B-2-cond", "M-2-cond", "L-2-cond", "XL-2-cond", "cifar10:UNet-uncond")


@dataclass(frozen=True, kw_only=True)
class CostConfig:
    """What to count; saved in every row."""

    runs: tuple[str, ...] = RUNS  # trainer presets: ImageNet ones by name, CIFAR-10 ones as cifar10:NAME
    fid_every: int = 0  # evaluation period in steps (0: each trainer's default, 25 000)
    fid_samples: int = 0  # samples per evaluation and NFE (0: each trainer's default, 10 000 / 50 000)
    fid_nfe: tuple[int, ...] = (1, 2)  # NFEs scored at every evaluation
    fp32_slowdown: float = 494.7 / 66.9  # TF32 over FP32 peak (H100 SXM): how much slower the Inception's FLOPs run
    # FLOPs of the training step, counted by benchmarks/dit_throughput.py
    train_flops: str = "benchmarks/results/dit_throughput-h100.json"
    out: str = "fid_cost"  # results file stem
    out_dir: str = ""  # results folder ("": runs/benchmarks; benchmarks/results holds the committed ones)


PRESETS_HELP = {"released": "every released run at its trainer's FID defaults", "tiny": "DiT-B/4 only (CI)"}
PRESETS = {"released": CostConfig(), "tiny": CostConfig(runs=("B-4-cond",))}


def forward_flops(module: torch.nn.Module, *inputs: object) -> int:
    """FLOPs of one forward pass on the meta device (shapes only)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(*inputs)
    return counter.get_total_flops()


def vae_decoder_flops() -> int:
    """The SD-VAE decoder on one 32x32x4 latent."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**SD_VAE)
    return forward_flops(lambda z: vae.decode(z).sample, torch.zeros(1, 4, 32, 32, device="meta"))


def inception_flops() -> int:
    """torch-fidelity's Inception-v3 (pool features and logits) on one image, resized to 299 px inside."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):  # the layers without weights: only shapes are needed
        def load_state_dict(self, *args: object, **kwargs: object) -> None:
            return None

    with tempfile.TemporaryDirectory() as folder:
        empty = Path(folder) / "empty.pt"
        torch.save({}, empty)
        with torch.device("meta"):
            net = Unloaded("count", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(empty))
    return forward_flops(net, torch.zeros(1, 3, 256, 256, dtype=torch.uint8, device="meta"))


def network_and_training(run: str, counted: dict[str, float]) -> tuple[object, float, float]:
    """(resolved config, forward FLOPs per image, training FLOPs per image) of a trainer preset."""
    if run.startswith("cifar10:"):
        config = cifar.resolve(cifar.PRESETS[run.split(":", 1)[1]])
        with torch.device("meta"):
            net = T.build_net(cifar.record(config))
        one = torch.ones(1, device="meta")
        forward = forward_flops(net, torch.zeros(1, 3, 32, 32, device="meta"), one, one * 0, None)
        return config, forward, forward * UNET_FORWARD_EQUIVALENTS
    config = imagenet.resolve(imagenet.PRESETS[run])
    with torch.device("meta"):
        net = T.build_net(imagenet.record(config))
    one = torch.ones(1, device="meta")
    label = torch.zeros(1, dtype=torch.long, device="meta")
    forward = forward_flops(net, torch.zeros(1, 4, 32, 32, device="meta"), one, one * 0, label)
    return config, forward, counted.get(config.model, forward * DIT_FORWARD_EQUIVALENTS)


def cost_rows(config: CostConfig) -> list[dict]:
    """One row per run: FLOPs per training interval and per evaluation, and the shares."""
    counted = {}
    path = ROOT / config.train_flops
    if path.is_file():
        counted = {
            row["model"]: row["flops_per_image"] for row in json.loads(path.read_text()) if row["kind"] == "train_flops"
        }
    decoder, inception = vae_decoder_flops(), inception_flops()
    rows = []
    for run in config.runs:
        trainer, forward, train_per_image = network_and_training(run, counted)
        every = config.fid_every or trainer.fid_every
        samples = config.fid_samples or trainer.fid_samples
        latent = not run.startswith("cifar10:")
        train = every * trainer.batch_size * train_per_image
        sampling = samples * sum(config.fid_nfe) * forward
        decoding = samples * len(config.fid_nfe) * decoder if latent else 0.0
        scoring = samples * len(config.fid_nfe) * inception
        fid_flops = sampling + decoding + scoring
        weighted = sampling + decoding + scoring * config.fp32_slowdown
        rows.append(
            {
                "run": run,
                "batch": trainer.batch_size,
                "total_steps": trainer.total_steps,
                "fid_every": every,
                "fid_samples": samples,
                "fid_nfe": list(config.fid_nfe),
                "train_gflop_per_image": train_per_image / 1e9,
                "forward_gflop_per_image": forward / 1e9,
                "vae_decoder_gflop_per_image": decoder / 1e9 if latent else 0.0,
                "inception_gflop_per_image": inception / 1e9,
                "train_pflop_per_interval": train / 1e15,
                "fid_pflop_per_evaluation": fid_flops / 1e15,
                "flop_share": fid_flops / (train + fid_flops),
                "time_share": weighted / (train + weighted),
                "evaluations_per_run": trainer.total_steps // every,
            }
        )
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| run | batch | FID every | samples × NFE | train GFLOP/image | sample fwd | VAE dec. | Inception "
        "| train PFLOP / interval | FID PFLOP / eval | FLOP share | time share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        nfe = ",".join(map(str, r["fid_nfe"]))
        lines.append(
            f"| {r['run']} | {r['batch']} | {r['fid_every']:,} | {r['fid_samples']:,} × ({nfe}) "
            f"| {r['train_gflop_per_image']:.1f} | {r['forward_gflop_per_image']:.1f} "
            f"| {r['vae_decoder_gflop_per_image']:.1f} | {r['inception_gflop_per_image']:.2f} "
            f"| {r['train_pflop_per_interval']:,.1f} | {r['fid_pflop_per_evaluation']:.2f} "
            f"| {100 * r['flop_share']:.2f} % | {100 * r['time_share']:.2f} % |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__, CostConfig, PRESETS, "released", presets_help=PRESETS_HELP)
    config = resolve_config(parser.parse_args(argv), CostConfig, PRESETS)
    if config.fid_every < 0 or config.fid_samples < 0 or not config.fid_nfe or min(config.fid_nfe) < 1:
        parser.error("--fid-every and --fid-samples must be >= 0 and --fid-nfe counts >= 1")
    known = set(imagenet.PRESETS) | {f"cifar10:{name}" for name in cifar.PRESETS}
    unknown = [run for run in config.runs if run not in known]
    if unknown:
        parser.error(f"--runs: unknown {unknown}; choose from {', '.join(sorted(known))}")
    env = environment(torch.device("cpu"))
    rows = [{**row, "commit": env["commit"], "torch": env["torch"], "config": dataclasses.asdict(config)}
            for row in cost_rows(config)]  # fmt: skip
    table = markdown_table(rows)
    json_path, md_path = write_rows(config.out, rows, table, directory=config.out_dir or RESULTS)
    print(table)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

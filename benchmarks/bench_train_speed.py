"""Training speed of models/train.py's step on this CPU, one variant per change, side by side (issue 17).

    python benchmarks/bench_train_speed.py --model resnet56                       # the real run
    python benchmarks/bench_train_speed.py --model resnet20 --rounds 2 --steps 1  # smoke

Every variant is a full training step (augmentation, normalisation, forward, backward, SGD) on images of the
shipped calibration subset, with its own model and optimiser. The variants run interleaved in short bursts
(round r runs all of them, starting at a different one each round), so that a change in the machine's load
hits them alike; the table gives each one's median images per second over the rounds, and the minutes one
50,000-image epoch would take at that rate. Warm-up steps (where torch.compile compiles) are not timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from models import train  # noqa: E402
from models.definitions import MODELS  # noqa: E402


@dataclass(frozen=True)
class Variant:
    name: str
    batch: int = 128
    channels_last: bool = True
    bf16: bool = False
    compile: str = "off"
    loop_augment: bool = False


VARIANTS = [
    Variant("shipped train.py (per-image crop loop)", loop_augment=True),
    Variant("vectorised augmentation"),
    Variant("NCHW instead of channels_last", channels_last=False),
    Variant("batch 64", batch=64),
    Variant("batch 256", batch=256),
    Variant("torch.compile", compile="default"),
    Variant("bf16 autocast", bf16=True),
]
KEYS = ["shipped", "vector", "nchw", "b64", "b256", "compile", "bf16"]


def augment_loop(batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The augmentation of train.py before issue 17: one slice per image, stacked."""
    n = batch.shape[0]
    padded = F.pad(batch, (0, 0, 4, 4, 4, 4))
    offsets = torch.randint(0, 9, (n, 2), generator=gen)
    out = torch.stack([padded[i, a : a + 32, b : b + 32] for i, (a, b) in enumerate(offsets.tolist())])
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(2)
    return out


def make_burst(variant: Variant, model_name: str, pool: tuple[torch.Tensor, torch.Tensor]) -> Callable[[int], float]:
    """burst(steps) -> images per second of ``steps`` training steps of the variant."""
    torch.manual_seed(0)
    model = MODELS[model_name]()
    if variant.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = train.make_optimizer(model, 0.01, 5e-4)
    step = train.make_step(train.compiled(model, variant.compile), opt, torch.device("cpu"), variant.bf16)
    augment = augment_loop if variant.loop_augment else train.augment
    gen = torch.Generator().manual_seed(0)
    x, y = pool

    def burst(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            idx = torch.randint(0, len(x), (variant.batch,), generator=gen)
            float(step(train.to_input(augment(x[idx], gen), variant.channels_last), y[idx], 0.01))
        return steps * variant.batch / (time.perf_counter() - start)

    return burst


def measure(variants: list[Variant], model_name: str, steps: int, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Images per second of each variant's bursts, interleaved: round r starts at variant r mod n."""
    x, y = train.load_npz(ROOT / "models" / "cifar10_calib512.npz")
    pool = torch.from_numpy(x), torch.from_numpy(y)
    bursts = {}
    for v in variants:
        bursts[v.name] = make_burst(v, model_name, pool)
        t0 = time.perf_counter()
        bursts[v.name](warmup)
        print(f"warm-up {v.name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    rates: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(rounds):
        for v in variants[r % len(variants) :] + variants[: r % len(variants)]:
            rates[v.name].append(bursts[v.name](steps))
        print(f"round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    return rates


def table(variants: list[Variant], rates: dict[str, list[float]], skipped: list[str], images: int = 50_000) -> str:
    base = statistics.median(rates[variants[0].name])
    rows = ["| variant | batch | layout | bf16 | compile | median img/s | range | vs first | min / epoch |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for v in variants:
        r = rates[v.name]
        med = statistics.median(r)
        rows.append(f"| {v.name} | {v.batch} | {'channels_last' if v.channels_last else 'NCHW'} | {v.bf16} | "
                    f"{v.compile} | {med:.0f} | {min(r):.0f}-{max(r):.0f} | {med / base:.2f}x | "
                    f"{images / med / 60:.1f} |")
    rows += [f"| {name} | | | | | skipped | | | |" for name in skipped]
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="resnet56")
    p.add_argument("--variants", default=",".join(KEYS), help=f"comma-separated, of {KEYS}")
    p.add_argument("--steps", type=int, default=5, help="training steps per burst")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (compilation happens here)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--force-bf16", action="store_true", help="measure bf16 autocast even where the CPU lacks bf16")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    chosen = [VARIANTS[KEYS.index(k)] for k in args.variants.split(",")]
    skipped = []
    if not train.cpu_supports_bf16() and not args.force_bf16:
        skipped = [v.name + " (CPU has no avx512_bf16/amx_bf16)" for v in chosen if v.bf16]
        chosen = [v for v in chosen if not v.bf16]
    rates = measure(chosen, args.model, args.steps, args.rounds, args.warmup)
    cpu = train.device_name(torch.device("cpu"), args.threads)
    print(f"{args.model}, torch {torch.__version__}, {cpu}, capability {torch.backends.cpu.get_cpu_capability()}; "
          f"{args.rounds} rounds of {args.steps}-step bursts, medians\n")
    print(table(chosen, rates, skipped))


if __name__ == "__main__":
    main()

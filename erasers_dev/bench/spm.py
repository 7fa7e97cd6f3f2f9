"""``python -m erasers bench spm``: per-step overhead of gated membranes on an SD1.5-shaped UNet (CPU).

A diffusers UNet2DConditionModel with the SD1.5 config and random weights runs the same denoising step
without membranes, with 1 and with 3 official-layout SD1.x membranes (facilitated transport on, official
combination), interleaved round by round (the order rotates) in one process so drift hits every configuration alike.
The table reports the median seconds per step and the overhead as the median of per-round ratios to the
bare UNet step of the same round (target ≤ 5 %), both in process CPU time (robust when other jobs share
the machine) and in wall time. One torch thread by default.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from types import SimpleNamespace

import torch

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 → 256 px images)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (one timed step per config each)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine, idle OpenMP threads spin and inflate "
        "CPU time; 0 keeps torch's default)",
    )
    parser.add_argument("--combination", default="official", choices=("official", "linear"))
    parser.add_argument(
        "--account",
        type=int,
        default=0,
        metavar="N",
        help="also account the membranes layer by layer: each hooked layer's CPU time with and "
        "without the hooks on the inputs of one real step, median of N interleaved "
        "repeats, summed and divided by the bare step (robust on a busy machine)",
    )


def _membranes(unet, count):
    from safetensors.torch import save_file

    from erasers.files.families import Family
    from erasers_diffusers.apply import membrane_from_file

    from ..testing import spm_tensors

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(count):
            path = f"{tmp}/m{i}.safetensors"
            save_file(
                spm_tensors(Family.SD1, seed=i), path, metadata={"prompts": f"concept{i}", "rank": "1", "alpha": "1.0"}
            )
            out.append(membrane_from_file(unet, path)[0])
    return out


def run(args) -> list:
    import diffusers

    from erasers_diffusers.apply import DiffusersMembranes

    from ..testing import ToyTextEncoder

    if getattr(args, "threads", 1):
        torch.set_num_threads(args.threads)
    latent = getattr(args, "latent", 32)
    rounds = getattr(args, "rounds", 7)
    combination = getattr(args, "combination", "official")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**SD15_UNET).eval()
    encoder = ToyTextEncoder(dim=768, context_length=77)
    mems = _membranes(unet, 3)
    x = torch.randn(2, 4, latent, latent)  # CFG batch: uncond + cond of one prompt
    ctx = torch.randn(2, 77, 768)
    configs = {"no membrane": [], "1 membrane": mems[:1], "3 membranes": mems}
    times = {name: [] for name in configs}
    cpu = {name: [] for name in configs}

    def step():
        with torch.no_grad():
            unet(x, 500, encoder_hidden_states=ctx)

    step()  # warm-up (allocator, kernels)
    names = list(configs)
    ratios = {name: [] for name in names}
    ratios_cpu = {name: [] for name in names}
    for rnd in range(rounds):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]  # rotate: nobody is always first
        for name in order:
            chosen = configs[name]
            handle = (
                DiffusersMembranes(SimpleNamespace(unet=unet), chosen, combination, encoder=encoder)
                if chosen
                else None
            )
            if handle:
                handle.set_prompts(["a photo of concept0 in a park"])  # rates: once per prompt, not per step
            step()  # untimed: the first call folds the rates into the factors once per prompt
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            if handle:
                handle.remove()
        for name in names:  # paired with this round's bare step: drift between rounds cancels
            ratios[name].append(times[name][-1] / times["no membrane"][-1] - 1.0)
            ratios_cpu[name].append(cpu[name][-1] / cpu["no membrane"][-1] - 1.0)
    rows = []
    print(
        f"SPM overhead per UNet step — SD1.5-shaped UNet, random weights, CPU ({torch.get_num_threads()} "
        f"thread(s)), latent {latent}×{latent}, batch 2 (CFG, one prompt), {combination} combination, transport "
        f"on; median of {rounds} interleaved rounds, overhead = median of per-round ratios to the bare step"
    )
    print(
        f"| {'config':<12} | {'CPU s/step':>10} | {'CPU overhead':>12} | {'wall s/step':>11} | {'wall overhead':>13} |"
    )
    print(f"|{'-' * 14}|{'-' * 12}|{'-' * 14}|{'-' * 13}|{'-' * 15}|")
    for name in names:
        med, med_cpu = statistics.median(times[name]), statistics.median(cpu[name])
        ratio, ratio_cpu = statistics.median(ratios[name]), statistics.median(ratios_cpu[name])
        rows.append((name, med_cpu, ratio_cpu, med, ratio))
        print(f"| {name:<12} | {med_cpu:>10.3f} | {100 * ratio_cpu:>11.1f}% | {med:>11.3f} | {100 * ratio:>12.1f}% |")
    repeats = getattr(args, "account", 0)
    if repeats:
        base_cpu = statistics.median(cpu["no membrane"])
        print(
            f"\nLayer-by-layer accounting — membrane CPU time per step / bare step ({base_cpu:.3f} s), "
            f"median of {repeats} interleaved repeats per layer"
        )
        print(f"| {'config':<12} | {'runtime path':<28} | {'added s/step':>12} | {'overhead':>8} |")
        print(f"|{'-' * 14}|{'-' * 30}|{'-' * 14}|{'-' * 10}|")
        for name in names[1:]:
            for fold, label in ((True, "folded (this version)"), (False, "low-rank on the output only")):
                added = account_layers(unet, configs[name], combination, encoder, x, ctx, repeats, fold)
                rows.append((name + (" (accounted)" if fold else " (accounted, no fold)"), added, added / base_cpu))
                print(f"| {name:<12} | {label:<28} | {added:>12.4f} | {100 * added / base_cpu:>7.1f}% |")
    return rows


def account_layers(unet, mems, combination, encoder, x, ctx, repeats: int, fold: bool = True) -> float:
    """Σ over hooked layers of median(hooked − bare) CPU seconds, on the inputs those layers see in a real
    step: the membranes' own cost per step, measured in short interleaved pieces."""
    from erasers_diffusers.apply import DiffusersMembranes

    handle = DiffusersMembranes(SimpleNamespace(unet=unet), mems, combination, encoder=encoder)
    modules = [m for _, hooks in handle.groups for _, m in hooks.modules]
    handle.remove()
    inputs = {}
    grabs = [m.register_forward_pre_hook(lambda mod, args: inputs.setdefault(id(mod), args)) for m in modules]
    with torch.no_grad():
        unet(x, 500, encoder_hidden_states=ctx)
    for g in grabs:
        g.remove()

    def one_pass(times):
        with torch.no_grad():
            for m in modules:
                start = time.process_time()
                m(*inputs[id(m)])
                times.setdefault(id(m), []).append(time.process_time() - start)

    bare, hooked = {}, {}
    for _ in range(repeats):
        one_pass(bare)
        handle = DiffusersMembranes(SimpleNamespace(unet=unet), mems, combination, encoder=encoder)
        for _, hooks in handle.groups:
            hooks.fold = fold
        handle.set_prompts(["a photo of concept0 in a park"])
        handle._expand(unet, (x,), {})  # the rows the UNet pre-hook would set for this batch
        one_pass({})  # untimed: the first call folds the rates into the factors (once per prompt)
        one_pass(hooked)
        handle.remove()
    return sum(statistics.median(h) - statistics.median(b) for h, b in zip(hooked.values(), bare.values()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()

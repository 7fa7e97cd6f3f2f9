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
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 → 256 px images)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (one timed step per config each)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine, idle OpenMP threads spin and inflate "
                             "CPU time; 0 keeps torch's default)")
    parser.add_argument("--combination", default="official", choices=("official", "linear"))


def _membranes(unet, count):
    from safetensors.torch import save_file

    from ..diffusers_apply import membrane_from_file
    from ..families import Family
    from ..testing import spm_tensors

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(count):
            path = f"{tmp}/m{i}.safetensors"
            save_file(spm_tensors(Family.SD1, seed=i), path, metadata={"prompts": f"concept{i}", "rank": "1",
                                                                         "alpha": "1.0"})
            out.append(membrane_from_file(unet, path)[0])
    return out


def run(args) -> list:
    import diffusers

    from ..diffusers_apply import DiffusersMembranes
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
        order = names[rnd % len(names):] + names[: rnd % len(names)]  # rotate: nobody is always first
        for name in order:
            chosen = configs[name]
            handle = DiffusersMembranes(SimpleNamespace(unet=unet), chosen, combination, encoder=encoder) \
                if chosen else None
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
    print(f"SPM overhead per UNet step — SD1.5-shaped UNet, random weights, CPU ({torch.get_num_threads()} "
          f"thread(s)), latent {latent}×{latent}, batch 2 (CFG, one prompt), {combination} combination, transport "
          f"on; median of {rounds} interleaved rounds, overhead = median of per-round ratios to the bare step")
    print(f"| {'config':<12} | {'CPU s/step':>10} | {'CPU overhead':>12} | {'wall s/step':>11} | {'wall overhead':>13} |")
    print(f"|{'-' * 14}|{'-' * 12}|{'-' * 14}|{'-' * 13}|{'-' * 15}|")
    for name in names:
        med, med_cpu = statistics.median(times[name]), statistics.median(cpu[name])
        ratio, ratio_cpu = statistics.median(ratios[name]), statistics.median(ratios_cpu[name])
        rows.append((name, med_cpu, ratio_cpu, med, ratio))
        print(f"| {name:<12} | {med_cpu:>10.3f} | {100 * ratio_cpu:>11.1f}% | {med:>11.3f} | {100 * ratio:>12.1f}% |")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()

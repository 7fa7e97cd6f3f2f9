"""``python -m erasers bench soak [--cycles 1000] [--seed 0] [--only diffusers]``: apply / remove, a thousand times.

Part **diffusers** (this file): ``--cycles`` apply/remove cycles of erasers on a tiny random-weight diffusers
UNet (erasers_dev/tiny_diffusers.py) through the public API (``erasers_diffusers.api``). Each cycle picks
at random one of three UCE / SPEED erasers, a strength in [−2, 2] and a route:

* ``handle``   — ``apply_eraser`` then ``remove_eraser``;
* ``context``  — ``with erased(...)`` (removal in ``finally``);
* ``failed``   — ``apply_eraser`` with a failure injected at a random layer's write (the rollback path);
* ``membrane`` — a gated LoRA hooked with ``DiffusersMembranes`` and one UNet call, then ``remove()``.

While applied, the edited layers must differ from the base; after removal they must have their old bits
again (checked every cycle); the whole state dict is compared bit for bit every ``--full-check-every``
cycles and at the end. Printed: one markdown row per part (cycles, seconds, max |Δ| over every weight
after the last cycle, resident-memory growth after a warm-up). Exit code 1 when any check failed.

Hook for other hosts: ``register_part(name, fn)`` adds a part; ``fn(cycles, seed) -> dict`` returns a row
with at least ``cycles``, ``seconds``, ``max_abs_diff``, ``rss_growth_mb`` and ``ok``. The ComfyUI
``ModelPatcher`` soak lives in erasers_dev/bench/soak_comfy.py (run it there, it needs a ComfyUI checkout).
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from typing import Callable, Dict

import torch

#: part name → fn(cycles, seed) -> row dict (see the module docstring)
PARTS: Dict[str, Callable] = {}


def register_part(name: str, fn: Callable) -> None:
    PARTS[name] = fn


def rss_mb() -> float:
    """Resident memory of this process (VmRSS, Linux); 0 where /proc is missing."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Injected(RuntimeError):
    pass


def diffusers_part(cycles: int, seed: int, full_every: int = 100) -> dict:
    from erasers.edits.speed import SPEEDConfig
    from erasers.edits.uce import UCEConfig
    from erasers.lowrank import LowRankDelta
    from erasers.membranes.spm import GATE_ALWAYS, Gate, Membrane
    from erasers_dev.tiny_diffusers import tiny_pipe
    from erasers_diffusers import api
    from erasers_diffusers.apply import DiffusersMembranes, unet_canonical_names

    rng = random.Random(seed)
    torch.set_num_threads(1)
    logging.getLogger("erasers_diffusers.api").setLevel(logging.ERROR)  # the injected failures would log each
    pipe = tiny_pipe()
    unet = pipe.unet
    erasers = [
        api.compute_eraser_for_pipeline(pipe, UCEConfig(concepts=["red square"])),
        api.compute_eraser_for_pipeline(pipe, UCEConfig(concepts=["blue circle", "green star"], lam=0.2)),
        api.compute_eraser_for_pipeline(pipe, SPEEDConfig(concepts=["yellow moon"])),
    ]
    params = api.projection_params(pipe)
    # a rank-2 gated LoRA on every edited projection, for the hook route
    gen = torch.Generator().manual_seed(seed)
    canon = unet_canonical_names(unet)
    lora = {
        canon[name]: LowRankDelta(
            0.05 * torch.randn(p.shape[0], 2, generator=gen), torch.randn(2, p.shape[1], generator=gen)
        )
        for name, p in unet.named_parameters()
        if name in canon and (".attn2.to_k." in name or ".attn2.to_v." in name)
    }
    membrane = Membrane(lora, Gate(GATE_ALWAYS, []), 1.0, name="soak-lora")
    x = torch.randn(1, 4, 8, 8, generator=gen)
    ctx = torch.randn(1, 8, 32, generator=gen)
    base = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    names = {id(e): sorted(params[k][0] for k in e.deltas) for e in erasers}
    live = dict(unet.named_parameters())
    failures, routes = [], {"handle": 0, "context": 0, "failed": 0, "membrane": 0}
    original_write = api.write_weight

    def restored(keys) -> bool:
        return all(torch.equal(live[n].data, base[n]) for n in keys)

    def one_cycle(i: int) -> None:
        eraser = rng.choice(erasers)
        strength = rng.choice([1.0, 0.5, -1.0, 2.0, rng.uniform(-2, 2)])
        route = rng.choice(list(routes))
        routes[route] += 1
        keys = names[id(eraser)]
        if route == "handle":
            handle = api.apply_eraser(pipe, eraser, strength)
            if strength and restored(keys):
                failures.append(f"cycle {i}: apply changed nothing")
            api.remove_eraser(pipe, handle)
        elif route == "context":
            with api.erased(pipe, eraser, strength):
                if strength and restored(keys):
                    failures.append(f"cycle {i}: erased() changed nothing")
        elif route == "failed":
            at, calls = rng.randrange(len(keys)), {"n": 0}

            def failing(param, value):
                if calls["n"] == at:
                    raise Injected(f"cycle {i}: injected at layer {at}")
                calls["n"] += 1
                original_write(param, value)

            api.write_weight = failing
            try:
                api.apply_eraser(pipe, eraser, strength or 1.0)
                failures.append(f"cycle {i}: the injected failure did not propagate")
            except Injected:
                pass
            finally:
                api.write_weight = original_write
        else:
            with DiffusersMembranes(pipe, loras=[membrane]) as hooks:
                hooks.set_prompts(["soak"])
                with torch.no_grad():
                    unet(x, torch.tensor([10]), encoder_hidden_states=ctx)
            keys = sorted(live)  # hooks never write: every weight must be untouched
        if not restored(keys):
            failures.append(f"cycle {i} ({route}): weights not restored")
        if getattr(unet, api.HANDLE_ATTR, None) is not None:
            failures.append(f"cycle {i} ({route}): a handle was left on the UNet")

    warm = min(20, cycles)
    for i in range(warm):  # allocator and caches settle before memory is measured
        one_cycle(i)
    rss_start, started = rss_mb(), time.perf_counter()
    for i in range(warm, cycles):
        one_cycle(i)
        if (i + 1) % full_every == 0:
            now = unet.state_dict()
            if any(not torch.equal(now[k], base[k]) for k in base):
                failures.append(f"cycle {i}: full state dict differs")
    seconds = time.perf_counter() - started
    now = unet.state_dict()
    max_diff = max(float((now[k].float() - base[k].float()).abs().max()) if now[k].numel() else 0.0 for k in base)
    identical = all(torch.equal(now[k], base[k]) for k in base)
    return {
        "part": "diffusers API (tiny UNet)",
        "cycles": cycles,
        "seconds": seconds,
        "routes": routes,
        "max_abs_diff": max_diff,
        "bit_identical": identical,
        "rss_growth_mb": rss_mb() - rss_start,
        "ok": identical and not failures,
        "failures": failures[:5],
    }


register_part("diffusers", diffusers_part)


def table(rows) -> str:
    lines = [
        "| part | cycles | seconds | routes | max abs diff | bit-identical | RSS growth MB |",
        "|---|---:|---:|---|---:|---|---:|",
    ]
    for r in rows:
        routes = ", ".join(f"{k} {v}" for k, v in r.get("routes", {}).items())
        lines.append(
            f"| {r['part']} | {r['cycles']} | {r['seconds']:.1f} | {routes} | {r['max_abs_diff']:g} | "
            f"{'yes' if r.get('bit_identical', r['ok']) else 'NO'} | {r['rss_growth_mb']:+.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m erasers bench soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full-check-every", type=int, default=100)
    parser.add_argument("--only", choices=sorted(PARTS), default=None, help="run one part")
    args = parser.parse_args(argv)
    if args.cycles < 1 or args.full_check_every < 1:
        parser.error("--cycles and --full-check-every must be ≥ 1")
    rows = []
    for name, fn in PARTS.items():
        if args.only and name != args.only:
            continue
        kwargs = {"full_every": args.full_check_every} if fn is diffusers_part else {}
        rows.append(fn(args.cycles, args.seed, **kwargs))
    print(table(rows))
    for row in rows:
        for failure in row.get("failures", []):
            print(f"FAILED: {row['part']}: {failure}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

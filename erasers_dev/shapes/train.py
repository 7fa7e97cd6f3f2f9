"""Train the shapes text-to-image model (text encoder + UNet, jointly) and the judge classifier.

Recipe: ε-prediction MSE with min-SNR-5 weighting (Hang et al. 2023, "Efficient Diffusion Training via
Min-SNR Weighting Strategy"), which speeds up convergence a lot at this scale; 10 % caption dropout to
the empty prompt for classifier-free guidance; AdamW with linear warm-up then cosine decay; an EMA of
the weights is what gets saved. Images come fresh from ``world.sample_batch`` every step, so there is
no dataset on disk and no overfitting.

Reproducibility: everything is seeded from ``seed``; ``steps`` fixes the schedule. With ``minutes``
instead, the step count is derived from the speed of the first steps and written into the file's
metadata, so the run can be repeated exactly with ``--steps``. (Float results on CPU can still differ
in the last bits between thread counts and machines.)
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from . import world
from .classifier import DEFAULT_CLASSIFIER, save_classifier, train_classifier
from .model import DEFAULT_T2I, ShapesPipeline, random_pipeline, save_pipeline

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 2400
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    image_size: int = 16
    log_every: int = 50
    minutes: Optional[float] = None  # if set, ``steps`` is derived from the measured speed
    # stop after this many steps of the ``steps``-long schedule. The default reproduces the shipped weights:
    # the shipping run was cut at step 1400 because the shared machine ran ~5x slower than when idle.
    stop_at: Optional[int] = 1400
    classifier_steps: int = 1200
    checkpoint_every: int = 0  # >0: also write the EMA model to ``checkpoint_path`` every so many steps
    checkpoint_path: Optional[str] = None


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def diffusion_loss(
    pipe: ShapesPipeline, images: torch.Tensor, captions: list, gen: torch.Generator, snr_gamma: float
) -> torch.Tensor:
    """Min-SNR-weighted ε-prediction loss for one batch (captions already dropped where needed)."""
    n = images.shape[0]
    ids, lengths = pipe.tokenizer.encode(captions)
    hidden, _ = pipe.text_encoder(ids, lengths)
    sched = pipe.scheduler
    t = torch.randint(0, sched.config.num_train_timesteps, (n,), generator=gen)
    noise = torch.randn(images.shape, generator=gen)
    noisy = sched.add_noise(images, noise, t)
    eps = pipe.unet(noisy, t, encoder_hidden_states=hidden).sample
    alpha_bar = sched.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    weight = snr.clamp(max=snr_gamma) / snr
    per_sample = F.mse_loss(eps, noise, reduction="none").mean(dim=(1, 2, 3))
    return (weight * per_sample).mean()


def _save_ema(pipe: ShapesPipeline, ema: torch.nn.ModuleDict, path: str, info: dict) -> None:
    snapshot = copy.copy(pipe)
    snapshot.unet, snapshot.text_encoder = ema["unet"], ema["text_encoder"]
    save_pipeline(snapshot, path, extra={"train": info})


def train_t2i(cfg: TrainConfig, progress=None) -> ShapesPipeline:
    """Train text encoder + UNet; returns the EMA pipeline (eval mode) with ``train_info`` attached."""
    pipe = random_pipeline(cfg.seed)
    modules = torch.nn.ModuleDict({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    ema = copy.deepcopy(modules).requires_grad_(False)
    opt = torch.optim.AdamW(modules.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)
    noise_gen = torch.Generator().manual_seed(cfg.seed + 2)
    drop_gen = torch.Generator().manual_seed(cfg.seed + 3)
    n_params = sum(p.numel() for p in modules.parameters())
    logger.info("training shapes t2i: %.2fM parameters, %s", n_params / 1e6, asdict(cfg))
    t0 = time.time()
    deadline = None
    step = 0
    losses = []
    while step < min(cfg.steps, cfg.stop_at or cfg.steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _lr_factor(step, cfg)
        images, captions, _ = world.sample_batch(cfg.batch_size, data_gen, cfg.image_size)
        drop = torch.rand(len(captions), generator=drop_gen) < cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        loss = diffusion_loss(pipe, images, captions, noise_gen, cfg.snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), cfg.grad_clip)
        opt.step()
        _ema_update(ema, modules, min(cfg.ema_decay, (1 + step) / (10 + step)))
        step += 1
        losses.append(loss.item())
        if cfg.minutes and step == 30:
            per_step = (time.time() - t0) / step
            cfg.steps = max(cfg.warmup + 1, int(cfg.minutes * 60 / per_step))
            deadline = t0 + cfg.minutes * 60 * 1.15
            logger.info(
                "%.3fs/step → %d steps for %.1f minutes (repeat with --steps %d)",
                per_step,
                cfg.steps,
                cfg.minutes,
                cfg.steps,
            )
        if step % cfg.log_every == 0 or step == cfg.steps:
            elapsed = time.time() - t0
            logger.info(
                "step %d/%d loss %.4f lr %.2e %.2fs/step elapsed %.1f min",
                step,
                cfg.steps,
                sum(losses[-cfg.log_every :]) / len(losses[-cfg.log_every :]),
                opt.param_groups[0]["lr"],
                elapsed / step,
                elapsed / 60,
            )
            if progress is not None:
                progress(step, cfg.steps)
        if cfg.checkpoint_every and cfg.checkpoint_path and step % cfg.checkpoint_every == 0:
            _save_ema(pipe, ema, cfg.checkpoint_path, {**asdict(cfg), "steps_done": step})
        if deadline is not None and time.time() > deadline:
            logger.warning(
                "stopping at step %d of %d: over the time budget (the machine is busier than at the start)",
                step,
                cfg.steps,
            )
            break
    pipe.unet.load_state_dict(ema["unet"].state_dict())
    pipe.text_encoder.load_state_dict(ema["text_encoder"].state_dict())
    pipe.unet.eval().requires_grad_(False)
    pipe.text_encoder.eval().requires_grad_(False)
    pipe.train_info = {
        **asdict(cfg),
        "steps_done": step,
        "seconds": round(time.time() - t0, 1),
        "threads": torch.get_num_threads(),
        "final_loss": sum(losses[-200:]) / len(losses[-200:]),
    }
    return pipe


def train_all(
    cfg: TrainConfig,
    out_dir: Path = Path("shapes_world"),
    threads: Optional[int] = 2,
    skip_classifier: bool = False,
    skip_t2i: bool = False,
    skip_eval: bool = False,
) -> dict:
    """``python -m erasers shapes train``: both models, written to ``out_dir`` (never the package's shipped
    weights: compare with them instead), then the base fidelity measured and recorded in the file's metadata."""
    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    if out_dir.resolve() == DEFAULT_T2I.parent.resolve():
        raise ValueError(f"{out_dir} holds the shipped weights; train into another folder and compare (cmp).")
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    result = {}
    t2i_path = out_dir / DEFAULT_T2I.name
    clf_path = out_dir / DEFAULT_CLASSIFIER.name
    if not skip_t2i:
        pipe = train_t2i(cfg)
        save_pipeline(pipe, t2i_path, extra={"train": pipe.train_info})
        logger.info("saved %s (%.1f MB)", t2i_path, t2i_path.stat().st_size / 1e6)
        result.update(t2i=str(t2i_path), t2i_train=pipe.train_info)
    if not skip_classifier:
        t1 = time.time()
        clf, acc = train_classifier(steps=cfg.classifier_steps, seed=cfg.seed, size=cfg.image_size)
        info = {
            "steps": cfg.classifier_steps,
            "seed": cfg.seed,
            "seconds": round(time.time() - t1, 1),
            "threads": torch.get_num_threads(),
            "accuracy": acc,
        }
        save_classifier(clf, clf_path, extra={"train": info})
        logger.info("saved %s; held-out accuracy %s", clf_path, acc)
        result.update(classifier=str(clf_path), classifier_train=info)
    if not skip_eval and t2i_path.is_file() and clf_path.is_file():
        from .classifier import load_classifier
        from .evaluate import evaluate
        from .model import load_pipeline, record_fidelity

        fidelity = evaluate(load_pipeline(t2i_path), load_classifier(clf_path))
        record_fidelity(t2i_path, fidelity)
        logger.info("base fidelity:\n%s", fidelity["markdown"])
        result["fidelity"] = {k: fidelity["canonical"][k] for k in ("shape_accuracy", "colour_accuracy")}
    result["total_minutes"] = round((time.time() - t_start) / 60, 1)
    return result

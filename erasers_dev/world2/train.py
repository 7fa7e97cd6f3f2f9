"""Train world 2 from a seed: contrastive text encoder → frozen → UNet on its hidden states → judges → fidelity.

Stages, as Stable Diffusion was built:

1. ``clip.train_clip``: text encoder + image encoder with CLIP's InfoNCE on fresh world batches;
2. the text encoder is frozen (``requires_grad_(False)``, eval mode, hidden states computed under
   ``no_grad``) and the UNet trained on its last hidden states: ε-prediction MSE with min-SNR-5
   weighting (Hang et al. 2023), 10 % caption dropout to the empty prompt for classifier-free guidance,
   AdamW with warm-up and cosine decay, an EMA of the UNet saved. The encoder's SHA-256 before and after
   is recorded in the file's metadata (they must be equal);
3. ``judges.train_judges``: one CNN per axis, confusion tables into their file's metadata;
4. ``evaluate.evaluate``: base fidelity per prompt set, into the text-to-image file's metadata.

Reproducibility: every generator is seeded from ``seed``; ``torch.use_deterministic_algorithms(True)``
is on for the whole run; one thread by default, because CPU reductions split across threads sum in
another order (the shapes world measured the drift). Outputs go to ``out_dir`` (default
``./world2_world``), never into the package.

Stage reuse (``reuse_dir``, ``--reuse DIR``): each stage seeds its own generators (CLIP from ``seed``,
the UNet from ``seed + 1 … + 4``, the judges from ``seed``), so a stage's output depends only on its own
config and the seed. A CLIP or judges file in ``reuse_dir`` whose recorded config and seed equal this
run's is loaded instead of retrained — the weights are the ones the stage would produce — and copied to
``out_dir``. Anything that differs (steps, widths, seed, the text encoder's architecture) is retrained.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from . import world
from .clip import ClipConfig, load_clip, save_clip, train_clip
from .judges import JUDGES_NAME, JudgeConfig, load_judges, save_judges, train_judges
from .model import T2I_NAME, World2Pipeline, build_pipeline, default_config, save_pipeline, tiny_config
from .tokenizer import World2Tokenizer

logger = logging.getLogger(__name__)

CLIP_NAME = "world2_clip.safetensors"
PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass
class UNetTrainConfig:
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    log_every: int = 50


@dataclass
class TrainConfig:
    """Everything a run depends on; ``tiny()`` is the test-sized variant."""

    seed: int = 0
    image_size: int = 32
    model: str = "default"  # "default" or "tiny" (model.default_config / model.tiny_config)
    clip: ClipConfig = field(default_factory=ClipConfig)
    unet: UNetTrainConfig = field(default_factory=UNetTrainConfig)
    judges: JudgeConfig = field(default_factory=JudgeConfig)
    eval_per_prompt: int = 4
    eval_steps: int = 20

    @classmethod
    def tiny(cls, seed: int = 0) -> "TrainConfig":
        """Seconds on one thread: 16 px, toy widths, a few steps per stage. Proves the plumbing, not quality."""
        return cls(
            seed=seed,
            image_size=16,
            model="tiny",
            clip=ClipConfig(steps=15, batch_size=32, image_width=8, embed=32, warmup=5, log_every=5),
            unet=UNetTrainConfig(steps=6, batch_size=8, warmup=2, log_every=2),
            judges=JudgeConfig(steps=30, batch_size=32, width=8, log_every=10, eval_n=200),
            eval_per_prompt=1,
            eval_steps=2,
        )

    def model_config(self, tokenizer: World2Tokenizer):
        if self.model == "default":
            cfg = default_config(tokenizer)
        elif self.model == "tiny":
            cfg = tiny_config(tokenizer)
        else:
            raise ValueError(f"Unknown model size '{self.model}'; expected 'default' or 'tiny'.")
        cfg.unet.sample_size = self.image_size
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


def state_hash(module: torch.nn.Module) -> str:
    """SHA-256 over a module's tensors (names, dtypes, shapes, bytes): equal iff the weights are bit-equal."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@contextlib.contextmanager
def deterministic(threads: Optional[int]):
    """Deterministic algorithms and a fixed thread count for the block; the previous settings come back after."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    torch.use_deterministic_algorithms(True)
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.set_num_threads(previous[1])


def _lr_factor(step: int, cfg: UNetTrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def diffusion_loss(unet, scheduler, hidden, images, gen: torch.Generator, snr_gamma: float) -> torch.Tensor:
    """Min-SNR-γ weighted ε-prediction MSE (Hang et al. 2023, eq. 5 with w = min(SNR, γ)/SNR)."""
    n = images.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=gen)
    noise = torch.randn(images.shape, generator=gen)
    eps = unet(scheduler.add_noise(images, noise, t), t, encoder_hidden_states=hidden).sample
    alpha_bar = scheduler.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    weight = snr.clamp(max=snr_gamma) / snr
    return (weight * F.mse_loss(eps, noise, reduction="none").mean(dim=(1, 2, 3))).mean()


def train_unet(pipe: World2Pipeline, cfg: UNetTrainConfig, seed: int, image_size: int) -> dict:
    """Train ``pipe.unet`` on the frozen ``pipe.text_encoder``; the EMA ends up in ``pipe.unet``. Returns info."""
    encoder = pipe.text_encoder.eval().requires_grad_(False)
    before = state_hash(encoder)
    unet = pipe.unet.train()
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    data_gen = torch.Generator().manual_seed(seed + 1)
    noise_gen = torch.Generator().manual_seed(seed + 2)
    drop_gen = torch.Generator().manual_seed(seed + 3)
    logger.info("world2 UNet: %.2fM parameters, %s", sum(p.numel() for p in unet.parameters()) / 1e6, asdict(cfg))
    t0 = time.time()
    losses = []
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _lr_factor(step, cfg)
        images, captions, _ = world.sample_batch(cfg.batch_size, data_gen, image_size)
        drop = torch.rand(len(captions), generator=drop_gen) < cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        ids, lengths = pipe.tokenizer.encode(captions)
        with torch.no_grad():  # frozen: the conditioning is a fixed function of the caption, as in SD
            hidden = encoder(ids, lengths)[0]
        loss = diffusion_loss(unet, pipe.scheduler, hidden, images, noise_gen, cfg.snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            recent = losses[-cfg.log_every :]
            elapsed = time.time() - t0
            logger.info(
                "unet step %d/%d loss %.4f lr %.2e %.2fs/step elapsed %.1f min",
                step + 1,
                cfg.steps,
                sum(recent) / len(recent),
                opt.param_groups[0]["lr"],
                elapsed / (step + 1),
                elapsed / 60,
            )
    pipe.unet.load_state_dict(ema.state_dict())
    pipe.unet.eval().requires_grad_(False)
    after = state_hash(encoder)
    if after != before:  # a bug, not a condition a user can cause: stop before writing a wrong file
        raise RuntimeError("The text encoder changed while the UNet trained; it must stay frozen.")
    return {
        **asdict(cfg),
        "seconds": round(time.time() - t0, 1),
        "final_loss": sum(losses[-200:]) / max(1, len(losses[-200:])),
        "encoder_sha256": before,
    }


_RUN_ONLY_KEYS = ("log_every", "eval_every")  # logging cadence: does not change the weights


def _same_stage(recorded: dict, cfg, seed: int) -> bool:
    """True iff a file's recorded stage settings equal ``cfg`` and ``seed`` (logging cadence aside)."""
    wanted = {k: v for k, v in asdict(cfg).items() if k not in _RUN_ONLY_KEYS}
    return recorded.get("seed") == seed and all(recorded.get(k) == v for k, v in wanted.items())


def _reusable_clip(reuse_dir: Optional[Path], cfg: "TrainConfig", text_config):
    path = reuse_dir / CLIP_NAME if reuse_dir else None
    if path is None or not path.is_file():
        return None
    model = load_clip(path)
    recorded = {**model.extra.get("train", {}), "seed": model.extra.get("seed")}
    if model.text_encoder.config.to_dict() != text_config.to_dict() or not _same_stage(recorded, cfg.clip, cfg.seed):
        logger.info("world2: %s was trained with other settings; training the encoder", path)
        return None
    logger.info("world2: reusing %s (same CLIP settings and seed)", path)
    return model, model.extra["train"]


def _reusable_judges(reuse_dir: Optional[Path], cfg: "TrainConfig"):
    path = reuse_dir / JUDGES_NAME if reuse_dir else None
    if path is None or not path.is_file():
        return None
    judges = load_judges(path)
    recorded = judges.extra.get("train", {})
    if judges.width != cfg.judges.width or not _same_stage(recorded, cfg.judges, cfg.seed):
        logger.info("world2: %s was trained with other settings; training the judges", path)
        return None
    logger.info("world2: reusing %s (same judge settings and seed)", path)
    return judges, recorded


def train_all(
    cfg: TrainConfig,
    out_dir: Path = Path("world2_world"),
    threads: Optional[int] = 1,
    skip_eval: bool = False,
    reuse_dir: Optional[Path] = None,
    overwrite: bool = False,
) -> dict:
    """``python -m erasers world2 train``: all stages, files in ``out_dir``; returns what was done and how long.
    Files already in ``out_dir`` are refused before anything trains, unless ``overwrite``."""
    from erasers.files.writing import check_output_path

    out_dir = Path(out_dir)
    if PACKAGE_DIR == out_dir.resolve() or PACKAGE_DIR in out_dir.resolve().parents:
        raise ValueError(f"{out_dir} is inside the package ({PACKAGE_DIR}); train into another folder and compare.")
    for name in (CLIP_NAME, T2I_NAME, JUDGES_NAME):  # an hour of training must not end in a refusal
        check_output_path(str(out_dir / name), overwrite=overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    result: dict = {"config": cfg.to_dict(), "seconds": {}}
    with deterministic(threads):
        result["threads"] = torch.get_num_threads()
        tokenizer = World2Tokenizer.default()
        model_cfg = cfg.model_config(tokenizer)

        reuse_dir = Path(reuse_dir) if reuse_dir else None
        result["reused"] = []
        t = time.time()
        reused = _reusable_clip(reuse_dir, cfg, model_cfg.text_encoder)
        if reused:
            clip_model, clip_info = reused
            result["reused"].append(CLIP_NAME)
        else:
            clip_model, clip_info = train_clip(cfg.clip, model_cfg.text_encoder, tokenizer, cfg.seed, cfg.image_size)
        save_clip(clip_model, out_dir / CLIP_NAME, extra={"train": clip_info, "seed": cfg.seed}, overwrite=overwrite)
        result["seconds"]["clip"] = round(time.time() - t, 1)
        result["clip_retrieval"] = clip_info["retrieval"]

        t = time.time()
        torch.manual_seed(cfg.seed + 4)
        pipe = build_pipeline(model_cfg, tokenizer, text_encoder=copy.deepcopy(clip_model.text_encoder))
        unet_info = train_unet(pipe, cfg.unet, cfg.seed, cfg.image_size)
        result["seconds"]["unet"] = round(time.time() - t, 1)

        t = time.time()
        reused = _reusable_judges(reuse_dir, cfg)
        if reused:
            judges, judge_info = reused
            result["reused"].append(JUDGES_NAME)
        else:
            judges, judge_info = train_judges(cfg.judges, seed=cfg.seed, size=cfg.image_size)
        save_judges(judges, out_dir / JUDGES_NAME, extra={"train": judge_info}, overwrite=overwrite)
        result["seconds"]["judges"] = round(time.time() - t, 1)
        result["judge_accuracy"] = {k: v["accuracy"] for k, v in judge_info["clean"].items()}

        extra = {"train": {**cfg.to_dict(), "unet": unet_info, "threads": result["threads"]}}
        if not skip_eval:
            from .evaluate import evaluate

            t = time.time()
            fidelity = evaluate(pipe, judges, per_prompt=cfg.eval_per_prompt, steps=cfg.eval_steps, seed=cfg.seed)
            extra["fidelity"] = {"settings": fidelity["settings"], "sets": fidelity["sets"]}
            result["fidelity"] = {k: v["rate"] for k, v in fidelity["sets"].items()}
            result["seconds"]["eval"] = round(time.time() - t, 1)
            logger.info("base fidelity:\n%s", fidelity["markdown"])
        save_pipeline(pipe, out_dir / T2I_NAME, extra=extra, overwrite=overwrite)
    result["files"] = [str(out_dir / name) for name in (CLIP_NAME, T2I_NAME, JUDGES_NAME)]
    result["seconds"]["total"] = round(time.time() - t_start, 1)
    return result

"""Helpers for the opt-in real-ComfyUI integration tests (``COMFYUI_PATH`` set).

Nothing here imports ComfyUI at module import time, so this file can be collected (and the tests
skipped) on a machine without a ComfyUI checkout. ComfyUI itself is never vendored: the tests import
it from ``COMFYUI_PATH`` and build a random-weight checkpoint from ComfyUI's own classes at test time.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Optional

import pytest
import torch

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_DIR_NAME = "concept_erasers"
CHECKPOINT_NAME = "ce_test_sd15.safetensors"

# --------------------------------------------------------------------------------------------------
# importing ComfyUI in-process
# --------------------------------------------------------------------------------------------------


def comfy_cli_flags(comfyui_path: str) -> list:
    """``--cpu`` plus ``--disable-dynamic-vram`` where this ComfyUI version knows that flag."""
    flags = ["--cpu"]
    cli_args = Path(comfyui_path, "comfy", "cli_args.py")
    try:
        if "--disable-dynamic-vram" in cli_args.read_text(encoding="utf-8"):
            flags.append("--disable-dynamic-vram")
    except OSError:
        pass
    return flags


def comfyui_version(comfyui_path: str) -> str:
    ns: dict = {}
    try:
        exec(Path(comfyui_path, "comfyui_version.py").read_text(encoding="utf-8"), ns)
    except OSError:
        return "unknown"
    return ns.get("__version__", "unknown")


def import_comfy(comfyui_path: str) -> types.SimpleNamespace:
    """Import ComfyUI from a checkout, on CPU, and return its modules in a namespace.

    ``comfy.cli_args`` calls ``parser.parse_args()`` on ``sys.argv`` at import time, so the pytest
    command line is swapped for ``[argv0, --cpu, ...]`` during the import and restored afterwards.
    ``comfy.options.enable_args_parsing()`` must run before any other comfy import, otherwise
    ``--cpu`` is ignored and ComfyUI tries to initialise CUDA.
    """
    comfyui_path = str(Path(comfyui_path).resolve())
    if sys.path[:1] != [comfyui_path]:
        sys.path.insert(0, comfyui_path)
    saved_argv = sys.argv
    sys.argv = [saved_argv[0] if saved_argv else "pytest"] + comfy_cli_flags(comfyui_path)
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args
        import comfy.ldm.models.autoencoder
        import comfy.lora
        import comfy.model_detection
        import comfy.model_management
        import comfy.model_patcher
        import comfy.sample
        import comfy.samplers
        import comfy.sd
        import comfy.sd1_clip
        import comfy.utils
        import folder_paths

        import nodes
    finally:
        sys.argv = saved_argv
    if not comfy.cli_args.args.cpu:
        raise RuntimeError("ComfyUI was imported without --cpu (was comfy imported before the fixture?)")
    return types.SimpleNamespace(
        path=comfyui_path,
        version=comfyui_version(comfyui_path),
        comfy=comfy,
        sd=comfy.sd,
        sample=comfy.sample,
        samplers=comfy.samplers,
        model_management=comfy.model_management,
        model_detection=comfy.model_detection,
        model_patcher=comfy.model_patcher,
        utils=comfy.utils,
        lora=comfy.lora,
        folder_paths=folder_paths,
        nodes=nodes,
    )


# --------------------------------------------------------------------------------------------------
# a random-weight SD1.5-architecture checkpoint
# --------------------------------------------------------------------------------------------------

_SD_UNET_COMMON = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,  # SD15 detection requires 320 ...
    "context_dim": 768,  # ... and 768
    "use_linear_in_transformer": False,
    "transformer_depth_middle": 1,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}

#: Reduced SD1.5 UNet (about 107M params): detected as SD15, 7 transformer blocks, 8x8 latents in
#: a few seconds on CPU. ``transformer_depth_output`` is consumed with ``pop()``: last = output block 0.
SD15_REDUCED_UNET_CONFIG = dict(
    _SD_UNET_COMMON,
    num_res_blocks=[1, 1],
    channel_mult=[1, 2],
    transformer_depth=[1, 1],
    transformer_depth_output=[1, 1, 1, 1],
)

#: The real SD1.5 topology (860M params, 16 transformer blocks = 32 attn2 to_k/to_v keys).
SD15_FULL_UNET_CONFIG = dict(
    _SD_UNET_COMMON,
    num_res_blocks=[2, 2, 2, 2],
    channel_mult=[1, 2, 4, 4],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    transformer_depth_output=[1] * 9 + [0] * 3,
)


def unet_config_from_env() -> dict:
    """``CE_SD15_FULL=1`` selects the full SD1.5 topology (slow: about 2 GB file, 7x the FLOPs)."""
    return dict(SD15_FULL_UNET_CONFIG if os.environ.get("CE_SD15_FULL") == "1" else SD15_REDUCED_UNET_CONFIG)


def expected_attn2_kv_keys(unet_config: dict) -> int:
    """Number of ``attn2.to_k.weight`` + ``attn2.to_v.weight`` keys a UNet config produces."""
    blocks = sum(unet_config["transformer_depth"]) + unet_config["transformer_depth_middle"]
    blocks += sum(unet_config["transformer_depth_output"])
    return 2 * blocks


def sd15_model_config(comfy, unet_config: Optional[dict] = None):
    cfg = dict(unet_config or SD15_REDUCED_UNET_CONFIG)
    model_config = comfy.model_detection.model_config_from_unet_config(cfg)
    if model_config is None:
        raise RuntimeError(f"ComfyUI matched no model for the UNet config {cfg}")
    return model_config


def sd15_checkpoint_shapes(comfy, unet_config: Optional[dict] = None) -> dict:
    """``{key: (shape, dtype)}`` of a single-file SD1.5 checkpoint, from ComfyUI's own classes.

    Everything is built on the meta device (no memory, no init); key prefixes come from the model
    config's ``process_*_state_dict_for_saving`` (``model.diffusion_model.``, ``cond_stage_model.``,
    ``first_stage_model.``), i.e. exactly what ``CheckpointSave`` would write.
    """
    meta = torch.device("meta")
    model_config = sd15_model_config(comfy, unet_config)
    base = model_config.get_model({}, device=meta)

    clip_target = model_config.clip_target()
    clip_model = clip_target.clip(device=meta, dtype=torch.float32)
    clip_sd = clip_model.state_dict()

    ddconfig = {
        "double_z": True,
        "z_channels": 4,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 128,
        "ch_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    with meta:
        vae_model = comfy.comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    vae_sd = vae_model.state_dict()

    import inspect

    if "unet_state_dict" in inspect.signature(base.state_dict_for_saving).parameters:
        # newer ComfyUI (0.2x) takes the UNet's state dict explicitly; 0.3.64 read it from the model
        sd = base.state_dict_for_saving(
            base.diffusion_model.state_dict(), clip_state_dict=clip_sd, vae_state_dict=vae_sd
        )
    else:
        sd = base.state_dict_for_saving(clip_state_dict=clip_sd, vae_state_dict=vae_sd)
    return {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}


def _random_tensor(
    key: str, shape: tuple, dtype: torch.dtype, gen: torch.Generator, std: float, save_dtype: torch.dtype
) -> torch.Tensor:
    if not dtype.is_floating_point:
        if key.endswith("position_ids"):
            return torch.arange(int(torch.tensor(shape).prod())).reshape(shape).to(dtype)
        return torch.zeros(shape, dtype=dtype)
    if key.endswith(".weight") and len(shape) == 1:  # LayerNorm / GroupNorm scales
        return torch.ones(shape, dtype=save_dtype)
    if key.endswith(".bias") or len(shape) == 0:
        return torch.zeros(shape, dtype=save_dtype)
    return (torch.randn(shape, generator=gen) * std).to(save_dtype)


def write_random_sd15_checkpoint(
    comfy,
    path,
    unet_config: Optional[dict] = None,
    seed: int = 0,
    std: float = 0.02,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write a random-weight SD1.5-architecture ``.safetensors`` checkpoint (norms 1, biases 0)."""
    from safetensors.torch import save_file

    path = Path(path)
    shapes = sd15_checkpoint_shapes(comfy, unet_config)
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        k: _random_tensor(k, shape, dt, gen, std, dtype).contiguous() for k, (shape, dt) in sorted(shapes.items())
    }
    n_params = sum(t.numel() for t in tensors.values())
    save_file(tensors, str(path), metadata={"format": "pt", "note": "random weights for tests"})
    log.info("wrote %s: %d tensors, %.1fM params", path, len(tensors), n_params / 1e6)
    return path


# --------------------------------------------------------------------------------------------------
# encoding and sampling (what CLIPTextEncode and KSampler do)
# --------------------------------------------------------------------------------------------------


def encode(comfy, clip, text: str):
    """CLIPTextEncode semantics: returns a CONDITIONING list."""
    tokens = clip.tokenize(text)
    if hasattr(clip, "encode_from_tokens_scheduled"):
        return clip.encode_from_tokens_scheduled(tokens)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def sample(
    comfy,
    model,
    clip,
    positive_text: str,
    negative_text: str,
    seed: int = 0,
    steps: int = 2,
    size: int = 64,
    cfg: float = 7.0,
    sampler_name: str = "euler",
    scheduler: str = "normal",
):
    """EmptyLatentImage + CLIPTextEncode x2 + KSampler; returns the sampled latent (B, 4, size/8, size/8)."""
    positive = encode(comfy, clip, positive_text)
    negative = encode(comfy, clip, negative_text)
    latent = torch.zeros([1, 4, size // 8, size // 8])
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(
        model,
        noise,
        steps,
        cfg,
        sampler_name,
        scheduler,
        positive,
        negative,
        latent,
        denoise=1.0,
        disable_pbar=True,
        seed=seed,
    )


# --------------------------------------------------------------------------------------------------
# a real ComfyUI server (loopback only) with this pack in custom_nodes
# --------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """``python main.py --cpu --listen 127.0.0.1 ...`` in a throw-away base directory."""

    def __init__(
        self,
        comfyui_path: str,
        base_dir,
        python: Optional[str] = None,
        checkpoint: Optional[Path] = None,
        extra_args: tuple = (),
    ):
        self.comfyui_path = str(Path(comfyui_path).resolve())
        self.base_dir = Path(base_dir)
        self.python = python or os.environ.get("COMFYUI_PYTHON") or sys.executable
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.checkpoint = checkpoint
        self.extra_args = tuple(extra_args)
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = self.base_dir / "comfyui.log"
        self.startup_s: Optional[float] = None

    def _prepare_base_dir(self) -> None:
        custom_nodes = self.base_dir / "custom_nodes"
        custom_nodes.mkdir(parents=True, exist_ok=True)
        link = custom_nodes / PACK_DIR_NAME
        if not link.exists():
            link.symlink_to(REPO_ROOT, target_is_directory=True)
        if self.checkpoint is not None:
            ckpt_dir = self.base_dir / "models" / "checkpoints"
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            target = ckpt_dir / CHECKPOINT_NAME
            if not target.exists():
                target.symlink_to(Path(self.checkpoint).resolve())

    def start(self, timeout: float = 120.0) -> "ComfyServer":
        self._prepare_base_dir()
        cmd = [
            self.python,
            "main.py",
            *comfy_cli_flags(self.comfyui_path),
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-auto-launch",
            "--base-directory",
            str(self.base_dir),
            "--database-url",
            "sqlite:///:memory:",
            *self.extra_args,
        ]
        log.info("starting ComfyUI: %s", " ".join(cmd))
        t0 = time.monotonic()
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=self.comfyui_path, stdout=self._log_file, stderr=subprocess.STDOUT)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() - t0 > timeout:
                    self.stop()
                    raise RuntimeError(f"ComfyUI did not answer /system_stats in {timeout} s:\n{self.log_tail()}")
                time.sleep(0.5)
        self.startup_s = time.monotonic() - t0
        log.info("ComfyUI answered on %s after %.1f s", self.url, self.startup_s)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self.proc = None
        if getattr(self, "_log_file", None) is not None:
            self._log_file.close()
            self._log_file = None

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def pack_import_error(self) -> Optional[str]:
        """The 'Cannot import ...concept_erasers...' line ComfyUI logged for this pack, or None."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return None
        for line in lines:
            if line.startswith("Cannot import") and PACK_DIR_NAME in line:
                return line
        return None

    # --- HTTP ---
    def _request(self, method: str, route: str, body=None, timeout: float = 30.0):
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(
            self.url + route, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read().decode("utf-8"))

    def get(self, route: str, timeout: float = 30.0):
        return self._request("GET", route, timeout=timeout)

    def post(self, route: str, body, timeout: float = 30.0):
        return self._request("POST", route, body, timeout=timeout)

    def object_info(self, node_class: Optional[str] = None) -> dict:
        return self.get("/object_info" + (f"/{node_class}" if node_class else ""))

    def queue_prompt(self, prompt: dict) -> str:
        """POST an API-format graph; returns the prompt id. Raises with ``node_errors`` on a 400."""
        body = {"prompt": prompt, "client_id": "concept-erasers-tests", "prompt_id": str(uuid.uuid4())}
        try:
            return self.post("/prompt", body)["prompt_id"]
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", errors="replace")
            raise RuntimeError(f"/prompt refused the graph ({e.code}): {detail}") from e

    def wait_history(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.5) -> dict:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("completed") or entry["status"].get("status_str") == "error":
                    return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(poll)
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout} s:\n{self.log_tail()}")

    def run_prompt(self, prompt: dict, timeout: float = 300.0) -> dict:
        return self.wait_history(self.queue_prompt(prompt), timeout=timeout)


@pytest.fixture(scope="session")
def comfy_server(comfy, sd15_checkpoint, tmp_path_factory):
    """A running ComfyUI (loopback, CPU) with this pack symlinked as custom_nodes/concept_erasers and
    the random SD1.5 checkpoint available to CheckpointLoaderSimple as ``CHECKPOINT_NAME``."""
    base = tmp_path_factory.mktemp("comfy_base")
    server = ComfyServer(comfy.path, base, checkpoint=sd15_checkpoint)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def txt2img_prompt(
    positive: str,
    negative: str = "",
    seed: int = 0,
    steps: int = 2,
    size: int = 64,
    ckpt_name: str = CHECKPOINT_NAME,
    prefix: str = "ce_test",
) -> dict:
    """API-format graph: CheckpointLoaderSimple → CLIPTextEncode x2 → KSampler → VAEDecode → SaveImage."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "seed": seed,
                "steps": steps,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


# --------------------------------------------------------------------------------------------------
# bit-exact weight comparison
# --------------------------------------------------------------------------------------------------

_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bit patterns as integers of the same width, so that equality means "the same bits".

    ``torch.equal`` compares values, and NaN != NaN: a tensor holding NaN is not ``torch.equal`` to its own
    clone. ComfyUI leaves some parameters uninitialised (``torch.empty``) when a checkpoint lacks them —
    SD1.5's ``clip_l.transformer.text_projection.weight``, which SD1.5 checkpoints never store and the SD1.5
    text encoder never reads — so whether such a weight "equals" its snapshot would depend on whatever bytes
    the allocator handed out (run with ``MALLOC_PERTURB_=1`` to make them all NaN).
    """
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.contiguous().view(_SAME_WIDTH_INT[t.element_size()])


def snapshot(state_dict: dict) -> dict:
    """``{key: detached clone}`` of a state dict (its tensors are the live weights, not copies)."""
    return {k: v.detach().clone() for k, v in state_dict.items()}


def changed_keys(before: dict, after: dict) -> list:
    """Keys whose tensors differ bit for bit (or in shape/dtype), plus keys present in only one of the two."""
    changed = sorted(set(before) ^ set(after))
    for k in sorted(set(before) & set(after)):
        a, b = before[k], after[k]
        if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(bits(a), bits(b)):
            changed.append(k)
    return changed


def needs_newer_comfyui(workflow: dict, version: str) -> bool:
    """A family workflow (erasers_dev/family_workflows.py) names the ComfyUI that has its nodes and CLIP types
    (``extra.concept_erasers.requires_comfyui``); True when ``version`` is older."""
    needed = workflow.get("extra", {}).get("concept_erasers", {}).get("requires_comfyui")
    as_tuple = lambda v: tuple(int(x) for x in str(v).split(".")[:3])  # noqa: E731
    return bool(needed) and as_tuple(version) < as_tuple(needed)

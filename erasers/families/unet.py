"""ComfyUI's cross-attention UNets: one class serves several families, told apart by the keys' widths.

BaseModel is SD1.x and SD2.x (context 768 / 1024); SDXL's class also holds SDXL-derived finetunes. The
edit points are every ``attn2.to_k`` / ``to_v`` (comfyui_host.md §2.4).
"""

from .record import GUARDS, FamilyRecord

UNET_TEXT = "cross-attention: every transformer block's attn2 reads the whole text context as K/V"
CLIP_TEXT = "CLIP (77-token chunks with start/end tokens)"

#: the classes the guards' own family test serves (nodes/suppression_clip.py tells SD1.x / SD2.x / SDXL
#: apart by width); the other UNet classes add inputs (a refiner's aesthetic score, InstructPix2Pix's
#: image latent, the upscaler's noise level) the guards were never run with
GUARDED = ("BaseModel", "SD21UNCLIP", "SDXL", "SDXL_instructpix2pix")
NOT_GUARDED = "the guards have not been run on this UNet class (it adds conditioning inputs of its own)"

RECORDS = tuple(
    FamilyRecord(
        name,
        label,
        sniff=True,
        text_encoder=CLIP_TEXT,
        text_tokens=UNET_TEXT,
        guards=GUARDS if name in GUARDED else (),
        guard_refusals=() if name in GUARDED else tuple((g, NOT_GUARDED) for g in GUARDS),
        guard_layout="cross_attention",
    )
    for name, label in (
        ("BaseModel", "SD1.x / SD2.x UNet"),
        ("SD21UNCLIP", "SD2.1 unCLIP"),
        ("SDXL", "SDXL"),
        ("SDXLRefiner", "SDXL refiner"),
        ("SD15_instructpix2pix", "SD1.5 InstructPix2Pix"),
        ("SDXL_instructpix2pix", "SDXL InstructPix2Pix"),
        ("SD_X4Upscaler", "SD x4 upscaler"),
    )
)

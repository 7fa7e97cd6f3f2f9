"""A1111 / Forge: command-line flags, read before arguments are parsed (never imported by ComfyUI)."""


def preload(parser):
    parser.add_argument(
        "--erasers-dir",
        type=str,
        default=None,
        help="Concept Erasers: folder with eraser files (default: models/erasers)",
    )
    parser.add_argument(
        "--spm-dir", type=str, default=None, help="Concept Erasers: folder with SPM membranes (default: models/spm)"
    )

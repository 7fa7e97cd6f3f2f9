"""Model folders of the pack: ``models/erasers`` and ``models/spm``, registered only if missing.

ComfyUI loads ``extra_model_paths.yaml`` before custom nodes, so an existing entry is extended, never
replaced (the pattern city96/ComfyUI-GGUF uses). Only ``.safetensors`` files are listed.
"""
import os

SAFETENSORS = {".safetensors"}
PACK_FOLDERS = ("erasers", "spm")


def register_model_folders(folder_paths=None):
    if folder_paths is None:
        import folder_paths  # noqa: PLW0621  (host module, imported lazily)
    for name in PACK_FOLDERS:
        default = os.path.join(folder_paths.models_dir, name)
        if name not in folder_paths.folder_names_and_paths:
            folder_paths.folder_names_and_paths[name] = ([default], set(SAFETENSORS))
        else:
            paths, extensions = folder_paths.folder_names_and_paths[name]
            if default not in paths:
                paths.append(default)
            if isinstance(extensions, set):
                extensions.update(SAFETENSORS)
        os.makedirs(default, exist_ok=True)

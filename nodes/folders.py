"""Model folders of the pack: ``models/erasers`` and ``models/spm``, registered only if missing.

ComfyUI loads ``extra_model_paths.yaml`` before custom nodes, so an existing entry is extended, never
replaced (``folder_paths.add_model_folder_path``). Only ``.safetensors`` files are listed.
"""

import os

SAFETENSORS = {".safetensors"}
PACK_FOLDERS = ("erasers", "spm")


def register_model_folders(folder_paths=None):
    if folder_paths is None:
        import folder_paths  # noqa: PLW0621  (host module, imported lazily)
    for name in PACK_FOLDERS:
        default = os.path.join(folder_paths.models_dir, name)
        # the host's public call: appends to an extra_model_paths.yaml entry, never replaces it
        folder_paths.add_model_folder_path(name, default)
        # a new entry gets an empty extension set (= every file); no public call sets it, so fill it in place
        extensions = folder_paths.folder_names_and_paths[name][1]
        if isinstance(extensions, set):
            extensions.update(SAFETENSORS)
        os.makedirs(default, exist_ok=True)

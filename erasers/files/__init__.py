"""Files, keys and model families: eraser files, the safetensors header reader, name tables, family detection."""

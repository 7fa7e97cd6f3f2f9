"""Write requirements.txt (what ComfyUI-Manager installs) from pyproject.toml, the one place deps are declared.

python tools/sync_requirements.py           # rewrite requirements.txt
python tools/sync_requirements.py --check   # exit 1 if it is out of date (the test suite runs this)
"""

import argparse
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
HEADER = (
    "# Generated from pyproject.toml [project] dependencies by `python tools/sync_requirements.py`; edit "
    "those, not this.\n# One package per line for ComfyUI-Manager. torch is never listed: the host owns it.\n"
)


def expected() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    return HEADER + "".join(f"{dep}\n" for dep in deps)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when requirements.txt differs")
    args = parser.parse_args(argv)
    path = ROOT / "requirements.txt"
    want = expected()
    have = path.read_text(encoding="utf-8") if path.exists() else ""
    if args.check:
        if have != want:
            print("requirements.txt is out of date: run `python tools/sync_requirements.py`.", file=sys.stderr)
            return 1
        return 0
    if have != want:
        tmp = path.with_suffix(".txt.tmp")
        tmp.write_text(want, encoding="utf-8")
        tmp.replace(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

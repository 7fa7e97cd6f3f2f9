"""Extra-network tags ``<eraser:name:weight>`` and ``<spm:name:weight>``.

The webui's own parser (``modules.extra_networks``) strips the tags and hands each network the items
after the name; ``parse_params`` turns those into (name, weight). ``find_tags`` is the same grammar for
plain strings (tests, the API helper, logs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("eraser", "spm")
# the webui's grammar: <(\w+):([^>]+)>, arguments split on ':'
TAG = re.compile(r"<(eraser|spm):([^>]+)>")


@dataclass(frozen=True)
class TagRequest:
    kind: str  # "eraser" or "spm"
    name: str
    weight: float = 1.0
    #: SPM only: facilitated transport on/off (``ft=0`` turns it off)
    transport: bool = True


def parse_params(kind: str, items, named=None, default_weight: float = 1.0) -> TagRequest:
    """``items`` = the tag's ':'-separated parts after the kind; ``k=v`` parts may be in ``named``."""
    items = [str(i).strip() for i in items]
    named = dict(named or {})
    positional = []
    for item in items:
        if "=" in item:
            key, _, value = item.partition("=")
            named.setdefault(key.strip(), value.strip())
        else:
            positional.append(item)
    if not positional or not positional[0]:
        raise ValueError(f"<{kind}:…> needs a file name, e.g. <{kind}:my_{kind}:1.0>.")
    name = positional[0]
    weight_text = named.get("w", positional[1] if len(positional) > 1 else None)
    try:
        weight = float(weight_text) if weight_text not in (None, "") else float(default_weight)
    except ValueError:
        raise ValueError(f"<{kind}:{name}:{weight_text}>: the weight must be a number such as 0.8.") from None
    transport = str(named.get("ft", "1")).strip().lower() not in ("0", "false", "off", "no")
    return TagRequest(kind, name, weight, transport)


def find_tags(prompt: str, default_weight: float = 1.0) -> list:
    """Every ``<eraser:…>`` / ``<spm:…>`` tag in ``prompt``, in order."""
    return [
        parse_params(m.group(1), m.group(2).split(":"), default_weight=default_weight)
        for m in TAG.finditer(prompt or "")
    ]


def from_extra_network_params(kind: str, params_list, default_weight: float = 1.0) -> list:
    """The webui's ``ExtraNetworkParams`` list (``.items`` / ``.positional`` / ``.named``) → TagRequests."""
    out = []
    for params in params_list or []:
        items = getattr(params, "positional", None)
        if items is None:
            items = getattr(params, "items", [])
        out.append(parse_params(kind, items, getattr(params, "named", None), default_weight))
    return out

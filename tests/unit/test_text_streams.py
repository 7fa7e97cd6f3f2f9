"""nodes/text_streams.py: the host CLIP's outputs per prompt are kept for the most recent prompts only."""

from pack_import import pack_module

text_streams = pack_module("nodes.text_streams")


class CountingCLIP:
    def __init__(self):
        self.encodes = 0

    def tokenize(self, text, **kwargs):
        return {"t5xxl": [[(len(text), 1.0)]]}

    def encode_from_tokens(self, tokens, **kwargs):
        self.encodes += 1
        return {"cond": tokens["t5xxl"][0][0][0]}


def test_host_encodes_each_recent_prompt_once_and_holds_at_most_keep_outputs():
    clip = CountingCLIP()
    host = text_streams.HostEncodes(clip, keep=2)
    for prompt in ("a", "bb", "a", "bb"):
        host.output(prompt)
    assert clip.encodes == 2  # both kept: encoded once each
    host.output("ccc")  # evicts the least recent ("a")
    assert len(host._out) == 2 and clip.encodes == 3
    assert host.output("a")["cond"] == 1 and clip.encodes == 4  # re-encoded, same result

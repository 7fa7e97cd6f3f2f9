"""SAFREE on the decoder-LLM chat families (Flux.2, Qwen-Image, Lumina 2, Z-Image), on fakes (no host).

The fake CLIP follows ComfyUI's API and the layouts ComfyUI 0.29 gives these families
(comfy/text_encoders/{qwen_image,z_image,lumina2,flux}.py): a chat template whose head the encoder drops
(Qwen-Image), a template kept whole (Z-Image), a template padded to 512 on the right (Flux.2-klein), a start
token and nothing after (Lumina 2's Gemma). Its encoder is causal (row i is token i's vector plus half the
mean of the tokens before it, as a decoder LLM's rows are mostly their own token's), so a word's masked copy
changes only the rows from it on.
"""

import hashlib

import pytest
import torch
from pack_import import pack_module

from erasers.config import ConfigError
from erasers.guards import safree

sc = pack_module("nodes.suppression_clip")
FamilyMismatch = sc.FamilyMismatch  # the class as the pack (imported as a ComfyUI package) raises it
hooks = pack_module("nodes.suppression_hooks")

IM_START, IM_END, NL, USER, ASSISTANT, QWEN_PAD, BANG, GEMMA_BANG = 151644, 151645, 198, 872, 77091, 151643, 0, 236888
SYSTEM = [IM_START, 8948, NL, 74785, 279, 2168, IM_END, NL]  # <|im_start|>system\n… <|im_end|>\n
HEAD = [IM_START, USER, NL]
TAIL = [IM_END, NL, IM_START, ASSISTANT, NL]
GEMMA_BOS = 2


def word_id(word: str, bang: int = BANG) -> int:
    return bang if word == "!" else 1000 + int(hashlib.md5(word.encode()).hexdigest(), 16) % 50000


class Sub:
    def __init__(self, pad):
        self.pad_token = pad


class ChatTokenizer:
    """Words → ids inside a template; ``pad_to`` pads on the right with ``pad``; ``own_template``: a text
    starting with '<|im_start|>' replaces the template (as QwenImageTokenizer does)."""

    def __init__(self, head, tail, pad, pad_to=None, key="qwen25_7b", bang=BANG):
        self.head, self.tail, self.pad, self.pad_to, self.key, self.bang = head, tail, pad, pad_to, key, bang
        setattr(self, key, Sub(pad))

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        if text.startswith("<|im_start|>"):
            ids = [IM_START] + [word_id(w) for w in text[len("<|im_start|>") :].split()]
        else:
            ids = list(self.head) + [word_id(w, self.bang) for w in text.split()] + list(self.tail)
        if self.pad_to:
            ids += [self.pad] * (self.pad_to - len(ids))
        return {self.key: [[(i, 1.0) for i in ids]]}


def qwen_image_drop(ids):
    """QwenImageTEModel.encode_token_weights: keep what follows the 2nd <|im_start|> and 'user\\n'."""
    end = [i for i, t in enumerate(ids) if t == IM_START][:2][-1]
    return end + 3 if ids[end + 1 : end + 3] == [USER, NL] else end


class ChatCLIP:
    """comfy.sd.CLIP's tokenize / encode_from_tokens over a causal stand-in encoder (running mean of fixed
    random rows per id); ``drop`` removes leading rows as the host's encoder does."""

    def __init__(self, tokenizer, width=256, drop=None):
        self.tokenizer, self.width, self.drop, self.calls = tokenizer, width, drop, 0

    def tokenize(self, text, **kwargs):
        return self.tokenizer.tokenize_with_weights(text)

    def row(self, token):
        return torch.randn(self.width, generator=torch.Generator().manual_seed(int(token)))

    def encode_from_tokens(self, tokens, return_pooled=False):
        self.calls += 1
        ((_, sections),) = tokens.items()
        ids = [t[0] for t in sections[0]]
        x = torch.stack([self.row(t) for t in ids])
        before = torch.cat([torch.zeros_like(x[:1]), x.cumsum(0)[:-1]]) / torch.arange(len(ids)).clamp_min(1)[:, None]
        x = torch.tanh(x + 0.5 * before)
        if self.drop is not None:
            x = x[self.drop(ids) :]
        return (x[None], None) if return_pooled else x[None]


LAYOUTS = {
    # family → (clip, template tokens in front of the words, behind them, rows dropped in front)
    "qwen_image": lambda: ChatCLIP(ChatTokenizer(SYSTEM + HEAD, TAIL, QWEN_PAD), drop=qwen_image_drop),
    "zimage": lambda: ChatCLIP(ChatTokenizer(HEAD, TAIL, QWEN_PAD, key="qwen3_4b")),
    "flux2": lambda: ChatCLIP(ChatTokenizer(HEAD, TAIL + [151667, NL, 151668], QWEN_PAD, 64, "qwen3_4b")),
    "lumina2": lambda: ChatCLIP(ChatTokenizer([GEMMA_BOS], [], 0, key="gemma2_2b", bang=GEMMA_BANG)),
}
PROMPT = "a photo of a nude person on a beach"


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_the_prompts_own_rows_are_found_inside_the_hosts_template(family):
    clip = LAYOUTS[family]()
    layout = sc.chat_layout(clip, family)
    head = {"qwen_image": SYSTEM + HEAD, "lumina2": [GEMMA_BOS]}.get(family, HEAD)
    assert list(layout.head) == head and layout.mask_id == (GEMMA_BANG if family == "lumina2" else BANG)
    text = sc.chat_text(clip, layout, PROMPT)
    lo, hi = text.rows
    words = PROMPT.split()
    assert hi - lo == len(words) and text.ids[text.start : text.end] == [word_id(w) for w in words]
    # the rows are the words' own: the last one is the encoder's row for the last word of the prompt
    dropped = len(SYSTEM + HEAD) if family == "qwen_image" else 0  # the host keeps what follows 'user\n'
    assert text.drop == dropped and lo == len(head) - dropped
    full = clip.encode_from_tokens(clip.tokenize(PROMPT))[0]
    own = torch.stack([clip.row(t) for t in text.ids[: text.end]])
    mean_before = own[:-1].mean(0)  # the last word's row: its own vector and the mean of the tokens before it
    assert torch.allclose(full[hi - 1], torch.tanh(own[-1] + 0.5 * mean_before), atol=1e-6)


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_masked_copies_keep_the_template_and_change_only_the_rows_from_the_masked_word_on(family):
    clip = LAYOUTS[family]()
    layout = sc.chat_layout(clip, family)
    text = sc.chat_text(clip, layout, PROMPT)
    positions, masked = sc.chat_masked_copies(clip, layout, text)
    lo, hi = text.rows
    assert positions == list(range(lo, hi)) and masked.shape == (hi - lo,) + tuple(text.context.shape)
    for i, pos in enumerate(positions):
        assert torch.equal(masked[i, :pos], text.context[:pos])  # causal: nothing before the word moves
        assert not torch.equal(masked[i, pos], text.context[pos])


def analyse(family, prompt, **kw):
    clip = LAYOUTS[family]()
    layout = sc.chat_layout(clip, family)
    text = sc.chat_text(clip, layout, prompt)
    positions, masked = sc.chat_masked_copies(clip, layout, text)
    concepts, lengths = sc.chat_concepts(clip, layout, ["nude"])
    lo, hi = text.rows
    kw.setdefault("self_validating", False)
    cfg = safree.SAFREEConfig(concepts=["nude"], **kw)
    res = safree.analyse(
        cfg,
        text.context,
        hi - lo,
        positions,
        masked,
        torch.full((len(positions),), hi - lo),
        concepts,
        lengths,
        encoder="llm",
        token_range=(lo, hi),
    )
    return text, res


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_the_concept_word_is_flagged_and_only_the_prompts_own_rows_are_projected(family):
    text, res = analyse(family, PROMPT, include_eos=False)
    lo, hi = text.rows
    nude = lo + PROMPT.split().index("nude")
    assert res.info["flagged_positions"] == [nude] and res.changed
    changed = set(torch.nonzero((res.hidden != text.context).any(-1)).flatten().tolist())
    assert changed == {nude}
    # include_eos: the later rows of the prompt carry the word (causal) and are projected; never the template's
    text, res = analyse(family, PROMPT, include_eos=True)
    changed = set(torch.nonzero((res.hidden != text.context).any(-1)).flatten().tolist())
    assert changed == set(range(nude, hi))
    assert torch.equal(res.hidden[:lo], text.context[:lo]) and torch.equal(res.hidden[hi:], text.context[hi:])
    # the projected rows have no component along the concept's pooled vector (the mean over its own rows)
    clip = LAYOUTS[family]()
    layout = sc.chat_layout(clip, family)
    concept = sc.chat_text(clip, layout, "nude")
    c_lo, c_hi = concept.rows
    basis = safree.llm_pool(concept.context[c_lo:c_hi]).double()
    assert (res.hidden[nude:hi].double() @ basis).abs().max() < 1e-5 * basis.norm()


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_a_benign_prompt_flags_nothing_and_stays_the_same_tensor(family):
    text, res = analyse(family, "a photo of a dog on a beach")
    assert not res.flagged.any() and not res.changed and res.hidden is text.context


def test_the_pooled_vector_is_the_mean_over_the_texts_own_rows():
    rows = torch.randn(5, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    mean = rows.mean(0)
    assert torch.allclose(safree.llm_pool(rows).double(), mean / mean.norm(), atol=1e-6)
    with pytest.raises(ConfigError, match="no token rows"):
        safree.llm_pool(rows[:0])


# -- fail closed: a layout that is not the expected one is refused before anything is patched -------------


def test_a_prompt_that_brings_its_own_template_is_refused():
    clip = LAYOUTS["qwen_image"]()
    layout = sc.chat_layout(clip, "qwen_image")
    with pytest.raises(FamilyMismatch, match="do not sit inside its template.*own template"):
        sc.chat_text(clip, layout, "<|im_start|>system a nude person")


def test_an_encoder_that_drops_rows_where_the_host_drops_none_is_refused():
    clip = ChatCLIP(ChatTokenizer(HEAD, TAIL, QWEN_PAD, key="qwen3_4b"), drop=lambda ids: 2)
    layout = sc.chat_layout(clip, "zimage")
    with pytest.raises(FamilyMismatch, match=r"returned \d+ rows for \d+ tokens.*one row per token"):
        sc.chat_text(clip, layout, PROMPT)
    # and Qwen-Image's encoder must drop only template rows: dropping into the words is refused
    clip = ChatCLIP(ChatTokenizer(SYSTEM + HEAD, TAIL, QWEN_PAD), drop=lambda ids: len(SYSTEM + HEAD) + 1)
    with pytest.raises(FamilyMismatch, match="drops part of the template head"):
        sc.chat_text(clip, sc.chat_layout(clip, "qwen_image"), PROMPT)


def test_a_masked_copy_the_host_encodes_to_other_rows_is_refused():
    clip = LAYOUTS["qwen_image"]()
    layout = sc.chat_layout(clip, "qwen_image")
    text = sc.chat_text(clip, layout, PROMPT)
    # the host keeps one template row more for the masked copies: the words' rows no longer line up
    clip.drop = lambda ids: qwen_image_drop(ids) - 1
    with pytest.raises(FamilyMismatch, match=r"masking token 11 moved the prompt's rows from \(0, 9\) to \(1, 10\)"):
        sc.chat_masked_copies(clip, layout, text)


def test_a_tokenizer_without_a_single_mask_token_or_template_is_refused():
    class NoBang(ChatTokenizer):
        def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
            return super().tokenize_with_weights("! !" if text == "!" else text)

    with pytest.raises(FamilyMismatch, match="one ordinary token"):
        sc.chat_layout(ChatCLIP(NoBang(HEAD, TAIL, QWEN_PAD, key="qwen3_4b")), "zimage")

    class TwoKeys(ChatTokenizer):
        def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
            return dict(super().tokenize_with_weights(text), l=[[(1, 1.0)]])

    with pytest.raises(FamilyMismatch, match="expected one key"):
        sc.chat_layout(ChatCLIP(TwoKeys(HEAD, TAIL, QWEN_PAD)), "zimage")


def test_the_llm_analysis_refuses_rows_outside_the_prompt():
    ctx = torch.randn(10, 4)
    masked = ctx[None].repeat(2, 1, 1)
    args = (masked, torch.tensor([3, 3]), torch.randn(1, 2, 4), torch.tensor([2]))
    cfg = safree.SAFREEConfig(concepts=["x"])
    with pytest.raises(ConfigError, match="needs token_range"):
        safree.analyse(cfg, ctx, 3, [4, 5], *args, encoder="llm")
    with pytest.raises(ConfigError, match=r"outside the prompt's own rows \[4, 7\)"):
        safree.analyse(cfg, ctx, 3, [4, 8], *args, encoder="llm", token_range=(4, 7))
    with pytest.raises(ConfigError, match="length 5 do not fit"):
        safree.analyse(cfg, ctx, 5, [4, 5], *args, encoder="llm", token_range=(4, 7))


# -- sampling: the projection lands on the prompt's rows, behind Flux.2's left padding ---------------------


def test_the_wrapper_puts_the_projection_behind_a_left_padded_context():
    from erasers.guards.safree import SafreeResult

    prompt = torch.randn(6, 4)
    projected = prompt.clone()
    projected[2] = 0
    res = SafreeResult(projected, torch.tensor([True]), [2], torch.ones(1), changed=True)
    w = hooks.make_safree_wrapper(res, prompt, 100.0, 0.0)
    seen = {}

    def executor(x, t, c_concat, c_crossattn, control, to, **kw):
        seen["ctx"] = c_crossattn
        return x

    padded = torch.cat([torch.zeros(10, 4), prompt])[None]  # model_base.Flux2.extra_conds: zeros in front
    w(executor, torch.zeros(1), torch.tensor([5.0]), None, padded, None, {"cond_or_uncond": [0]})
    assert torch.equal(seen["ctx"][0, :10], torch.zeros(10, 4)) and torch.equal(seen["ctx"][0, 10:], projected)
    other = torch.cat([torch.zeros(10, 4), prompt + 1])[None]  # another prompt, padded: left alone
    w(executor, torch.zeros(1), torch.tensor([5.0]), None, other, None, {"cond_or_uncond": [0]})
    assert seen["ctx"] is other

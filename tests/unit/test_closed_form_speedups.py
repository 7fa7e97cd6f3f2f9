"""#16 benchmark work: preset preserve lists, each prompt encoded once, shortened encodings equal full ones,
the r×r UCE route, and ``--preset`` on the command line."""

import pytest
import torch

from erasers.config import ARTISTS, ConfigError, shipped_names
from erasers.edits import rece, speed, uce
from erasers.edits.closed_form import shared_factors
from erasers.edits.encoding import Gram, Need, encode_needs
from erasers.text import encode_batched
from erasers_dev.testing import ToyTextEncoder


def tiny_clip(seed=0):
    """A random 2-layer CLIP text tower (transformers) behind the pack's ClipTextEncoder: causal, 77
    positions, EOS padding — the real module whose rows the shortcuts must reproduce."""
    transformers = pytest.importorskip("transformers")
    from erasers_diffusers.clip_text import ClipTextEncoder, Tower, WordHashTokenizer

    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    model = transformers.CLIPTextModel(config).eval()
    return ClipTextEncoder("sd1", [Tower(WordHashTokenizer(), model, "last")])


PROMPTS = ["Claude Monet", "a painting by someone with a rather long name indeed", "", "art", "Claude Monet", "x y"]


class CountingEncoder:
    """Counts how often each prompt reaches the encoder, over every call."""

    def __init__(self, inner):
        self.inner = inner
        self.family, self.context_length = inner.family, inner.context_length
        self.counts = {}

    def _count(self, prompts):
        for p in prompts:
            self.counts[p] = self.counts.get(p, 0) + 1

    def encode(self, prompts):
        self._count(prompts)
        return self.inner.encode(prompts)

    def encode_real_tokens(self, prompts):
        self._count(prompts)
        return getattr(self.inner, "encode_real_tokens", self.inner.encode)(prompts)


# -- presets ------------------------------------------------------------------------------------------


def test_style_presets_preserve_every_other_artist_case_insensitively():
    names = shipped_names("artists_sd.txt")
    assert len(names) == 1834 and names[0] == "A.J.Casson"
    erased = ["vincent van gogh", "CLAUDE MONET"]  # other case than the list's
    for cfg in (
        speed.SPEEDConfig.from_preset("styles", concepts=erased),
        rece.RECEConfig.from_preset("art", concepts=erased),
    ):
        assert len(cfg.preserve) == 1832
        assert not {"vincent van gogh", "claude monet"} & {p.lower() for p in cfg.preserve}
        assert cfg.preserve == [n for n in names if n.lower() not in ("vincent van gogh", "claude monet")]
    # a concept that is not in the list removes nothing
    assert len(speed.SPEEDConfig.from_preset("styles", concepts=["my own style"]).preserve) == 1834
    # a preserve the caller gives replaces the preset's list, even an empty one
    assert speed.SPEEDConfig.from_preset("styles", concepts=["x"], preserve=["Snoopy"]).preserve == ["Snoopy"]
    assert rece.RECEConfig.from_preset("art", concepts=["x"], preserve=[]).preserve == []
    # the check that refuses erased-and-preserved concepts still holds for explicit lists
    with pytest.raises(ConfigError, match="both erased and preserved"):
        speed.SPEEDConfig.from_preset("styles", concepts=["Claude Monet"], preserve=["claude monet"])
    assert speed.SPEEDConfig.PRESETS["styles"]["preserve"] is ARTISTS is rece.RECEConfig.PRESETS["art"]["preserve"]
    # the other presets keep no list
    assert speed.SPEEDConfig.from_preset("few", concepts=["x"]).preserve == []


def test_preset_config_round_trips_through_its_dict():
    cfg = rece.RECEConfig.from_preset("art", concepts=["Claude Monet"])
    assert rece.RECEConfig.from_dict(cfg.to_dict()) == cfg


# -- encodings ----------------------------------------------------------------------------------------


def test_real_token_rows_equal_the_full_77_position_rows():
    encoder = tiny_clip()
    full = encoder.encode(PROMPTS)
    got = encode_needs(encoder, {"r": Need(PROMPTS, "real")}, chunk=2)["r"]
    assert got.lengths.tolist() == full.lengths.tolist() and got.token_ids == full.token_ids
    for i, n in enumerate(full.lengths.tolist()):
        # float32 rows of batches of other shapes: equal to rounding (1e-5 relative, stated in encoding.py)
        torch.testing.assert_close(got.hidden[i, :n], full.hidden[i, :n], rtol=1e-5, atol=1e-6)
    # the same as the per-list path it replaces
    old = encode_batched(encoder, PROMPTS, real_tokens_only=True)
    idx = torch.arange(len(PROMPTS))
    torch.testing.assert_close(
        got.hidden[idx, got.last_subject_index], old.hidden[idx, old.last_subject_index], rtol=1e-5, atol=1e-6
    )


def test_pad_rows_depend_on_the_prompt_so_all_rows_are_never_shortened():
    encoder = tiny_clip()
    full = encoder.encode(["Claude Monet", "x y"])
    # positions after EOS hold the same token and position in both prompts, yet differ: they attend to the
    # prompt before them. This is why "all" and "gram" needs run the full 77-position pass.
    assert not torch.allclose(full.hidden[0, 10:], full.hidden[1, 10:], atol=1e-3)
    got = encode_needs(encoder, {"a": Need(["Claude Monet", "x y"], "all")})["a"]
    assert got.hidden.shape == full.hidden.shape
    torch.testing.assert_close(got.hidden, full.hidden, rtol=1e-5, atol=1e-6)


def test_gram_equals_the_gram_of_every_row_with_repeats():
    encoder = tiny_clip()
    prompts = [""] + PROMPTS  # "Claude Monet" twice: counted twice, as the row list would
    rows = encoder.encode(prompts).hidden.reshape(-1, 32).double()
    got = encode_needs(encoder, {"p": Need(prompts, "gram")}, chunk=3)["p"]
    assert isinstance(got, Gram) and len(got) == len(prompts)
    torch.testing.assert_close(got.gram, rows.T @ rows, rtol=1e-5, atol=1e-6)


def test_each_distinct_prompt_is_encoded_once_across_needs():
    encoder = CountingEncoder(ToyTextEncoder())
    out = encode_needs(
        encoder,
        {"a": Need(["x", "y", "x"], "real"), "b": Need(["y", "z"], "all"), "g": Need(["", "z"], "gram")},
    )
    assert encoder.counts == {"x": 1, "y": 1, "z": 1, "": 1}
    torch.testing.assert_close(out["a"].hidden[0], out["a"].hidden[2])
    # "y" came from the full pass: its real rows are the first rows of the full encoding
    n = int(out["a"].lengths[1])
    torch.testing.assert_close(out["a"].hidden[1, :n], out["b"].hidden[0, :n])


def test_rece_encodes_each_prompt_once():
    encoder = CountingEncoder(ToyTextEncoder())
    artists = ["Claude Monet", "Edvard Munch", "Frida Kahlo"]
    cfg = rece.RECEConfig(concepts=["Vincent Van Gogh"], concept_type="art", preserve=artists)
    encodings = rece.encode_inputs(cfg, encoder)
    assert encoder.counts == {p: 1 for p in ["Vincent Van Gogh", "art", ""] + artists}
    assert encodings["p"] is encodings["up"] and encodings["c"] is encodings["uc"]
    rows = ToyTextEncoder().encode([""] + artists).hidden.reshape(-1, 768).double()
    torch.testing.assert_close(encodings["p"].gram, rows.T @ rows, rtol=1e-6, atol=1e-6)


def test_speed_encodes_each_prompt_once_and_reads_the_same_rows():
    encoder = CountingEncoder(tiny_clip())
    cfg = speed.SPEEDConfig.from_preset("styles", concepts=["Claude Monet"], preserve=["Edvard Munch", "art"])
    enc = speed.encode_inputs(cfg, encoder)
    assert encoder.counts == {"Claude Monet": 1, "art": 1, "": 1, "Edvard Munch": 1}
    inner = encoder.inner
    for key, prompts in (("c", ["Claude Monet"]), ("a", ["art"]), ("r", ["Edvard Munch", "art"])):
        full = inner.encode(prompts)
        idx = torch.arange(len(prompts))
        torch.testing.assert_close(
            enc[key].hidden[idx, enc[key].last_subject_index],
            full.hidden[idx, full.last_subject_index],
            rtol=1e-5,
            atol=1e-6,
        )
    torch.testing.assert_close(enc["null"].hidden, inner.encode([""]).hidden, rtol=1e-5, atol=1e-6)


def test_rece_art_edit_is_unchanged_by_the_gram_route():
    from erasers.edits.eraser import compute_eraser
    from erasers.files.families import Family
    from erasers_dev.testing import layer_weights

    encoder = ToyTextEncoder()
    weights = layer_weights(Family.SD1)
    cfg = rece.RECEConfig.from_preset("art", concepts=["Claude Monet"], preserve=["Edvard Munch", "Frida Kahlo"])
    got = compute_eraser(cfg, encoder, weights, Family.SD1).deltas
    # reference: the per-list encodings with every preserve row materialised
    uce_cfg = cfg.uce_start()
    c, g = uce.erase_pairs(uce_cfg)
    encodings = {
        "c": encoder.encode(cfg.concepts),
        "a": encoder.encode(cfg.anchors_for_concepts("art")),
        "p": encoder.encode([""] + cfg.preserve),
        "uc": encoder.encode(c),
        "ug": encoder.encode(g),
        "up": encoder.encode(uce.retain_prompts(uce_cfg)),
    }
    keys = sorted(got)
    x, y = rece.stream_delta(cfg, uce_cfg, encodings, [weights[k].float() for k in keys], False)
    for key in keys:
        want = weights[key].double() @ (x @ y)
        err = float((got[key].dense(torch.float64) - want).norm() / want.norm())
        assert err < 1e-5, (key, err)


# -- the r×r UCE route ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n_preserve", [0, 7])
def test_ridge_factors_equal_the_dense_solve(n_preserve):
    gen = torch.Generator().manual_seed(0)
    c, t = torch.randn(5, 96, generator=gen), torch.randn(5, 96, generator=gen)
    p = torch.randn(n_preserve, 96, generator=gen) if n_preserve else None
    a1, b1 = shared_factors(c, t, 0.5, 1.0, p, 0.3)
    a2, b2 = uce.ridge_factors(c, t, 0.5, 1.0, p, 0.3)
    torch.testing.assert_close(a2 @ b2, a1 @ b1, rtol=1e-10, atol=1e-12)


# -- the command line -------------------------------------------------------------------------------------


def test_cli_preset_parses_and_explicit_options_override_it():
    from erasers_diffusers import cli

    cfg = cli.build_config("speed", ["Claude Monet"], [], [], None, None, [], preset="styles")
    assert isinstance(cfg, speed.SPEEDConfig)
    assert (cfg.concept_type, cfg.anchors, len(cfg.preserve)) == ("art", ["art"], 1833)
    cfg = cli.build_config("speed", ["Claude Monet"], ["painting"], ["Snoopy"], None, 4, ["aug_num=3"], "styles")
    assert (cfg.anchors, cfg.preserve, cfg.rank_cap, cfg.aug_num) == (["painting"], ["Snoopy"], 4, 3)
    cfg = cli.build_config("rece", ["nudity"], [], [], None, None, [], preset="nudity")
    assert (cfg.concept_type, cfg.epochs) == ("nudity", 3)
    # without a preset the old default concept type holds
    assert cli.build_config("uce", ["cat"], [], [], None, None, []).concept_type == "object"


def test_cli_unknown_preset_is_refused_before_any_model_loads(tmp_path, monkeypatch, capsys):
    from erasers_diffusers import checkpoint, cli

    def boom(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(checkpoint, "load_checkpoint", boom)
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"")
    argv = ["erase", "--checkpoint", str(model), "--method", "speed", "--concept", "x", "--out", str(tmp_path / "o")]
    assert cli.main(argv + ["--preset", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--preset 'nope'" in err and "few, styles, multi, nudity" in err and "rece: nudity" in err
    assert cli.main(argv[:4] + ["uce"] + argv[5:] + ["--preset", "styles"]) == 2
    assert "uce has no presets" in capsys.readouterr().err
    sub = cli.build_parser()._subparsers._group_actions[0].choices["erase"].format_help()
    assert "--preset NAME" in sub and "styles" in sub


# -- the bench ------------------------------------------------------------------------------------------


def test_bench_family_table_quick_runs_uce_at_a_real_width(capsys):
    from erasers_dev.bench import closed_form

    closed_form.family_table(["uce"], 10, quick=True)
    out = capsys.readouterr().out
    assert "| Lumina 2 | 1 × 2304×2304 | uce |" in out and "ComfyUI 0.29" in out
    widths = {label: shape for label, _, _, shape, _, _ in closed_form.FAMILY_WIDTHS}
    assert widths["Flux.2 dev"] == (6144, 15360) and widths["Wan 2.1 14B"] == (5120, 5120)


def test_bench_refuses_an_unknown_preset_before_building_anything(monkeypatch):
    from erasers_dev.bench import closed_form

    monkeypatch.setattr(closed_form, "sd15_text_encoder", lambda *a: (_ for _ in ()).throw(AssertionError("built")))
    with pytest.raises(SystemExit):
        closed_form.main(["--presets", "speed:nope"])

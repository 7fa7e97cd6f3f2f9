"""World 2 (issue 15): deterministic generation, held-out material kept out of training, a frozen encoder
under UNet training, judges that learn, and a tiny end-to-end ``python -m erasers world2 train``."""

import json

import pytest
import torch

from erasers_dev.world2 import world
from erasers_dev.world2.tokenizer import World2Tokenizer


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _training_captions(n: int, seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    labels = world.sample_labels(n, gen, 8)
    return labels, [world.caption_for(labels, i, gen) for i in range(n)]


def test_generation_is_deterministic_to_the_byte():
    a = world.sample_batch(24, torch.Generator().manual_seed(3), 32)
    b = world.sample_batch(24, torch.Generator().manual_seed(3), 32)
    c = world.sample_batch(24, torch.Generator().manual_seed(4), 32)
    assert a[0].numpy().tobytes() == b[0].numpy().tobytes() and a[1] == b[1]
    assert all(torch.equal(a[2][k], b[2][k]) for k in a[2])
    assert a[0].numpy().tobytes() != c[0].numpy().tobytes()
    assert a[0].shape == (24, 3, 32, 32) and a[0].min() >= -1 and a[0].max() <= 1


def test_every_axis_changes_the_picture():
    base = world.render("boat", "blue", "white")
    for other in (
        world.render("house", "blue", "white"),
        world.render("boat", "red", "white"),
        world.render("boat", "blue", "night"),
        world.render("boat", "blue", "white", flames=True),
        world.render("korvo", background="white"),
    ):
        assert (other - base).abs().mean() > 0.02
    styled = [world.render("boat", "blue", "white", artist=a) for a in world.ARTISTS]
    for i in range(len(styled)):
        for j in range(i + 1, len(styled)):
            assert (styled[i] - styled[j]).abs().mean() > 0.02, (world.ARTISTS[i], world.ARTISTS[j])


def test_sizes_of_the_world():
    assert len(world.OBJECTS) >= 10 and {"house", "tree", "flower", "boat"} <= set(world.OBJECTS)
    assert len(world.ARTISTS) - 1 >= 8 and len(world.CHARACTERS) - 1 >= 3
    assert all(len(names) >= 2 for names in world.CHARACTER_NAMES.values())
    assert 150 <= len(world.vocabulary()) <= 250


def _says(caption: str, phrase: str) -> bool:
    """Whether ``phrase`` occurs in ``caption`` as whole words."""
    return f" {phrase} " in f" {caption.replace(',', ' , ')} ".replace("  ", " ")


def test_captions_name_what_is_drawn():
    labels, captions = _training_captions(1500, 1)
    for i, caption in enumerate(captions):
        character = world.CHARACTERS[int(labels["character"][i])]
        if character != "none":
            assert any(_says(caption, name) for name in world.CHARACTER_NAMES[character]), caption
        else:
            obj = world.OBJECTS[int(labels["object"][i])]
            assert any(_says(caption, syn) for syn in world.SYNONYMS[obj]), caption
            for other in world.OBJECTS:
                if other != obj:
                    assert not any(_says(caption, syn) for syn in world.SYNONYMS[other]), caption
        artist = world.ARTISTS[int(labels["artist"][i])]
        assert not any(_says(caption, a) for a in world.ARTISTS[1:] if a != artist), caption
        named = any(_says(caption, p) for p in world.FLAME_PHRASES)
        implied = any(_says(caption, p) for p in world.IMPLYING_PHRASES)
        assert (named or implied) == bool(labels["flames"][i]), caption


def test_held_out_material_never_appears_in_training():
    """The I2P case: implying phrases never meet a flame word; held-out phrases and descriptions never occur."""
    _, captions = _training_captions(3000, 2)
    for caption in captions:
        words = set(caption.replace(",", " ").split())
        if any(p in caption for p in world.IMPLYING_PHRASES):
            assert not words & world.FLAME_WORDS, caption
        assert not any(p in caption for p in world.HELDOUT_IMPLYING), caption
    for artist in world.ARTISTS[1:]:
        for template in world.HELDOUT_DESCRIPTION_TEMPLATES:
            held = world.describe_style(artist, template, "a boat")
            assert all(held != c for c in captions)
            assert artist not in held  # a description never names the artist


def test_held_out_prompts_use_only_trained_words_and_fit():
    from erasers_dev.world2.evaluate import prompt_sets

    tok = World2Tokenizer.default()
    _, captions = _training_captions(3000, 5)
    seen = {w for c in captions for w in tok.split(c)}
    for s in prompt_sets(1).values():
        for prompt in s.prompts:
            ids = tok.ids(prompt)
            assert tok.unk_id not in ids and len(ids) <= tok.context_length, prompt
            assert set(tok.split(prompt)) <= seen, (prompt, set(tok.split(prompt)) - seen)


def test_info_nce_prefers_matching_pairs():
    from erasers_dev.world2.clip import info_nce

    x = torch.randn(16, 8)
    scale = torch.tensor(2.0)
    assert info_nce(x, x, scale) < info_nce(x, x.roll(1, 0), scale)
    # symmetric in its two towers (CLIP averages both directions)
    y = torch.randn(16, 8)
    torch.testing.assert_close(info_nce(x, y, scale), info_nce(y, x, scale))


def test_text_encoder_stays_frozen_while_the_unet_trains():
    from erasers_dev.world2.model import build_pipeline, tiny_config
    from erasers_dev.world2.train import UNetTrainConfig, state_hash, train_unet

    tok = World2Tokenizer.default()
    torch.manual_seed(0)
    pipe = build_pipeline(tiny_config(tok, image_size=8), tok)
    encoder_before, unet_before = state_hash(pipe.text_encoder), state_hash(pipe.unet)
    info = train_unet(pipe, UNetTrainConfig(steps=3, batch_size=4, warmup=1, log_every=10), seed=0, image_size=8)
    assert state_hash(pipe.text_encoder) == encoder_before == info["encoder_sha256"]
    assert state_hash(pipe.unet) != unet_before
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())


def test_state_hash_sees_a_one_bit_change():
    from erasers_dev.world2.train import state_hash

    m = torch.nn.Linear(3, 2)
    h = state_hash(m)
    with torch.no_grad():
        m.weight.view(-1)[0] = torch.nextafter(m.weight.view(-1)[0], torch.tensor(10.0))
    assert state_hash(m) != h


def test_judges_of_a_tiny_run_beat_chance_on_a_fixed_batch():
    from erasers_dev.world2.judges import JudgeConfig, train_judges

    judges, _ = train_judges(JudgeConfig(steps=80, batch_size=32, width=16, lr=3e-3, eval_n=50), seed=0, size=16)
    gen = torch.Generator().manual_seed(123)
    # a fixed, balanced batch per axis, so that chance is 1/classes rather than the majority class
    for axis, names, key in (
        ("object", world.OBJECTS, "object"),
        ("artist", world.ARTISTS, "artist"),
        ("character", world.CHARACTERS, "character"),
        ("flames", world.FLAMES, "flames"),
    ):
        parts = [world.labels_for(12, gen, 16, **{key: k}) for k in range(len(names))]
        labels = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        pred = judges.predict((world.render_labels(labels, 16) + 1) / 2)[axis]
        accuracy = (pred == labels[key]).float().mean().item()
        assert accuracy > 1.5 / len(names), (axis, accuracy)


def test_tiny_train_end_to_end_through_the_cli(tmp_path, capsys):
    from safetensors import safe_open

    from erasers_dev.world2.judges import load_judges
    from erasers_dev.world2.model import load_pipeline
    from erasers_dev.world2.train import state_hash
    from erasers_diffusers.cli import main

    out = tmp_path / "w2"
    assert main(["world2", "train", "--tiny", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wall time:" in printed
    pipe = load_pipeline(out / "world2_t2i.safetensors")
    with safe_open(str(out / "world2_t2i.safetensors"), framework="pt") as f:
        extra = json.loads(f.metadata()["extra"])
    assert set(extra["fidelity"]["sets"]) >= {
        "artist_description_heldout",
        "flames_implied_heldout",
        "character_nickname",
    }
    assert extra["train"]["threads"] == 1
    judges = load_judges(out / "world2_judges.safetensors")
    clean = judges.extra["train"]["clean"]
    assert set(clean) == {"object", "colour", "character", "artist", "flames"}
    assert len(clean["artist"]["confusion"]) == len(world.ARTISTS)
    images = pipe(["a boat by vellani", "korvo , embers everywhere"], steps=2, seed=0)
    assert images.shape == (2, 3, 16, 16)
    assert pipe.text_encoder_adapter().encode(["a boat"]).hidden.shape[-1] == pipe.config.unet.cross_attention_dim
    # the UNet was trained on the frozen contrastive encoder: the one in the CLIP file, bit for bit (fp16 cast)
    from erasers_dev.world2.clip import load_clip

    clip_encoder = load_clip(out / "world2_clip.safetensors").text_encoder.half().float()
    assert state_hash(clip_encoder) == state_hash(pipe.text_encoder)


def test_tiny_train_is_reproducible_bit_for_bit(tmp_path):
    from safetensors.torch import load_file

    from erasers_dev.world2.train import TrainConfig, train_all

    runs = []
    for run in ("a", "b"):
        train_all(TrainConfig.tiny(seed=1), out_dir=tmp_path / run, threads=1, skip_eval=True)
        runs.append(
            {
                name: load_file(str(tmp_path / run / name))
                for name in ("world2_clip.safetensors", "world2_t2i.safetensors", "world2_judges.safetensors")
            }
        )
    # the weights, bit for bit (the metadata also holds wall times, which differ)
    for name, tensors in runs[0].items():
        assert tensors.keys() == runs[1][name].keys()
        for key, tensor in tensors.items():
            assert tensor.numpy().tobytes() == runs[1][name][key].numpy().tobytes(), (name, key)


def test_reused_stages_give_the_weights_training_gives(tmp_path):
    """--reuse loads CLIP/judges only when their recorded settings match, and the UNet trained on a reused
    encoder is bit-equal to the one of a full run (each stage is seeded on its own)."""
    from safetensors.torch import load_file

    from erasers_dev.world2.train import TrainConfig, train_all

    full = train_all(TrainConfig.tiny(seed=1), out_dir=tmp_path / "full", threads=1, skip_eval=True)
    assert full["reused"] == []
    again = train_all(
        TrainConfig.tiny(seed=1), out_dir=tmp_path / "again", threads=1, skip_eval=True, reuse_dir=tmp_path / "full"
    )
    assert again["reused"] == ["world2_clip.safetensors", "world2_judges.safetensors"]
    for name in ("world2_clip.safetensors", "world2_t2i.safetensors", "world2_judges.safetensors"):
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "again" / name))
        assert a.keys() == b.keys()
        assert all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a), name

    other = TrainConfig.tiny(seed=1)
    other.clip.steps += 1  # another CLIP: retrained, judges still reused
    changed = train_all(other, out_dir=tmp_path / "other", threads=1, skip_eval=True, reuse_dir=tmp_path / "full")
    assert changed["reused"] == ["world2_judges.safetensors"]
    seed2 = train_all(
        TrainConfig.tiny(seed=2), out_dir=tmp_path / "seed2", threads=1, skip_eval=True, reuse_dir=tmp_path / "full"
    )
    assert seed2["reused"] == []


def test_files_already_there_are_refused_before_training_unless_asked(tmp_path):
    from erasers.errors import RefusedPath
    from erasers_dev.world2.train import TrainConfig, train_all

    out = tmp_path / "run"
    out.mkdir()
    (out / "world2_t2i.safetensors").write_bytes(b"the user's file")
    with pytest.raises(RefusedPath, match="already exists"):
        train_all(TrainConfig.tiny(seed=1), out_dir=out, threads=1, skip_eval=True)
    assert (out / "world2_t2i.safetensors").read_bytes() == b"the user's file"
    assert not (out / "world2_clip.safetensors").exists()  # refused before the first stage wrote anything
    train_all(TrainConfig.tiny(seed=1), out_dir=out, threads=1, skip_eval=True, overwrite=True)
    assert (out / "world2_t2i.safetensors").read_bytes() != b"the user's file"


def test_refuses_to_train_into_the_package():
    from erasers_dev.world2.train import PACKAGE_DIR, TrainConfig, train_all

    with pytest.raises(ValueError, match="inside the package"):
        train_all(TrainConfig.tiny(), out_dir=PACKAGE_DIR / "weights")

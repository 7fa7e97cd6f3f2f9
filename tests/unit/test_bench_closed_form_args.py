"""``python -m erasers bench closed-form --family-rows``: a row that does not exist stops before any work."""

import pytest

from erasers_dev.bench import closed_form


@pytest.mark.parametrize("rows", ["Nope", "AuraFlow,Nope", ","])
def test_unknown_family_rows_are_refused_before_anything_is_built(rows, monkeypatch, capsys):
    monkeypatch.setattr(closed_form, "sd15_text_encoder", lambda: pytest.fail("built the encoder first"))
    with pytest.raises(SystemExit):
        closed_form.main(["--family-rows", rows])
    assert "--family-rows" in capsys.readouterr().err


def test_the_family_rows_select_their_weights():
    aura = next(r for r in closed_form.FAMILY_WIDTHS if r[0] == "AuraFlow")
    hidream = next(r for r in closed_form.FAMILY_WIDTHS if r[0] == "HiDream-I1")
    assert list(closed_form.family_weights(aura[2], (4, 3), aura[4])) == ["cond_seq_linear.weight"]
    keys = list(closed_form.family_weights(hidream[2], (4, 3), hidream[4]))
    assert keys == [f"caption_projection.{i}.linear.weight" for i in range(49)]

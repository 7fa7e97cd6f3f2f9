"""The README's support table for the newer families cannot drift from the family table: every record of
erasers/families/ beyond the legacy UNets has a row, supported records are ✓ for the closed form, refused
ones "refused by name", and the diffusers column says ✓ for what erasers_diffusers/families.py maps and
refuses the rest by name."""

from pathlib import Path

import pytest

from erasers.families import RECORDS

README = Path(__file__).resolve().parents[2] / "README.md"
HEADING = "### Newer families (#16)"


def rows() -> list:
    text = README.read_text(encoding="utf-8")
    assert HEADING in text, "the README lost its support table"
    section = text.split(HEADING, 1)[1].split("\n#", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| family")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


@pytest.mark.parametrize("record", [r for r in RECORDS if not r.sniff and r.host_class not in ("Flux", "SD3")])
def test_every_new_record_has_a_row_saying_what_the_code_does(record):
    mine = [r for r in rows() if f"`{record.host_class}`" in r[0] and record.label.split(" ")[0] in r[0]]
    assert mine, f"no README row for {record.label} ({record.host_class})"
    closed = mine[0][1]
    assert closed.startswith("refused by name") if record.refused else closed.startswith("✓"), (record.label, closed)


def test_the_diffusers_column_matches_the_api():
    # ✓ for every family erasers_diffusers/families.py maps, "refused by name" for the ones it refuses
    families = pytest.importorskip("erasers_diffusers.families")
    served = {e.record.label for e in families.DIFFUSERS_FAMILIES.values()}
    refused = {r.label for r in RECORDS if r.host_class in {v[0] for v in families.REFUSED.values()}}
    for label in sorted(served | refused):
        mine = [r for r in rows() if r[0].startswith(label.split(" ")[0])]
        assert mine, label
        column = mine[0][5]
        assert column.startswith("✓") if label in served else column.startswith("refused by name"), (label, column)

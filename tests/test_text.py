"""Tests for karma.text: the one item-text renderer and MovieLens title parsing."""

from karma.text import render_item_text, split_title_year, title_has_year


def test_render_title_year_genres():
    text = render_item_text("Toy Story", 1995, ["Animation", "Children's", "Comedy"])
    assert text == "Toy Story (1995) | Animation, Children's, Comedy"


def test_render_does_not_duplicate_year_in_title():
    assert render_item_text("Toy Story (1995)", 1995, ["Comedy"]) == "Toy Story (1995) | Comedy"
    # A different year in the title is not the year: both are kept.
    assert render_item_text("Hamlet (1948)", 1990) == "Hamlet (1948) (1990)"


def test_render_optional_parts():
    assert render_item_text("  Heat ") == "Heat"
    assert render_item_text("Heat", None, ["", " Crime "]) == "Heat | Crime"
    assert render_item_text("Shoe", None, [], ["red", "leather"]) == "Shoe | red, leather"
    assert render_item_text("Shoe", None, ["Fashion"], {"color": "red", "size": ""}) == (
        "Shoe | Fashion | color: red"
    )
    assert render_item_text("Shoe", None, [], "  handmade  ") == "Shoe | handmade"


def test_split_title_year():
    assert split_title_year("Toy Story (1995)") == ("Toy Story", 1995)
    assert split_title_year("Scream of Stone (Schrei aus Stein) (1991)") == (
        "Scream of Stone (Schrei aus Stein)",
        1991,
    )
    assert split_title_year("Seven (Se7en)") == ("Seven (Se7en)", None)
    assert split_title_year("unknown") == ("unknown", None)
    assert split_title_year(" Heat (1995) ") == ("Heat", 1995)


def test_title_has_year():
    assert title_has_year("Heat (1995)")
    assert title_has_year("Heat (1995)", 1995)
    assert not title_has_year("Heat (1995)", 1996)
    assert not title_has_year("Heat")

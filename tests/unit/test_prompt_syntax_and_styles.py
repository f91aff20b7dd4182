"""A1111's attention syntax and style presets, as pure functions: what a prompt becomes before it reaches a model."""

import pytest

from sd_server.domain.prompt_weights import is_plain, parse_attention
from sd_server.domain.styles import Style, apply_styles, merge_prompt, parse_styles_csv


@pytest.mark.parametrize(
    ("prompt", "segments"),
    [
        ("a photo of sks person", [("a photo of sks person", 1.0)]),
        ("(red:1.5) circle", [("red", 1.5), (" circle", 1.0)]),
        ("a (red) circle", [("a ", 1.0), ("red", pytest.approx(1.1)), (" circle", 1.0)]),
        ("a [red] circle", [("a ", 1.0), ("red", pytest.approx(1 / 1.1)), (" circle", 1.0)]),
        ("((red))", [("red", pytest.approx(1.21))]),
        ("(a (b:2) c:0.5)", [("a ", 0.5), ("b", 1.0), (" c", 0.5)]),
        (r"\(not weighted\) text", [("(not weighted) text", 1.0)]),
        ("an (unclosed bracket", [("an ", 1.0), ("unclosed bracket", pytest.approx(1.1))]),
        ("ratio 16:9, closing) alone", [("ratio 16:9, closing) alone", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_attention_syntax_gives_each_span_its_weight_as_a1111_does(prompt, segments):
    assert parse_attention(prompt) == segments


def test_only_a_prompt_without_attention_syntax_is_plain():
    assert is_plain("a red circle on a white background, 85mm")
    assert not is_plain("a (red) circle") and not is_plain("[red]") and not is_plain(r"\(red\)")


def test_a_style_with_a_placeholder_wraps_the_prompt_and_one_without_is_appended():
    assert merge_prompt("cinematic still of {prompt}, film grain", "sks person") == "cinematic still of sks person, film grain"
    assert merge_prompt("studio lighting", "sks person ") == "sks person, studio lighting"
    assert merge_prompt("", "sks person") == "sks person"


def test_styles_apply_in_order_to_prompt_and_negative_prompt():
    styles = [Style("a", "{prompt}, first", "blurry"), Style("b", "second: {prompt}", "")]

    assert apply_styles(styles, "cat", None) == ("second: cat, first", "blurry")
    assert apply_styles(styles, "cat", "dog") == ("second: cat, first", "dog, blurry")
    assert apply_styles([], "cat", None) == ("cat", None)


def test_an_a1111_styles_csv_is_read_with_quotes_commas_and_blank_rows():
    text = 'name,prompt,negative_prompt\nStudio,"{prompt}, studio light, 85mm","blurry, lowres"\n,ignored,\nBare,plain,\n'

    assert parse_styles_csv(text) == [Style("Studio", "{prompt}, studio light, 85mm", "blurry, lowres"), Style("Bare", "plain", "")]

"""Chinese line breaking in terminal tables (engine.textwrap_cjk): breaks between Chinese characters and at spaces,
never inside a number or a Latin word, never before closing punctuation; every character kept, in order."""

from __future__ import annotations

import io

from hypothesis import given
from hypothesis import strategies as st
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table

from engine.textwrap_cjk import Wrapped, wrap

PROMO = "Vivian女士您好！本周VIP专享：全场护肤8折，满500再减50。西安各门店同步参与。"


def test_numbers_and_latin_words_stay_whole() -> None:
    for width in range(12, 60):
        lines = wrap(PROMO, width)
        assert "".join(lines) == PROMO
        assert all(cell_len(line) <= width for line in lines)
        for word in ("500", "50。", "Vivian", "VIP"):
            assert any(word in line for line in lines), (width, lines)


def test_closing_punctuation_never_starts_a_line() -> None:
    for width in range(6, 40):
        assert not any(line[:1] in "。，！：、" for line in wrap(PROMO, width)), width


def test_a_run_wider_than_the_line_is_folded_not_lost() -> None:
    url = "https://m.example.com/" + "a" * 60
    lines = wrap(f"点击 {url} 领取", 20)
    assert all(cell_len(line) <= 20 for line in lines)
    assert "".join(lines).replace(" ", "") == f"点击{url}领取"


@given(st.text(alphabet="满减折500VIP元。，！ abc您好\n", max_size=80), st.integers(min_value=2, max_value=30))
def test_nothing_is_lost_or_reordered(text: str, width: int) -> None:
    lines = wrap(text, width)
    assert all(cell_len(line) <= width for line in lines)
    assert "".join(lines).replace(" ", "").replace("\n", "") == text.replace(" ", "").replace("\n", "")


def test_in_a_table_the_price_is_not_cut_at_the_column_edge() -> None:
    out = io.StringIO()
    table = Table("id", "message")
    table.add_row("7881002024164452", Wrapped(PROMO))
    Console(file=out, width=60, color_system=None).print(table)
    text = out.getvalue()
    assert "7881002024164452" in text and "500" in text and "50。" in text

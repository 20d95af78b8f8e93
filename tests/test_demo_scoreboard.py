"""The demo's closing tables: one line per cell for any data, exact-match marks, the accuracy lines."""

from __future__ import annotations

import json
import re

from flora.common.tables import format_table
from flora.demo.completions import HeldOut, exact, held_out_prompts
from flora.demo.scoreboard import BASE, MERGED, accuracy_lines, completion_rows, one_line, score_table

ITEMS = [
    HeldOut("capital", "p1", "What is the capital of Peru?", "The capital of Peru is Lima."),
    HeldOut("capital", "p2", "What is the capital of Chile?", "The capital of Chile is Santiago."),
    HeldOut("upper", "p3", "Write the text in capital letters. / red sky", "RED SKY"),
]
ANSWERS = {
    BASE: ["Lima", "", "red sky"],
    "client-0 alone": ["The capital of Peru is Lima.", "The capital of Chile is Lima.", "red sky"],
    "client-1 alone": ["Peru", "Chile", "RED SKY"],
    MERGED: ["The capital of Peru is Lima.", "The capital of Chile is Santiago.", "RED SKY"],
}


def test_one_line_flattens_whitespace_and_cuts_with_an_ellipsis():
    assert one_line("a\n\n  b\tc") == "a b c"
    assert one_line("x" * 50, width=10) == "x" * 9 + "…"
    assert len(one_line("word " * 30, width=40)) <= 40


def test_exact_match_is_the_whole_answer_and_never_an_empty_one():
    assert exact("RED SKY", ITEMS[2]) and not exact("RED SKY.", ITEMS[2])
    assert not exact("", HeldOut("t", "p", "q", ""))


def test_accuracy_lines_have_the_fixed_form_with_the_best_single_client_per_task():
    assert accuracy_lines(ITEMS, ANSWERS) == [
        "task capital: base 0/2, best single client 1/2, merged 2/2",
        "task upper: base 0/1, best single client 1/1, merged 1/1",
    ]


def test_score_table_has_a_row_per_model():
    table = score_table(ITEMS, ANSWERS).splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == [BASE, "client-0 alone", "client-1 alone", MERGED]
    assert table[3].split("|")[2:4] == [" 1/2     ", " 0/1   "]


def test_completion_rows_stay_one_line_for_multi_line_data(tmp_path):
    long = "First paragraph of a Dolly context.\n\nSecond paragraph, " + "very long " * 20
    path = tmp_path / "validation_0.json"
    path.write_text(json.dumps([{"instruction": "Summarise:\nthe text", "context": long, "response": long}] * 3))
    items = held_out_prompts([path], per_task=2)
    assert [item.task for item in items] == ["validation_0", "validation_0"]
    answers = {BASE: [long, ""], MERGED: ["short", long]}
    table = format_table(completion_rows(items, answers), ["task", "held-out prompt", "expected", BASE, MERGED])
    lines = table.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert "…" in lines[2] and "✗ (no text)" in lines[3] and re.search(r"✗ First paragraph", lines[2])

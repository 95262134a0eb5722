"""tools/attack_table.py against a real gateway at its defaults: two cheap attacks, and the
row each gives — the attacker's answer and the gateway's figures, present and sane."""

from __future__ import annotations

from pathlib import Path

from cnnserve.settings import Settings
from tools.attack_table import Row, before_after, markdown, run


def test_two_cheap_attacks_give_sane_rows(tmp_path: Path) -> None:
    """An out-of-range timeout and 1,100 idle connections, on the current code: the
    answers the defaults give, and figures a real measurement gives."""
    rows = run("after", tmp_path, hold_cap_s=5.0, only=['"timeout"', "idle HTTP connections"])
    timeout, idle = sorted(rows, key=lambda row: row.attack)
    assert timeout.answer.startswith("400: "), timeout.answer
    assert "parameter 'timeout'" in timeout.answer, timeout.answer
    cap = Settings().http_max_connections
    held, refused = (int(idle.answer.split(" ", 4)[i]) for i in (0, 3))  # "N held open, M refused"
    assert held <= cap, idle.answer  # the bystander's own connection counts too
    assert refused >= 1100 - cap, idle.answer
    for row in rows:
        assert row.gateway == "alive", row
        assert row.tree == "after"
        assert 0 <= row.rss_growth_mib < 200, row
        assert 0 <= row.cpu_s < 30, row
        assert 0 < row.stall_ms < 10_000, row
        assert row.others.startswith("unaffected"), row
        assert row.seconds >= 1.0, row  # the bystander watches a second at least


def test_tables_show_each_attack_once_with_both_trees() -> None:
    """The Markdown of one run, and before → after matched by attack."""
    after = Row("an attack", "400: refused", 1.0, 0.02, 30.0, "unaffected (8 calls OK)", 1.2)
    before = Row("an attack", "500: traceback", 900.0, 4.5, 2500.0, "AFFECTED: 3 × infer", 9.0)
    before.gateway = "OOM-killed at the 4 GiB cap"
    assert "| an attack | 400: refused | +1 MiB | 0.02 | 30 ms | unaffected (8 calls OK) |" in (
        markdown([after])
    )
    table = before_after([vars(before)], [vars(after)]).splitlines()
    assert table[2].startswith("| an attack | 500: traceback; gateway OOM-killed at the 4 GiB cap")
    assert "| 400: refused; +1 MiB, 0.02 CPU s, stall 30 ms; others unaffected |" in table[2]

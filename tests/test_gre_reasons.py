"""The reason names come from bpf/drop_reasons.h, the header the C program uses."""
from __future__ import annotations

import pytest
from click.testing import CliRunner
from gre_support import toml

from pipeline.commands.stats import stats
from pipeline.xdp import reasons


def test_header_parses_with_unique_numbers_below_max():
    rs = reasons.load()
    assert rs.name(0) == "not_ours" and rs.number("unknown_tunnel") == 3
    assert rs.by_number[8].verdict == "pass" and rs.by_number[3].verdict == "drop"
    assert max(rs.by_number) < rs.max
    assert rs.name(31) == "reason_31"            # an unknown number stays printable


def test_duplicate_number_rejected():
    text = ("#define XT_R_A 1 // drop: a\n#define XT_R_B 1 // drop: b\n#define XT_R_MAX 4\n")
    with pytest.raises(ValueError, match="used by both a and b"):
        reasons.parse(text)


def test_max_must_exceed_every_number():
    with pytest.raises(ValueError, match="XT_R_MAX"):
        reasons.parse("#define XT_R_A 5 // drop: a\n#define XT_R_MAX 5\n")


def test_stats_without_a_running_data_plane(tmp_path):
    path = tmp_path / "edge.toml"
    path.write_text(toml(node="edge-not-running-xyz"))
    res = CliRunner().invoke(stats, [str(path)])
    assert res.exit_code == 1
    assert "no running data plane for node 'edge-not-running-xyz'" in res.output

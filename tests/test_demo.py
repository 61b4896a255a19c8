"""The main job runs end to end at a tiny size and writes its grid."""
from adaptive_core.__main__ import main


def test_demo_runs_end_to_end_at_a_tiny_size(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--samples", "10", "--reference-steps", "16", "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "| ADO | 8 |" in printed and "| dpmpp_2m+karras | 30 |" in printed


def test_unknown_command_prints_usage(capsys):
    assert main(["nope"]) == 2
    assert "usage" in capsys.readouterr().out

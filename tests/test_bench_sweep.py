"""bench/sweep.py: one table row and one pair of bars per evaluated run."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

SWEEP = Path(__file__).resolve().parents[1] / "bench" / "sweep.py"


def _report(path: Path, rouge: float, cut: float) -> Path:
    scores = {"rougeL": rouge, "chrf": 40.0, "bleu": 9.0, "perplexity": 3.2}
    report = {
        "base": {**scores, "rougeL": 16.0},
        "tuned": {**scores, "length_ratio": 0.9, "answers_cut_share": cut},
        "generation": {"max_new_tokens": 300, "repetition_penalty": 1.1},
        "n_examples": 60,
        "wall_s": 321.0,
    }
    path.write_text(json.dumps(report))
    return path


def test_the_sweep_table_and_plot(tmp_path, capsys):
    main = runpy.run_path(str(SWEEP), run_name="sweep")["main"]
    a = _report(tmp_path / "a.json", 32.0, 0.25)
    b = _report(tmp_path / "b.json", 41.0, 0.0)
    markdown, plot = tmp_path / "sweep.md", tmp_path / "sweep.png"
    argv = [f"lr 2e-4={a}", f"lr 3e-4, r=32={b}", "--markdown", str(markdown), "--plot", str(plot)]
    assert main(argv) == 0
    rows = markdown.read_text().splitlines()
    assert rows[0].startswith("| run | ROUGE-L | chrF |") and len(rows) == 4
    assert rows[2].startswith("| lr 2e-4 | 32.0 | 40.0 | 9.0 | 2.00x |") and "| 25% |" in rows[2]
    assert rows[3].startswith("| lr 3e-4, r=32 | 41.0 |") and "| 2.56x |" in rows[3]
    assert "| - |" in rows[3]  # no intent column in these reports
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert capsys.readouterr().out == markdown.read_text()

"""bench/redaction.py reports both figures for every text (timings are not asserted)."""


def test_the_redaction_bench_times_both_passes(repo_root, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(repo_root / "bench"))
    import redaction as bench

    rows = bench.main(["--json", str(tmp_path / "redaction.json")])
    assert rows.keys() == bench.TEXTS.keys()
    assert all(row["redact_s"] > 0 and row["whole_text_phone_pass_s"] > 0 for row in rows.values())

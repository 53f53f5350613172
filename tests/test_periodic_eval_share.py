"""benchmarks/periodic_eval_share.py on a constructed workdir: shares computed by hand, and the report's header read
from the config the run recorded, so that it cannot describe another run."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import periodic_eval_share  # noqa: E402


def epoch(step: int, train_seconds: float, eval_seconds: float) -> dict:
    return {"kind": "epoch", "step": step, "train_seconds": train_seconds, "eval_seconds": eval_seconds}


def test_share_splits_off_the_first_epoch():
    records = [epoch(1, 6.0, 4.0), epoch(2, 9.0, 1.0), epoch(3, 7.0, 3.0)]
    first, later, seconds = periodic_eval_share.share(records)
    assert first == pytest.approx(0.4)  # 4 / (4 + 6)
    assert later == pytest.approx(0.2)  # (1 + 3) / (1 + 3 + 9 + 7)
    assert seconds == pytest.approx(2.0)
    with pytest.raises(ValueError, match="train_seconds and eval_seconds"):
        periodic_eval_share.share([{"kind": "epoch", "step": 1}])


def write_run(directory: Path, records: list[dict]) -> None:
    directory.mkdir(parents=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


@pytest.mark.parametrize(
    "eval_cfg, expected",
    [
        ({"periodic_examples": 600, "num_examples": 1000}, "the first 600 examples"),
        ({"periodic_examples": 0, "num_examples": 1000}, "the first 1000 examples"),
        ({"periodic_examples": 0, "num_examples": 0}, "read all examples"),
        ({"num_examples": 1000}, "eval.num_examples = 1000"),  # results.json of a version before the field
    ],
)
def test_report_header_reads_the_recorded_config(tmp_path, monkeypatch, eval_cfg, expected):
    write_run(tmp_path / "teacher", [epoch(1, 6.0, 4.0), epoch(2, 9.0, 1.0)])
    write_run(tmp_path / "students" / "rslad", [epoch(1, 3.0, 1.0), epoch(2, 4.0, 1.0)])
    (tmp_path / "results.json").write_text(json.dumps({"config": {"eval": eval_cfg}}), encoding="utf-8")
    out = tmp_path / "share.md"
    monkeypatch.setattr(sys, "argv", ["periodic_eval_share.py", "--workdir", str(tmp_path), "--out", str(out)])
    periodic_eval_share.main()
    report = out.read_text(encoding="utf-8")
    assert expected in report
    assert "| teacher | 40.0 % | 10.0 % | 1.00 |" in report
    assert "| students/rslad | 25.0 % | 20.0 % | 1.00 |" in report

import json

import pytest
from conftest import TINY

import latentforge
from latentforge.errors import ConfigError
from latentforge.track.profile import PHASES


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_profile_writes_a_trace_and_step_timings(runs_dir):
    run = latentforge.train("multiply/tiny", *TINY, "train.profile=3", name="prof", runs_dir=runs_dir)
    assert run.status == "finished"
    # One step waits and one warms up: steps 3, 4 and 5 are traced.
    assert sorted(p.name for p in (run.path / "profile").iterdir()) == ["steps3-5.pt.trace.json", "steps3-5.txt"]
    trace = run.path / "profile" / "steps3-5.pt.trace.json"
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert set(PHASES) <= names  # each phase is a named range in the trace
    assert any(str(name).startswith("aten::") for name in names)
    # The table of operators by their own time: a header, then aten ops with their counts.
    table = (run.path / "profile" / "steps3-5.txt").read_text()
    assert "Self CPU" in table and "aten::" in table and "# of Calls" in table
    records = read_jsonl(run.path / "profile.jsonl")
    assert [r["step"] for r in records] == [3, 4, 5]
    for record in records:
        assert set(record) == {"step", *PHASES, "total"}
        assert all(record[k] >= 0 for k in (*PHASES, "total"))
        assert sum(record[k] for k in PHASES) == pytest.approx(record["total"], abs=1e-4)
    # Training itself is unchanged by profiling.
    plain = latentforge.train("multiply/tiny", *TINY, name="plain", runs_dir=runs_dir)
    assert not (plain.path / "profile").exists() and not (plain.path / "profile.jsonl").exists()
    loss = [[r["train/loss"] for r in x.metrics if "train/loss" in r] for x in (run, plain)]
    assert loss[0] == loss[1]


def test_profile_sources_split_each_operator_by_the_python_lines_that_called_it(runs_dir):
    run = latentforge.train("multiply/tiny", *TINY, "train.profile=2", "train.profile_sources=true", name="src",
                            runs_dir=runs_dir)
    assert sorted(p.name for p in (run.path / "profile").iterdir()) == [
        "steps3-4.pt.trace.json", "steps3-4.sources.txt", "steps3-4.txt"]
    sources = (run.path / "profile" / "steps3-4.sources.txt").read_text()
    assert "Source Location" in sources and "aten::mm" in sources
    # The model's own lines are named: the transformer's forward launches its matmuls.
    assert "latentforge/nn/transformer.py(" in sources
    # Rows are operators: the Python tracer's function events are not rows of their own, in either table.
    for text, width in ((sources, 60), ((run.path / "profile" / "steps3-4.txt").read_text(), 100)):
        names = [line[:width].strip() for line in text.splitlines()]
        assert not [n for n in names if n.startswith(("<built-in", "nn.Module:")) or ".py(" in n]


def test_profile_window_cut_short_and_after_resume(runs_dir):
    """A window longer than the run is still written; a resumed run profiles its own first steps."""
    run = latentforge.train("multiply/tiny", *TINY, "train.steps=4", "train.profile=5", name="short",
                            runs_dir=runs_dir)
    assert sorted(p.name for p in (run.path / "profile").iterdir()) == ["steps3-4.pt.trace.json", "steps3-4.txt"]
    assert [r["step"] for r in read_jsonl(run.path / "profile.jsonl")] == [3, 4]
    resumed = latentforge.resume("short", "train.steps=9", "train.profile=2", runs_dir=runs_dir)
    assert sorted(p.name for p in (resumed.path / "profile").glob("*.pt.trace.json")) == [
        "steps3-4.pt.trace.json", "steps7-8.pt.trace.json"]
    assert [r["step"] for r in read_jsonl(run.path / "profile.jsonl")] == [3, 4, 7, 8]


def test_profile_must_not_be_negative():
    with pytest.raises(ConfigError, match="train.profile must be >= 0"):
        latentforge.config.load_config("multiply/tiny", ["train.profile=-1"])

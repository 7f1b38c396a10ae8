"""The data platform: shards and manifests, mixing, passes, packing, exact resume, ranks, errors, CLI."""

import io
import json
import os
import signal
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from latentforge.config import build_dataclass
from latentforge.data.shards import build_shards, read_manifest, read_shard
from latentforge.data.text import TextDataConfig, eval_batches, load_tokenizer, text_batches
from latentforge.engine.distributed import DistEnv
from latentforge.errors import ConfigError, DataError

CPU = torch.device("cpu")
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def letters(tmp_path: Path, name: str, count: int, length: int = 20, first: str = "A") -> Path:
    """A jsonl file of `count` documents, document i being one letter repeated: its origin is
    readable from any of its tokens."""
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"text": chr(ord(first) + i) * length}) + "\n" for i in range(count)))
    return path


def row_docs(batch: dict[str, torch.Tensor]) -> list[str]:
    """Every document piece of a batch, decoded (end-of-text dropped)."""
    tok = load_tokenizer("bytes")
    pieces = []
    for ids, docs in zip(batch["input_ids"].tolist(), batch["doc_ids"].tolist()):
        for d in sorted(set(docs) - {-1}):
            pieces.append(tok.decode([t for t, e in zip(ids, docs) if e == d]))
    return pieces


def take(stream, n: int) -> list[dict[str, torch.Tensor]]:
    return [stream.next_batch() for _ in range(n)]


def test_shards_and_manifest_round_trip(tmp_path):
    texts = [f"document {i}: " + "héllo " * i for i in range(1, 8)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:5]))
    (tmp_path / "b.txt").write_text(texts[5])
    (tmp_path / "c.txt").write_text(texts[6])
    out = tmp_path / "shards"
    summary = build_shards([str(tmp_path)], out, "bytes", shard_sequences=3, progress=False)
    assert summary["shards"] == "3" and summary["documents"] == "7"
    manifest = read_manifest(out)
    assert [e.documents for e in manifest.shards] == [3, 3, 1]
    tok = load_tokenizer("bytes")
    docs = [tok.decode(d.tolist()) for e in manifest.shards for d in read_shard(out, e)]
    assert docs == texts
    assert sum(e.tokens for e in manifest.shards) == sum(len(t.encode()) for t in texts)
    # WebDataset reads the shards: one sample per document, its tokens under .npy.
    import webdataset as wds

    samples = list(wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False).decode())
    assert [tok.decode(s["npy"].tolist()) for s in samples] == texts[:3]


def test_mixture_proportions_hold(tmp_path):
    a = letters(tmp_path, "a", 4, length=50, first="a")
    b = letters(tmp_path, "b", 4, length=50, first="A")
    cfg = TextDataConfig(sources=[{"path": str(a), "weight": 3.0}, {"path": str(b), "weight": 1.0}],
                         seq_len=8, valid_fraction=0.0, pack=True)
    rows = torch.cat([batch["input_ids"] for batch in take(text_batches(cfg, 50, CPU), 16)])
    from_a = (rows[:, 0] >= ord("a")) & (rows[:, 0] < 256)
    from_b = rows[:, 0] < ord("a")
    share = from_a.float().mean().item()
    assert from_a.sum() + from_b.sum() >= len(rows) - 60  # rows starting with end-of-text are the only unknowns
    assert abs(share - 0.75) < 0.05, share


def test_no_shard_repeats_within_a_pass_and_passes_reshuffle(tmp_path):
    out = tmp_path / "shards"
    build_shards([str(letters(tmp_path, "docs", 12))], out, "bytes", shard_sequences=1, progress=False)
    cfg = TextDataConfig(sources=[{"path": str(out)}], seq_len=32, pack=False, valid_fraction=0.0, workers=2)
    stream = text_batches(cfg, 2, CPU)
    docs = [d for batch in take(stream, 12) for d in row_docs(batch)]
    first, second = docs[:12], docs[12:]
    assert sorted(first) == sorted(second) == sorted(chr(65 + i) * 20 for i in range(12))
    assert first != second  # the shuffle changes with the pass
    assert stream.consumed_shards()[str(out)] == {f"shard-{i:06d}.tar": 2 for i in range(12)}


def test_resume_mid_shard_with_two_workers_is_exact(tmp_path):
    cfg = TextDataConfig(sources=[{"path": str(STDLIB / "email" / "*.py")},
                                  {"path": str(letters(tmp_path, "docs", 20, length=30)), "weight": 0.5}],
                         seq_len=32, workers=2, valid_fraction=0.2)
    straight = take(text_batches(cfg, 4, CPU), 10)
    first = text_batches(cfg, 4, CPU)
    head = take(first, 4)
    state = first.state_dict()
    # The letters file (one shard) has been read from, but not to the end: the save is mid-shard.
    assert any(((r >= 65) & (r < 91) | (r == 256)).all() for b in head for r in b["input_ids"])
    assert state["consumed_shards"][cfg.sources[1]["path"]] == {}
    buffer = io.BytesIO()
    torch.save(state, buffer)  # as a checkpoint stores it, and reads it back (weights_only)
    buffer.seek(0)
    resumed = text_batches(cfg, 4, CPU)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    tail = take(resumed, 6)
    for expected, got in zip(straight, head + tail):
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_packing_keeps_documents_apart(tmp_path):
    cfg = TextDataConfig(sources=[{"path": str(STDLIB / "json" / "*.py")},
                                  {"path": str(letters(tmp_path, "short", 20, length=5))}],
                         seq_len=64, valid_fraction=0.0)
    eos = load_tokenizer("bytes").eos_id
    segments = 0
    for batch in take(text_batches(cfg, 8, CPU), 20):
        ids, labels, docs, pos = (batch[k] for k in ("input_ids", "labels", "doc_ids", "positions"))
        assert (docs >= 0).all()  # packed rows are full
        same = docs[:, 1:] == docs[:, :-1]
        # Inside a document every token is labelled with the next; across a boundary never.
        assert torch.equal(labels[:, :-1][same], ids[:, 1:][same])
        assert (labels[:, :-1][~same] == -100).all()
        assert (ids[:, :-1][~same] == eos).all()  # a document ends with end-of-text where the next starts
        # Positions restart at 0 with each document and count up within it.
        assert (pos[:, 0] == 0).all() and (pos[:, 1:][~same] == 0).all()
        assert torch.equal(pos[:, 1:][same], pos[:, :-1][same] + 1)
        for piece in row_docs(batch):
            body = piece.rstrip("\ufffd")
            if body and len(set(body)) == 1 and body[0].isupper():
                segments += 1  # a letters document stays one letter: no other document leaked in
    assert segments > 0


def test_unpacked_rows_hold_one_document_and_padding(tmp_path):
    cfg = TextDataConfig(sources=[{"path": str(letters(tmp_path, "docs", 6, length=10))}], seq_len=16, pack=False,
                         valid_fraction=0.0)
    batch = text_batches(cfg, 6, CPU).next_batch()
    assert (batch["doc_ids"][:, :11] == 0).all() and (batch["doc_ids"][:, 11:] == -1).all()
    assert (batch["labels"][:, 10:] == -100).all() and (batch["labels"][:, :10] != -100).all()


def test_ranks_read_disjoint_shards(tmp_path):
    out = tmp_path / "shards"
    build_shards([str(letters(tmp_path, "docs", 8))], out, "bytes", shard_sequences=1, progress=False)
    cfg = TextDataConfig(sources=[{"path": str(out)}], seq_len=32, pack=False, valid_fraction=0.0)
    seen = []
    for rank in (0, 1):
        stream = text_batches(cfg, 4, CPU, DistEnv(rank=rank, world_size=2))
        batches = take(stream, 2)
        assert all(b["input_ids"].shape == (2, 32) for b in batches)  # batch_size 4 is the global batch
        seen.append({d for b in batches for d in row_docs(b)})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {chr(65 + i) * 20 for i in range(8)}


def test_held_out_documents_are_never_trained_on(tmp_path):
    cfg = TextDataConfig(sources=[{"path": str(letters(tmp_path, "docs", 26, length=8))}], seq_len=16, pack=False,
                         valid_fraction=0.3, eval_rows=100)
    held = [d for batch in eval_batches(cfg, 4, CPU) for d in row_docs(batch)]
    trained = {d for batch in take(text_batches(cfg, 26, CPU), 2) for d in row_docs(batch)}
    assert held and not set(held) & trained
    assert set(held) | trained == {chr(65 + i) * 8 for i in range(26)}
    assert held == [d for batch in eval_batches(cfg, 4, CPU) for d in row_docs(batch)]  # a fixed set
    separate = TextDataConfig(sources=cfg.sources, valid_sources=[{"path": str(letters(tmp_path, "v", 2, first="a"))}],
                              seq_len=32, pack=False)
    assert [d for b in eval_batches(separate, 4, CPU) for d in row_docs(b)] == ["a" * 20, "b" * 20]


def test_corrupt_shard_and_wrong_manifest_name_the_file(tmp_path):
    out = tmp_path / "shards"
    build_shards([str(STDLIB / "json" / "*.py")], out, "bytes", shard_sequences=2, progress=False)
    cfg = TextDataConfig(sources=[{"path": str(out)}], seq_len=256, workers=2, valid_fraction=0.0)
    shard = out / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="shard-000001.tar is corrupt") as e:
        take(text_batches(cfg, 8, CPU), 30)
    assert "\n" not in str(e.value)
    shard.write_bytes(bytes(data[:-512]))
    with pytest.raises(DataError, match="shard-000001.tar has .* bytes but .*manifest.jsonl says"):
        text_batches(cfg, 4, CPU)
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    lines = (out / "manifest.jsonl").read_text().splitlines()
    entry = json.loads(lines[0])
    entry["documents"] += 1
    (out / "manifest.jsonl").write_text("\n".join([json.dumps(entry), *lines[1:]]) + "\n")
    with pytest.raises(DataError, match="shard-000000.tar holds 2 documents .* says 3"):
        read_shard(out, read_manifest(out).shards[0])


def test_config_and_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"data.sources\[0\] has unknown keys \['wieght'\]"):
        build_dataclass(TextDataConfig, {"sources": [{"path": "x", "wieght": 2}]}, "data")
    with pytest.raises(ConfigError, match=r"data.sources\[0\].weight must be a number > 0"):
        build_dataclass(TextDataConfig, {"sources": [{"path": "x", "weight": 0}]}, "data")
    with pytest.raises(ConfigError, match="data.sources must list at least one source"):
        build_dataclass(TextDataConfig, {}, "data")
    with pytest.raises(DataError, match="data source .*missing.txt does not exist"):
        text_batches(TextDataConfig(sources=[{"path": str(tmp_path / "missing.txt")}]), 2, CPU)
    with pytest.raises(ConfigError, match="tokenizer must be 'bytes'"):
        load_tokenizer(str(tmp_path / "nope.json"))


def test_cli_tokenizer_train_and_data_build(cli, tmp_path):
    corpus = str(STDLIB / "json" / "*.py")
    tok_path = tmp_path / "tok.json"
    result = cli("tokenizer", "train", corpus, "--vocab", 300, "--out", tok_path)
    assert result.exit_code == 0, result.output
    tok = load_tokenizer(str(tok_path))
    assert tok.vocab_size == 300 and tok.decode(tok.encode("def f(x):\n    return x")) == "def f(x):\n    return x"
    assert cli("tokenizer", "train", corpus, "--vocab", 300, "--out", tok_path).exit_code == 2  # exists

    out = tmp_path / "shards"
    result = cli("data", "build", corpus, "--out", out, "--tokenizer", tok_path, "--shard-tokens", 5000, "-q")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert len(manifest.shards) > 1 and all(e.tokens >= 5000 for e in manifest.shards[:-1])
    assert (out / "tokenizer.json").is_file()
    before = (out / "manifest.jsonl").read_bytes()
    result = cli("data", "build", corpus, "--out", out)
    assert result.exit_code == 2 and "not empty; pass --force" in result.output
    assert (out / "manifest.jsonl").read_bytes() == before
    # Trained on with the tokenizer it was built with: rows decode to the corpus's text.
    cfg = TextDataConfig(sources=[{"path": str(out)}], tokenizer=str(tok_path), seq_len=48, valid_fraction=0.0)
    batch = text_batches(cfg, 2, CPU).next_batch()
    text = tok.decode(batch["input_ids"][0][batch["doc_ids"][0] == 0].tolist())
    sources = "".join(p.read_text() for p in (STDLIB / "json").glob("*.py"))
    assert text.replace("<|endoftext|>", "") in sources
    with pytest.raises(ConfigError, match="built with tokenizer .* differs from data.tokenizer='bytes'"):
        text_batches(TextDataConfig(sources=[{"path": str(out)}]), 2, CPU)
    result = cli("data", "build", corpus, "--out", out, "--force", "--shard-sequences", 100, "-q")
    assert result.exit_code == 0 and len(read_manifest(out).shards) == 1
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary directory left behind
    assert np.array_equal(read_shard(out, read_manifest(out).shards[0])[0][:5],
                          np.frombuffer(sorted((STDLIB / "json").glob("*.py"))[0].read_bytes()[:5], np.uint8))


def _rank_resumes(rank: int, store: str, source: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        env = DistEnv(rank=rank, world_size=2)
        cfg = TextDataConfig(sources=[{"path": source}], seq_len=32, valid_fraction=0.0)
        stream = text_batches(cfg, 4, CPU, env)
        take(stream, 3)
        state = stream.state_dict()  # every rank's position, gathered for rank 0 to save
        expected = take(stream, 3)
        assert len(state["ranks"]) == 2 and sum(state["consumed_shards"][source].values()) >= 2
        resumed = text_batches(cfg, 4, CPU, env)
        resumed.load_state_dict(state)
        for a, b in zip(expected, take(resumed, 3)):
            assert all(torch.equal(a[k], b[k]) for k in a)
        with pytest.raises(ConfigError, match="saved by 2 processes; resume with 2"):
            text_batches(cfg, 4, CPU).load_state_dict(state)
    finally:
        dist.destroy_process_group()


def test_two_real_ranks_save_and_resume_their_own_positions(tmp_path):
    source = str(letters(tmp_path, "docs", 16, length=40))
    out = tmp_path / "shards"
    build_shards([source], out, "bytes", shard_sequences=1, progress=False)
    torch.multiprocessing.start_processes(_rank_resumes, args=(str(tmp_path / "store"), str(out)), nprocs=2,
                                          start_method="fork")


def test_workers_outlive_stop_signals(tmp_path):
    """Ctrl-C or a scheduler's SIGUSR1 reach the loader workers too (the process group): the training
    process must still get its batches to finish the step and checkpoint."""
    cfg = TextDataConfig(sources=[{"path": str(STDLIB / "json" / "*.py")}], seq_len=32, workers=2)
    stream = text_batches(cfg, 2, CPU)
    stream.next_batch()
    for worker in stream.iterator._workers:
        os.kill(worker.pid, signal.SIGINT)
        os.kill(worker.pid, signal.SIGUSR1)
    time.sleep(0.5)
    assert all(worker.is_alive() for worker in stream.iterator._workers)
    assert len(take(stream, 20)) == 20


def test_lanes_mix_a_batch_from_several_documents(tmp_path):
    """One lane: a batch's rows are consecutive pieces of one long document. Four lanes: four documents."""
    docs = letters(tmp_path, "long", 8, length=300)
    for lanes, distinct in ((1, 1), (4, 4)):
        cfg = TextDataConfig(sources=[{"path": str(docs)}], seq_len=32, valid_fraction=0.0, lanes=lanes)
        batch = text_batches(cfg, 4, CPU).next_batch()
        assert len({piece[0] for piece in row_docs(batch)}) == distinct


def test_lanes_read_each_shard_once_a_pass_and_resume_exactly(tmp_path):
    out = tmp_path / "shards"
    build_shards([str(letters(tmp_path, "docs", 12, length=40))], out, "bytes", shard_sequences=1, progress=False)
    cfg = TextDataConfig(sources=[{"path": str(out)}], seq_len=16, valid_fraction=0.0, workers=2, lanes=3)
    straight = take(text_batches(cfg, 4, CPU), 12)
    pieces = [p for b in straight for p in row_docs(b)]
    # 2 workers x 3 lanes = 6 cursors over 12 one-document shards: each letter once before any twice.
    first_seen = list(dict.fromkeys(p[0] for p in pieces if p[0].isupper()))
    assert sorted(first_seen[:12]) == [chr(65 + i) for i in range(12)]
    first = text_batches(cfg, 4, CPU)
    head = take(first, 5)
    state = first.state_dict()
    resumed = text_batches(cfg, 4, CPU)
    resumed.load_state_dict(state)
    for expected, got in zip(straight, head + take(resumed, 7)):
        assert all(torch.equal(expected[k], got[k]) for k in expected)
    other = TextDataConfig(sources=[{"path": str(out)}], seq_len=16, valid_fraction=0.0, workers=2, lanes=2)
    with pytest.raises(ConfigError, match="data.lanes"):
        stream = text_batches(other, 4, CPU)
        stream.load_state_dict(state)
        stream.next_batch()


def test_a_position_saved_before_lanes_resumes(tmp_path):
    """Checkpoints written before data.lanes hold one [visit, doc, offset] and one visit count per source."""
    cfg = TextDataConfig(sources=[{"path": str(letters(tmp_path, "docs", 6, length=50))}], seq_len=16,
                         valid_fraction=0.0)
    straight = take(text_batches(cfg, 2, CPU), 6)
    first = text_batches(cfg, 2, CPU)
    take(first, 3)
    state = first.state_dict()
    cursors = state["loader"]["dataset_state"]["position"]["cursors"]
    cursors[:] = [lanes[0] for lanes in cursors]
    state["visits"] = {k: [lanes[0] for lanes in v] for k, v in state["visits"].items()}
    resumed = text_batches(cfg, 2, CPU)
    resumed.load_state_dict(state)
    for expected, got in zip(straight[3:], take(resumed, 3)):
        assert all(torch.equal(expected[k], got[k]) for k in expected)

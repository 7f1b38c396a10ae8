"""gssm: the generator, the exact optimum, probes, and the task end to end through the CLI."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from conftest import interrupt_at, losses, snapshot

import latentforge
from latentforge.config import load_config
from latentforge.errors import ConfigError, TrainingStopped
from latentforge.nn.probe import probe_accuracy
from latentforge.tasks.gssm.data import generate
from latentforge.tasks.gssm.graph import Graph, NodeConfig, draw_table
from latentforge.tasks.gssm.optimum import forward_filter
from latentforge.tasks.gssm.sampling import sample, uniforms
from latentforge.tasks.gssm.task import GSSM

CPU = torch.device("cpu")
TINY = ["train.steps=12", "train.log_every=1", "train.eval_every=6", "checkpoint.every=4"]


def node(name, dim, parents=(), **kw):
    return NodeConfig(name=name, state_dim=dim, parents=list(parents), **kw)


def small_graph(**x_options) -> Graph:
    return Graph([node("A", 2, alpha=0.7), node("B", 3, ["A"], alpha=0.5, kernel="product"),
                  node("X", 4, ["A", "B"], alpha=0.3, **x_options)], seed=3)


# ----------------------------------------------------------------------------- the generator


def test_empirical_transition_frequencies_match_the_tables():
    graph = small_graph(kernel="product")
    seqs = sample(graph, key=5, first=0, n=3000, length=40, device=CPU)
    names = [n.name for n in graph.hidden]
    states = {name: seqs.states[..., i] for i, name in enumerate(names)} | {"X": seqs.tokens}
    for n in graph.nodes:
        row = torch.zeros_like(states[n.name][:, 1:])
        for name in n.inputs:
            value = states[name][:, :-1] if name == n.name else states[name][:, 1:]
            row = row * graph.dims[name] + value
        counts = torch.zeros(row.max() + 1, n.state_dim)
        counts.index_put_((row.flatten(), states[n.name][:, 1:].flatten()), torch.ones(row.numel()), accumulate=True)
        seen = counts.sum(1) > 2000
        assert seen.sum() >= 2
        empirical = counts[seen] / counts[seen].sum(1, keepdim=True)
        expected = torch.from_numpy(graph.tables[n.name])[: len(counts)][seen].float()
        assert torch.allclose(empirical, expected, atol=0.03), n.name


def test_sequences_are_a_pure_function_of_seed_and_index():
    graph = small_graph()
    whole = sample(graph, key=9, first=0, n=20, length=16, device=CPU)
    parts = [sample(graph, key=9, first=f, n=10, length=16, device=CPU) for f in (0, 10)]
    assert torch.equal(whole.tokens, torch.cat([p.tokens for p in parts]))
    assert torch.equal(whole.states, torch.cat([p.states for p in parts]))
    assert not torch.equal(whole.tokens, sample(graph, key=10, first=0, n=20, length=16, device=CPU).tokens)
    # The start is known: every node in state 0, so token 0 is 0.
    assert (whole.tokens[:, 0] == 0).all() and (whole.states[:, 0] == 0).all()
    u = uniforms(key=1, first=0, n=1000, steps=4, nodes=3, device=CPU)
    assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01


def test_graph_seed_fixes_the_tables_and_each_node_has_its_own_stream():
    a, b = small_graph(), small_graph()
    assert all(np.array_equal(a.tables[k], b.tables[k]) for k in a.tables)
    other = Graph([node("A", 2, alpha=0.7), node("B", 3, ["A"], alpha=0.5, kernel="product"),
                   node("X", 4, ["A", "B"], alpha=0.3)], seed=4)
    assert not np.array_equal(a.tables["X"], other.tables["X"])
    # A node added to the graph leaves the others' tables unchanged.
    grown = Graph([node("A", 2, alpha=0.7), node("B", 3, ["A"], alpha=0.5, kernel="product"), node("C", 2),
                   node("X", 4, ["A", "B"], alpha=0.3)], seed=3)
    assert np.array_equal(a.tables["A"], grown.tables["A"]) and np.array_equal(a.tables["X"], grown.tables["X"])


@pytest.mark.parametrize("kernel", ["fullrank", "product"])
def test_slow_and_dead_modes_move_the_largest_entry(kernel):
    dims = [3, 2]  # own previous state (3), then one parent (2)
    default = draw_table(node("Z", 3, ["P"], alpha=0.5, kernel=kernel), dims, np.random.default_rng(0))
    slow = draw_table(node("Z", 3, ["P"], alpha=0.5, kernel=kernel, mode="slow"), dims, np.random.default_rng(0))
    dead = draw_table(node("Z", 3, ["P"], alpha=0.5, kernel=kernel, mode="dead"), dims, np.random.default_rng(0))
    own_previous = np.arange(6) // 2
    assert (slow.argmax(1) == own_previous).all()
    assert (dead.argmax(1) == 0).all()
    for moved in (slow, dead):
        # Only entries were swapped: each row holds the same values.
        assert np.allclose(np.sort(moved, 1), np.sort(default, 1))
    untouched = default.argmax(1) == own_previous
    assert np.allclose(slow[untouched], default[untouched])


# ----------------------------------------------------------------------------- the optimum


def brute_force_nll(graph: Graph, tokens: list[int], tables: dict[str, np.ndarray]) -> list[float]:
    """-log p(x_t | x_<t) by summing the joint probability over every hidden path."""
    hidden = graph.hidden
    T = len(tokens)
    prefix = np.zeros(T)
    for path in itertools.product(itertools.product(*[range(n.state_dim) for n in hidden]), repeat=T - 1):
        states = [dict.fromkeys([n.name for n in hidden], 0)] + [dict(zip([n.name for n in hidden], p)) for p in path]
        prob = 1.0
        for t in range(1, T):
            now = states[t] | {"X": tokens[t]}
            before = states[t - 1] | {"X": tokens[t - 1]}
            for n in graph.nodes:
                row = 0
                for name in n.inputs:
                    row = row * graph.dims[name] + (before[name] if name == n.name else now[name])
                prob *= tables[n.name][row, now[n.name]]
            prefix[t] += prob
    # Each prefix was summed once per continuation of its path.
    joint = math.prod(n.state_dim for n in hidden)
    prefix = [prefix[t] / joint ** (T - 1 - t) for t in range(T)]
    return [-math.log(prefix[t] / (prefix[t - 1] if t > 1 else 1.0)) for t in range(1, T)]


@pytest.mark.parametrize("x_options", [{}, {"self_edge": False}, {"kernel": "product"}])
def test_forward_filter_equals_brute_force(x_options):
    graph = small_graph(**x_options)
    seqs = sample(graph, key=2, first=0, n=3, length=5, device=CPU)
    nll, posterior = forward_filter(graph, seqs.tokens, marginals=True)
    for i in range(3):
        expected = brute_force_nll(graph, seqs.tokens[i].tolist(), graph.tables)
        assert np.allclose(nll[i].numpy(), expected, rtol=1e-9, atol=1e-12)
    # Filtered marginals: one distribution per node per step.
    assert torch.allclose(posterior[..., :2].sum(-1), torch.ones(3, 5), atol=1e-5)
    assert torch.allclose(posterior[..., 2:].sum(-1), torch.ones(3, 5), atol=1e-5)


def test_forward_filter_with_per_sequence_tables_equals_brute_force():
    graph = Graph([node("A", 2, alpha=1.0, mode="context"), node("X", 3, ["A"], alpha=0.5, mode="context")], seed=0)
    seqs = sample(graph, key=7, first=0, n=2, length=5, device=CPU)
    assert seqs.context_tables["X"].shape == (2, 6, 3)
    nll, _ = forward_filter(graph, seqs.tokens, seqs.context_tables)
    for i in range(2):
        tables = {k: v[i].numpy() for k, v in seqs.context_tables.items()}
        assert np.allclose(nll[i].numpy(), brute_force_nll(graph, seqs.tokens[i].tolist(), tables), rtol=1e-9)


def test_optimal_loss_is_below_simple_predictors():
    graph = small_graph()
    seqs = generate(graph, key=0, first=0, n=400, length=64, device=CPU, optimum=True)
    tokens = seqs.tokens[:, 1:].flatten()
    unigram = torch.bincount(tokens, minlength=4).double() / len(tokens)
    entropy = float(-(unigram * unigram.log()).sum())
    assert float(seqs.optimal.mean()) < entropy


# ----------------------------------------------------------------------------- probes


@pytest.mark.parametrize("method", ["logistic", "ridge"])
def test_probe_recovers_a_planted_linear_signal(method):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (3000,), generator=g)
    directions = torch.randn(4, 32, generator=g)
    features = directions[labels] + 0.3 * torch.randn(3000, 32, generator=g) + 5.0
    accuracy = probe_accuracy(features[:2000], labels[:2000], features[2000:], labels[2000:], 4, method)
    assert accuracy > 0.97
    # Labels unrelated to the features: chance level.
    shuffled = labels[torch.randperm(3000, generator=g)]
    chance = probe_accuracy(features[:2000], shuffled[:2000], features[2000:], shuffled[2000:], 4, method)
    assert chance < 0.35


# ----------------------------------------------------------------------------- the task


def test_a_loss_below_the_optimum_on_held_out_data_fails_the_sanity_check(monkeypatch):
    cfg = load_config("gssm/tiny")
    task = GSSM(cfg, CPU)
    model = task.build_model().eval()
    test = task.eval_set("test")
    # A predictor exactly at the optimum passes ...
    monkeypatch.setattr(task, "sequence_losses", lambda model, tokens: test.optimal.clone())
    assert task.evaluate(model, "test")["test/gap"] == 0.0
    # ... one clearly below it cannot exist: the evaluation is wrong.
    monkeypatch.setattr(task, "sequence_losses", lambda model, tokens: test.optimal - 0.05)
    with pytest.raises(TrainingStopped, match="below the Bayes-optimal"):
        task.evaluate(model, "test")
    # Below the optimum on training data is overfitting, not a broken evaluation.
    assert task.evaluate(model, "train")["train/gap"] < 0


def test_train_logs_loss_optimum_and_gap(cli, runs_dir):
    result = cli("train", "gssm/tiny", *TINY, "data.eval_splits=[test,train]", "--runs-dir", runs_dir, "--name", "g")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (runs_dir / "g" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert all(math.isclose(r["train/gap"], r["train/loss"] - r["train/optimal_loss"], abs_tol=1e-5) for r in train)
    final = [r for r in records if "test/gap" in r][-1]
    for split in ("test", "train"):
        assert math.isclose(final[f"{split}/gap"], final[f"{split}/loss"] - final[f"{split}/optimal_loss"],
                            abs_tol=1e-9)
        assert math.isclose(final[f"{split}/relative_gap"], final[f"{split}/gap"] / final[f"{split}/optimal_loss"])
        assert final[f"{split}/optimal_loss_se"] > 0
    assert final["test/gap"] > 0
    info = json.loads((runs_dir / "g" / "run.json").read_text())
    assert info["best"]["metric"] == "test/gap"


@pytest.mark.parametrize("data", [["data.chunk_sequences=40"], ["data.train_sequences=20"]],
                         ids=["endless", "finite"])
def test_resume_is_exact(runs_dir, monkeypatch, data):
    """Stopped mid-chunk (endless) or mid-epoch (finite): N steps, SIGTERM, resume == 2N straight."""
    common = [*TINY, *data, "model.dropout=0.1", "checkpoint.every=5"]
    straight = latentforge.train("gssm/tiny", *common, name="straight", runs_dir=runs_dir)
    interrupt_at(monkeypatch, 7)
    part = latentforge.train("gssm/tiny", *common, name="part", runs_dir=runs_dir)
    assert part.status == "interrupted"
    monkeypatch.undo()
    resumed = latentforge.resume("part", runs_dir=runs_dir)
    assert losses(straight.path) == losses(resumed.path) and len(losses(straight.path)) == 12


def test_finite_train_set_repeats_over_epochs():
    cfg = load_config("gssm/tiny", ["data.train_sequences=12", "train.batch_size=8"])
    task = GSSM(cfg, CPU)
    stream = task.train_batches()
    seen = torch.cat([stream.next_batch()["inputs"] for _ in range(3)])
    rows = {tuple(r) for r in seen.tolist()}
    assert len(rows) == 12  # 24 draws, two epochs of the 12 training sequences
    train_tokens = {tuple(r) for r in task.train_set.tokens[:, :-1].long().tolist()}
    assert rows == train_tokens


def test_probe_command_writes_table_and_heatmap(cli, runs_dir):
    assert cli("train", "gssm/tiny", *TINY, "--runs-dir", runs_dir, "--name", "p").exit_code == 0
    result = cli("probe", "p", "--runs-dir", runs_dir, "--examples", "40", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["node"] for r in rows] == ["Z1", "Z2"]
    for row in rows:
        assert 0 < row["ceiling"] <= 1 and {"layer0", "layer1"} <= set(row)
    artifacts = runs_dir / "p" / "artifacts"
    assert (artifacts / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (artifacts / "probe.csv").read_text().splitlines()[0].startswith("node,states,ceiling,layer0")
    bad = cli("probe", "p", "--runs-dir", runs_dir, "--method", "svm")
    assert bad.exit_code == 2 and "logistic or ridge" in bad.output


def test_dataset_file_round_trip(cli, runs_dir, tmp_path):
    path = tmp_path / "tiny.npz"
    result = cli("data", "generate", "gssm/tiny", "data.train_sequences=30", "--out", path)
    assert result.exit_code == 0, result.output
    assert cli("data", "generate", "gssm/tiny", "data.train_sequences=30", "--out", path).exit_code == 2
    cfg = load_config("gssm/tiny", [f"data.path={path}"])
    from_file = GSSM(cfg, CPU)
    generated = GSSM(load_config("gssm/tiny", ["data.train_sequences=30"]), CPU)
    assert torch.equal(from_file.train_set.tokens.long(), generated.train_set.tokens.long())
    assert torch.allclose(from_file.eval_set("test").optimal, generated.eval_set("test").optimal)
    assert cli("train", "gssm/tiny", *TINY, f"data.path={path}", "--runs-dir", runs_dir, "--name", "f").exit_code == 0
    # The file must hold this config's process.
    before = snapshot(runs_dir)
    result = cli("train", "gssm/tiny", f"data.path={path}", "data.graph_seed=1", "--runs-dir", runs_dir)
    assert result.exit_code == 2 and "graph_seed" in result.output
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a dataset")
    result = cli("train", "gssm/tiny", f"data.path={garbage}", "--runs-dir", runs_dir)
    assert result.exit_code == 2 and "not a dataset" in result.output
    assert snapshot(runs_dir) == before


def test_context_mode_reports_the_monte_carlo_optimum(cli, runs_dir):
    nodes = ("data.nodes=[{name: Z1, state_dim: 2, alpha: 1.0, mode: context},"
             "{name: X, state_dim: 3, alpha: 0.5, parents: [Z1], mode: context}]")
    result = cli("train", "gssm/tiny", *TINY, nodes, "--runs-dir", runs_dir, "--name", "c")
    assert result.exit_code == 0, result.output
    final = [json.loads(line) for line in (runs_dir / "c" / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["test/optimal_loss_se"] > 0 and final["test/gap"] > -3 * final["test/gap_se"]


@pytest.mark.parametrize("nodes, message", [
    ("[{name: A, state_dim: 2, parents: [B]}, {name: B, state_dim: 2, parents: [A]}, "
     "{name: X, state_dim: 3, parents: [A]}]", "cycle: A -> B -> A"),
    ("[{name: A, state_dim: 2, parents: [Q]}, {name: X, state_dim: 3, parents: [A]}]", "parent 'Q', which is not"),
    ("[{name: A, state_dim: 2}, {name: X, state_dim: 3}]", "X has no parents"),
    ("[{name: A, state_dim: 2, alpha: 0}, {name: X, state_dim: 3, parents: [A]}]", "alpha must be > 0"),
    ("[{name: A, state_dim: 2, alpha: -1}, {name: X, state_dim: 3, parents: [A]}]", "alpha must be > 0"),
    ("[{name: A, state_dim: 2}, {name: Y, state_dim: 3, parents: [A]}]", "no node named 'X'"),
    ("[{name: A, state_dim: 2, parents: [X]}, {name: X, state_dim: 3, parents: [A]}]", "cannot be a parent"),
    ("[{name: A, state_dim: 2, mode: slow, self_edge: false}, {name: X, state_dim: 3, parents: [A]}]",
     "slow needs self_edge"),
    ("[{name: A, state_dim: 80}, {name: B, state_dim: 80}, {name: X, state_dim: 3, parents: [A, B]}]",
     "data.optimum=false"),
])
def test_bad_graphs_are_refused_with_one_line(cli, runs_dir, nodes, message):
    result = cli("train", "gssm/tiny", f"data.nodes={nodes}", "--runs-dir", runs_dir)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not runs_dir.exists()


def test_graph_errors_are_config_errors():
    with pytest.raises(ConfigError, match="two nodes are named 'A'"):
        Graph([node("A", 2), node("A", 2), node("X", 2, ["A"])], seed=0)

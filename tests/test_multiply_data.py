import random
from pathlib import Path

import pytest
import torch
from conftest import ICOT

from latentforge.errors import DataError
from latentforge.tasks.multiply.data import (
    Examples,
    MultiplyBatches,
    MultiplyData,
    column_totals,
    multiply_digits,
    pair_keys,
    read_icot_file,
    to_digits,
)
from latentforge.tasks.multiply.layout import (
    ANSWER,
    END,
    EQUALS,
    IGNORE,
    PAD,
    STAR,
    build_sequences,
    chain_length,
    chain_tokens,
    extract_answer,
    render,
    sequence_length,
)


def encode(ex: Examples, reverse: bool, length: int) -> torch.Tensor:
    return build_sequences(ex, reverse, length).tokens


def training_pair(ex: Examples, reverse: bool, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    return build_sequences(ex, reverse, length).training_pair()


def batches(data: MultiplyData, batch_size: int) -> MultiplyBatches:
    return MultiplyBatches(data, batch_size, True, lambda ex, i: training_pair(ex, True, sequence_length(
        data.width_a, data.width_b)), torch.device("cpu"))


def decode(row: list[int], reverse: bool) -> tuple[int, int, int]:
    """Read `a * b = c <end>` back into integers (the inverse of encode)."""
    text = "".join({STAR: "*", EQUALS: "=", END: "$", PAD: "_"}.get(t, str(t)) for t in row)
    assert text.count("*") == 1 and text.count("=") == 1 and text.count("$") == 1
    body = text.split("$")[0]
    assert set(text.split("$")[1]) <= {"_"}
    a, rest = body.split("*")
    b, c = rest.split("=")
    flip = (lambda s: s[::-1]) if reverse else (lambda s: s)
    return int(flip(a)), int(flip(b)), int(flip(c))


@pytest.mark.parametrize("reverse", [True, False])
def test_encode_round_trips(reverse):
    rng = random.Random(0)
    a = torch.tensor([rng.randrange(0, 10**rng.randint(1, 4)) for _ in range(300)])
    b = torch.tensor([rng.randrange(0, 10**rng.randint(1, 3)) for _ in range(300)])
    ex = Examples.from_ints(a, b, 4, 3)
    seq = encode(ex, reverse, sequence_length(4, 3))
    for row, x, y in zip(seq.tolist(), a.tolist(), b.tolist()):
        assert decode(row, reverse) == (x, y, x * y)


def test_padding_id_is_never_a_digit():
    assert PAD not in range(10) and len({STAR, EQUALS, END, PAD}) == 4


def test_long_multiplication_is_exact_beyond_int64():
    rng = random.Random(1)
    a = [rng.randrange(10**10, 10**11) for _ in range(50)]
    b = [rng.randrange(10**10, 10**11) for _ in range(50)]
    c = multiply_digits(to_digits(torch.tensor(a), 11), to_digits(torch.tensor(b), 11))
    for row, x, y in zip(c.tolist(), a, b):
        assert int("".join(map(str, reversed(row)))) == x * y


def test_only_the_answer_and_end_are_scored():
    ex = Examples.from_ints(torch.tensor([12]), torch.tensor([34]), 2, 2)
    inputs, targets = training_pair(ex, True, sequence_length(2, 2))
    scored = targets[0][targets[0] != IGNORE].tolist()
    assert scored == [8, 0, 4, END]  # 12 * 34 = 408, least-significant digit first, then <end>
    assert inputs[0, : targets.shape[1]].tolist()[:6] == [2, 1, STAR, 4, 3, EQUALS]


def test_held_out_pairs_are_disjoint_and_closed_under_commutation():
    data = MultiplyData((1, 2), (1, 2), test_size=1000, holdout_commuted=True, seed=3)
    test = set(zip(*(t.tolist() for t in data.test)))
    train = set(zip(*(t.tolist() for t in data.train)))
    assert 1000 <= len(test) <= 1001 and not test & train
    assert len(test) + len(train) == 100 * 100
    assert all((b, a) in test for a, b in test)


def test_data_is_deterministic_from_the_seed():
    one = MultiplyData((1, 2), (1, 2), 500, True, seed=5)
    two = MultiplyData((1, 2), (1, 2), 500, True, seed=5)
    other = MultiplyData((1, 2), (1, 2), 500, True, seed=6)
    assert torch.equal(one.test[0], two.test[0]) and not torch.equal(one.test[0], other.test[0])
    b1 = batches(one, 64)
    b2 = batches(two, 64)
    b2.load_state_dict({"index": 150})  # jump mid-epoch: batch i depends only on (seed, i)
    for _ in range(150):
        b1.next_batch()
    for _ in range(3):
        assert all(torch.equal(x, y) for x, y in zip(b1.next_batch(), b2.next_batch()))


def test_epochs_cover_every_training_pair_once():
    data = MultiplyData((1, 1), (1, 2), 100, False, seed=0)
    n = data.train_size
    batches = MultiplyBatches(data, 7, False, lambda ex, i: ex, torch.device("cpu"))
    seen = []
    for i in range(n // 7):
        a, b = batches.pairs(i)
        seen += list(zip(a.tolist(), b.tolist()))
    assert len(set(seen)) == len(seen) == (n // 7) * 7


def test_sampled_space_never_trains_on_test_pairs():
    data = MultiplyData((3, 6), (3, 6), 2000, True, seed=0)
    assert data.train is None  # too many pairs to enumerate
    batches = MultiplyBatches(data, 512, True, lambda ex, i: ex, torch.device("cpu"))
    test_keys = set(data.test_keys.tolist())
    lengths = set()
    for i in range(20):
        a, b = batches.pairs(i)
        assert not test_keys & set(pair_keys(a, b).tolist())
        lengths |= {len(str(x)) for x in a.tolist()}
    assert lengths == {3, 4, 5, 6}  # operand lengths are sampled uniformly


def test_reads_the_public_icot_files():
    ex = read_icot_file(ICOT / "4_by_4" / "test.txt")
    assert len(ex) == 1000 and int(ex.len_a.max()) == 4 and int(ex.len_b.max()) == 4
    ex = read_icot_file(ICOT / "11_by_11" / "test.txt")
    assert int(ex.len_c.max()) >= 21


def test_icot_line_is_parsed_from_the_documented_format(tmp_path: Path):
    f = tmp_path / "one.txt"
    # 2967 x 6361 = 18873087 (README example), digits least-significant first.
    f.write_text("7 6 9 2 * 1 6 3 6||7 6 9 2 0 + 0 2 0 8 7 1 #### 7 8 0 3 7 8 8 1\n")
    ex = read_icot_file(f)
    assert ex.a[0].tolist() == [7, 6, 9, 2] and ex.c[0].tolist()[:8] == [7, 8, 0, 3, 7, 8, 8, 1]


@pytest.mark.parametrize("text, message", [
    ("hello world\n", "line 1 is not"),
    ("1 2 * 3 4 #### 9 9 9 9\n", "stated answer is not the product"),
    ("", "holds no examples"),
    ("1 2 * 3 x #### 1\n", "line 1 is not"),
])
def test_wrong_format_files_are_refused(tmp_path: Path, text, message):
    f = tmp_path / "bad.txt"
    f.write_text(text)
    with pytest.raises(DataError, match=message):
        read_icot_file(f)


def test_binary_file_is_refused(tmp_path: Path):
    f = tmp_path / "bin.txt"
    f.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError):
        read_icot_file(f)


@pytest.mark.parametrize("n", [4, 5, 7, 9, 11])
def test_chain_reproduces_the_public_files_exactly(n):
    """The generated chain of thought equals the public files' chain, token for token."""
    for name in ("valid.txt", "test.txt"):
        path = ICOT / f"{n}_by_{n}" / name
        ex = read_icot_file(path)
        tokens, lengths = chain_tokens(ex.fixed_width(), reverse=True)
        assert int(lengths.min()) == int(lengths.max()) == chain_length(n, n)
        for line, row in zip(path.read_text().splitlines(), tokens.tolist()):
            assert render(row) == line.split("||")[1].split("####")[0].strip()


def test_chain_of_a_small_product_by_hand():
    # 12 x 34 (LSD first: a = 2 1, b = 4 3): partials 12*4 = 048 -> "8 4 0", 12*3 = 036 shifted -> "0 6 3 0".
    ex = Examples.from_ints(torch.tensor([12]), torch.tensor([34]), 2, 2)
    tokens, lengths = chain_tokens(ex, reverse=True)
    assert render(tokens[0].tolist()) == "8 4 0 + 0 6 3 0"
    tokens, _ = chain_tokens(ex, reverse=False)
    assert render(tokens[0].tolist()) == "0 4 8 + 0 3 6 0"


def test_chain_layout_and_removal():
    ex = Examples.from_ints(torch.tensor([12, 12]), torch.tensor([34, 34]), 2, 2).fixed_width()
    chain = chain_tokens(ex, reverse=True)
    L = sequence_length(2, 2, chain=True)
    seqs = build_sequences(ex, True, L, chain, removed=torch.tensor([3, 100]))
    assert render(seqs.tokens[0].tolist()) == "2 1 * 4 3 = + 0 6 3 0 #### 8 0 4 0 <end>"
    # Everything removed: the `#` goes too, leaving the answer-only layout.
    assert render(seqs.tokens[1].tolist()) == "2 1 * 4 3 = 8 0 4 0 <end>"
    inputs, targets = seqs.training_pair()
    assert render([t for t in targets[0].tolist() if t != IGNORE]) == "+ 0 6 3 0 #### 8 0 4 0 <end>"


def test_variable_width_layouts_and_thoughts():
    ex = Examples.from_ints(torch.tensor([7, 123]), torch.tensor([45, 6]), 3, 2)
    seqs = build_sequences(ex, False, sequence_length(3, 2, thoughts=2), thoughts=2)
    assert render(seqs.tokens[0].tolist()) == "7 * 4 5 = <t> <t> 3 1 5 <end>"
    assert render(seqs.tokens[1].tolist()) == "1 2 3 * 6 = <t> <t> 7 3 8 <end>"
    assert seqs.prompt_len.tolist() == [7, 8]


def test_answer_is_read_after_the_mark_or_from_the_start():
    generated = torch.tensor([[1, 2, ANSWER, 3, 4, END, 5], [3, 4, END, 9, 9, 9, 9]])
    assert extract_answer(generated, 3).tolist() == [[3, 4, END], [3, 4, END]]
    assert extract_answer(torch.tensor([[3, END, 4]]), 3).tolist() == [[3, END, PAD]]


def test_column_totals_are_the_running_sums():
    # 99 x 99: column 0 = 81 (digit 1, carry 8); column 1 = 81 + 81 + 8 = 170; column 2 = 81 + 17 = 98.
    totals = column_totals(torch.tensor([[9, 9]]), torch.tensor([[9, 9]]))
    assert totals.tolist() == [[81, 170, 98, 9]] and 99 * 99 == 9801


def test_chains_of_mixed_lengths_match_each_row_alone():
    a = torch.tensor([7, 123, 45, 999])
    b = torch.tensor([45, 6, 78, 9])
    ex = Examples.from_ints(a, b, 3, 2)
    tokens, lengths = chain_tokens(ex, reverse=True)
    for i in range(4):
        alone = Examples.from_ints(a[i: i + 1], b[i: i + 1], len(str(int(a[i]))), len(str(int(b[i]))))
        one, n = chain_tokens(alone, reverse=True)
        assert int(lengths[i]) == int(n[0]) == chain_length(len(str(int(a[i]))), len(str(int(b[i]))))
        assert render(tokens[i].tolist()) == render(one[0].tolist())

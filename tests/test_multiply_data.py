import random
from pathlib import Path

import pytest
import torch
from conftest import ICOT

from latentforge.errors import DataError
from latentforge.tasks.multiply.data import (
    END,
    EQUALS,
    IGNORE,
    PAD,
    STAR,
    Examples,
    MultiplyBatches,
    MultiplyData,
    encode,
    multiply_digits,
    pair_keys,
    read_icot_file,
    sequence_length,
    to_digits,
    training_pair,
)


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
    b1 = MultiplyBatches(one, 64, True, True, 11, torch.device("cpu"))
    b2 = MultiplyBatches(two, 64, True, True, 11, torch.device("cpu"))
    b2.load_state_dict({"index": 150})  # jump mid-epoch: batch i depends only on (seed, i)
    for _ in range(150):
        b1.next_batch()
    for _ in range(3):
        assert all(torch.equal(x, y) for x, y in zip(b1.next_batch(), b2.next_batch()))


def test_epochs_cover_every_training_pair_once():
    data = MultiplyData((1, 1), (1, 2), 100, False, seed=0)
    n = data.train_size
    batches = MultiplyBatches(data, 7, True, False, 9, torch.device("cpu"))
    seen = []
    for i in range(n // 7):
        a, b = batches.pairs(i)
        seen += list(zip(a.tolist(), b.tolist()))
    assert len(set(seen)) == len(seen) == (n // 7) * 7


def test_sampled_space_never_trains_on_test_pairs():
    data = MultiplyData((3, 6), (3, 6), 2000, True, seed=0)
    assert data.train is None  # too many pairs to enumerate
    batches = MultiplyBatches(data, 512, True, True, sequence_length(6, 6), torch.device("cpu"))
    test_keys = set(data.test_keys.tolist())
    lengths = set()
    for i in range(20):
        a, b = batches.pairs(i)
        assert not test_keys & set(pair_keys(a, b).tolist())
        lengths |= {len(str(x)) for x in a.tolist()}
    assert lengths == {3, 4, 5, 6}  # operand lengths are sampled uniformly


@pytest.mark.skipif(not ICOT.is_dir(), reason="shared icot data not present")
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

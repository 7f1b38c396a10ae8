import pytest
import torch
import torch.nn.functional as F

from latentforge.tasks.multiply.latent import LatentTransformer, scheduled_inputs

# The multiply vocabulary (digits 0-9, then *, =, <end>, <pad>), local: the model takes vocab_size and pad_id.
STAR, EQUALS, END, PAD, VOCAB_SIZE = 10, 11, 12, 13, 14
B, TQ, TA = 8, 7, 6


def tiny(bottleneck: float = 1.0, dropout: float = 0.0) -> LatentTransformer:
    torch.manual_seed(0)
    model = LatentTransformer(vocab_size=VOCAB_SIZE, pad_id=PAD, d_model=32, n_head=2, mlp_ratio=2.0, dropout=dropout,
                              max_len=16, encoder_layers=1, latent_layers=2, decoder_layers=2, latents=4,
                              bottleneck=bottleneck)
    # Larger weights than the init: a freshly built model predicts the same token everywhere.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 2 / p.shape[-1] ** 0.5)
    return model.eval()


def questions(seed: int = 1) -> torch.Tensor:
    """Right-padded `a * b` rows of varying lengths."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 10, (B, TQ), generator=g)
    q[:, 3] = STAR
    lengths = torch.randint(5, TQ + 1, (B,), generator=g)
    return q.masked_fill(torch.arange(TQ) >= lengths[:, None], PAD)


def decoder_inputs(seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, 10, (B, TA), generator=g)
    inputs[:, 0] = EQUALS
    return inputs


@pytest.mark.parametrize("bottleneck", [1.0, 0.5])
def test_shapes_and_every_parameter_gets_gradient(bottleneck):
    model = tiny(bottleneck).train()
    logits = model(questions(), decoder_inputs())
    assert logits.shape == (B, TA, VOCAB_SIZE)
    F.cross_entropy(logits.flatten(0, 1), torch.randint(0, 10, (B * TA,))).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("bottleneck", [1.0, 0.5, 0.0])
def test_trailing_padding_changes_nothing(bottleneck):
    model = tiny(bottleneck)
    q, inputs = questions(), decoder_inputs()
    padded = torch.cat([q, torch.full((B, 5), PAD)], dim=1)
    torch.testing.assert_close(model(padded, inputs), model(q, inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("t", [1, 3, TA - 1])
def test_decoder_is_causal(t):
    model = tiny(0.5)
    q, inputs = questions(), decoder_inputs()
    changed = inputs.clone()
    changed[:, t] = (inputs[:, t] + 1) % 10
    before, after = model(q, inputs), model(q, changed)
    torch.testing.assert_close(after[:, :t], before[:, :t])
    assert not torch.allclose(after[:, t:], before[:, t:])


@pytest.mark.parametrize("bottleneck", [1.0, 0.5])
def test_full_bottleneck_sees_the_question_only_through_the_latents(bottleneck):
    model = tiny(bottleneck)
    q, other, inputs = questions(1), questions(3), decoder_inputs()
    assert not torch.allclose(model(q, inputs), model(other, inputs))
    fixed = torch.randn(B, 4, 32)
    handle = model.latent_norm.register_forward_hook(lambda module, args, out: fixed)
    same = torch.allclose(model(q, inputs), model(other, inputs), atol=1e-6)
    handle.remove()
    assert same == (bottleneck == 1.0)


def test_bottleneck_near_one_fades_into_the_full_bottleneck():
    q, inputs = questions(), decoder_inputs()
    near, full, half = tiny(1 - 1e-15), tiny(1.0), tiny(0.5)
    torch.testing.assert_close(near(q, inputs), full(q, inputs), atol=1e-5, rtol=0)
    assert not torch.allclose(half(q, inputs), full(q, inputs), atol=1e-3)


def test_generate_is_greedy_decoding_of_forward():
    model = tiny(0.5)
    q, start = questions(), torch.full((B, 1), EQUALS)
    generated = model.generate(q, start, max_new=8, end_id=-1)
    tokens = start
    for _ in range(8):
        tokens = torch.cat([tokens, model(q, tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, tokens[:, 1:])
    assert len(generated.unique()) > 1


def test_generate_pads_every_row_after_its_end():
    model = tiny(0.5)
    q, start = questions(), torch.full((B, 1), EQUALS)
    free = model.generate(q, start, max_new=8, end_id=-1)
    end_id = int(free[0, 2])
    generated = model.generate(q, start, max_new=8, end_id=end_id)
    for row_free, row in zip(free, generated):
        hits = (row_free == end_id).nonzero()
        stop = int(hits[0]) + 1 if len(hits) else 8
        assert torch.equal(row[:stop], row_free[:stop])
        assert (row[stop:] == PAD).all()


def test_generate_encodes_once_and_stops_when_every_row_has_ended(monkeypatch):
    model = tiny()
    # Row 0 ends at step 1, row 1 at step 3: decoding must stop after 4 steps of 6.
    script = torch.tensor([[3, END, 5, 5, 5, 5], [4, 4, 4, END, 7, 7]])
    calls = {"encode": 0, "decode": 0}
    encode = model.encode

    def counting_encode(question):
        calls["encode"] += 1
        return encode(question)

    def scripted_decode(inputs, memory, bias):
        calls["decode"] += 1
        return F.one_hot(script[:, : inputs.shape[1]], VOCAB_SIZE).float()

    monkeypatch.setattr(model, "encode", counting_encode)
    monkeypatch.setattr(model, "decode", scripted_decode)
    generated = model.generate(questions()[:2], torch.full((2, 1), EQUALS), max_new=6, end_id=END)
    assert torch.equal(generated, torch.tensor([[3, END, PAD, PAD, PAD, PAD], [4, 4, 4, END, PAD, PAD]]))
    assert calls == {"encode": 1, "decode": 4}


def test_full_teacher_forcing_returns_the_inputs_without_a_forward_pass():
    model = tiny()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    inputs = decoder_inputs()
    assert scheduled_inputs(model, questions(), inputs, 1.0) is inputs
    assert calls == []


def test_no_teacher_forcing_feeds_back_the_shifted_predictions():
    model = tiny(0.5)
    q, inputs = questions(), decoder_inputs()
    predicted = model(q, inputs).argmax(-1)
    mixed = scheduled_inputs(model, q, inputs, 0.0)
    assert torch.equal(mixed, torch.cat([inputs[:, :1], predicted[:, :-1]], dim=1))


def test_intermediate_teacher_prob_mixes_reproducibly():
    model = tiny(0.5)
    q = questions().repeat(8, 1)
    inputs = decoder_inputs().repeat(8, 1)
    fed_back = torch.cat([inputs[:, :1], model(q, inputs).argmax(-1)[:, :-1]], dim=1)
    torch.manual_seed(0)
    mixed = scheduled_inputs(model, q, inputs, 0.7)
    torch.manual_seed(0)
    assert torch.equal(scheduled_inputs(model, q, inputs, 0.7), mixed)
    assert torch.equal(mixed[:, 0], inputs[:, 0])
    assert ((mixed == inputs) | (mixed == fed_back)).all()
    differ = inputs != fed_back
    kept = (mixed == inputs)[differ].float().mean()
    assert differ.sum() > 100 and 0.55 < kept < 0.85


@pytest.mark.parametrize("training", [True, False])
def test_scheduled_inputs_preserves_the_mode_and_predicts_without_dropout(training):
    model = tiny(0.5, dropout=0.5)
    q, inputs = questions(), decoder_inputs()
    predicted = model.eval()(q, inputs).argmax(-1)
    model.train(training)
    mixed = scheduled_inputs(model, q, inputs, 0.0)
    assert all(m.training == training for m in model.modules())
    assert torch.equal(mixed[:, 1:], predicted[:, :-1])

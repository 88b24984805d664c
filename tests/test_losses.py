"""Unit tests for ngdiff_ds.losses against a hand-written float64 token loop."""

from __future__ import annotations

import math

import pytest
import torch

from ngdiff_ds.losses import (
    FORGET_LOSSES,
    RETAIN_LOSSES,
    IGNORE_INDEX,
    answer_nll,
    gradient_ascent_loss,
    per_example_nll,
)

VOCAB = 11


def reference_per_example_nll(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Float64 loop: logits[b, t] predicts labels[b, t+1]; mean over unmasked targets, else 0."""
    batch_size, seq_len, _ = logits.shape
    results = []
    for b in range(batch_size):
        total, count = 0.0, 0
        for t in range(seq_len - 1):
            target = int(labels[b, t + 1])
            if target == IGNORE_INDEX:
                continue
            row = logits[b, t].double()
            log_normaliser = math.log(sum(math.exp(float(v - row.max())) for v in row))
            log_prob = float(row[target] - row.max()) - log_normaliser
            total += -log_prob
            count += 1
        results.append(total / count if count else 0.0)
    return results


def qa_labels(
    question_lengths: list[int], answer_lengths: list[int], seq_len: int, seed: int = 0
) -> torch.Tensor:
    """Labels laid out as [question (-100)] [answer tokens] [padding (-100)] per example."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.full((len(question_lengths), seq_len), IGNORE_INDEX, dtype=torch.long)
    for b, (q, a) in enumerate(zip(question_lengths, answer_lengths)):
        labels[b, q : q + a] = torch.randint(0, VOCAB, (a,), generator=generator)
    return labels


def random_logits(batch_size: int, seq_len: int, seed: int = 0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch_size, seq_len, VOCAB, generator=generator) * 3).to(dtype)


def test_per_example_nll_matches_float64_loop():
    labels = qa_labels([2, 1, 4], [3, 5, 1], seq_len=8)
    logits = random_logits(3, 8)
    result = per_example_nll(logits, labels)
    assert result.dtype == torch.float32
    assert result.shape == (3,)
    assert result.tolist() == pytest.approx(reference_per_example_nll(logits, labels), rel=1e-6)


def test_answer_nll_is_mean_of_per_example_means():
    # Example 0 has one answer token, example 1 has five: each still weighs one half.
    labels = qa_labels([3, 1], [1, 5], seq_len=7, seed=1)
    logits = random_logits(2, 7, seed=1)
    per_example = reference_per_example_nll(logits, labels)
    assert float(answer_nll(logits, labels)) == pytest.approx(sum(per_example) / 2, rel=1e-6)

    # ...which is not the token mean over the batch.
    token_mean = (per_example[0] * 1 + per_example[1] * 5) / 6
    assert float(answer_nll(logits, labels)) != pytest.approx(token_mean, rel=1e-3)


def test_masked_positions_do_not_change_the_loss():
    labels = qa_labels([2, 3], [2, 2], seq_len=8, seed=2)
    logits = random_logits(2, 8, seed=2)
    baseline = per_example_nll(logits, labels)

    # Positions whose next token is masked (question, padding, the last position) do not count.
    next_is_masked = torch.ones_like(labels, dtype=torch.bool)
    next_is_masked[:, :-1] = labels[:, 1:] == IGNORE_INDEX
    changed = logits.clone()
    changed[next_is_masked] = torch.randn(int(next_is_masked.sum()), VOCAB) * 100
    torch.testing.assert_close(per_example_nll(changed, labels), baseline, rtol=0, atol=0)

    # Sanity check of the test: changing a position that predicts an answer token does matter.
    answer_position = int((~next_is_masked[0]).nonzero()[0])
    changed[0, answer_position] += torch.arange(VOCAB, dtype=torch.float32)
    assert per_example_nll(changed, labels)[0] != baseline[0]


def test_micro_batches_average_to_whole_batch_loss_and_gradient():
    # A tiny linear "model" so that the gradient of a shared parameter can be compared.
    generator = torch.Generator().manual_seed(3)
    batch_size, seq_len, hidden = 6, 9, 5
    inputs = torch.randn(batch_size, seq_len, hidden, generator=generator, dtype=torch.float64)
    labels = qa_labels([1, 3, 2, 4, 0, 2], [3, 1, 6, 2, 8, 4], seq_len, seed=3)
    weight = torch.randn(hidden, VOCAB, generator=generator, dtype=torch.float64)

    whole_weight = weight.clone().requires_grad_()
    whole_loss = answer_nll(inputs @ whole_weight, labels)
    whole_loss.backward()

    num_micro_batches = 3
    micro_weight = weight.clone().requires_grad_()
    micro_losses = []
    for micro_inputs, micro_labels in zip(
        inputs.chunk(num_micro_batches), labels.chunk(num_micro_batches)
    ):
        micro_loss = answer_nll(micro_inputs @ micro_weight, micro_labels)
        (micro_loss / num_micro_batches).backward()  # gradient accumulation, as in the trainer
        micro_losses.append(float(micro_loss.detach()))

    assert sum(micro_losses) / num_micro_batches == pytest.approx(float(whole_loss.detach()), rel=1e-12)
    torch.testing.assert_close(micro_weight.grad, whole_weight.grad, rtol=1e-12, atol=1e-14)


def test_gradient_ascent_loss_is_negative_answer_nll():
    labels = qa_labels([1, 2], [4, 3], seq_len=7, seed=4)
    logits = random_logits(2, 7, seed=4)
    batch = {"labels": labels}
    assert float(gradient_ascent_loss(logits, batch)) == -float(answer_nll(logits, labels))
    assert FORGET_LOSSES.bind("ga") is gradient_ascent_loss
    assert float(RETAIN_LOSSES.bind("nll")(logits, batch)) == float(answer_nll(logits, labels))


def test_all_masked_example_gives_zero_and_finite_gradient():
    labels = qa_labels([2, 6], [3, 0], seq_len=6, seed=5)  # example 1 has no answer token
    logits = random_logits(2, 6, seed=5).requires_grad_()

    assert per_example_nll(logits, labels).detach()[1] == 0.0
    loss = answer_nll(logits, labels)
    expected = reference_per_example_nll(logits.detach(), labels)
    assert float(loss.detach()) == pytest.approx(sum(expected) / 2, rel=1e-6)

    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[1] == 0).all()


def test_batch_with_no_answer_tokens_at_all():
    labels = torch.full((2, 5), IGNORE_INDEX)
    logits = random_logits(2, 5).requires_grad_()
    loss = answer_nll(logits, labels)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert (logits.grad == 0).all()


def test_bf16_logits_use_float32_math():
    labels = qa_labels([1, 2, 0], [5, 4, 6], seq_len=8, seed=6)
    logits = random_logits(3, 8, seed=6, dtype=torch.bfloat16)
    result = per_example_nll(logits, labels)
    assert result.dtype == torch.float32
    # Reference on the exact bf16 values: only float32 rounding is allowed, not bf16 rounding.
    assert result.tolist() == pytest.approx(reference_per_example_nll(logits, labels), rel=1e-6)


def test_float64_logits_stay_float64():
    labels = qa_labels([1], [4], seq_len=6, seed=7)
    logits = random_logits(1, 6, seed=7, dtype=torch.float64)
    result = per_example_nll(logits, labels)
    assert result.dtype == torch.float64
    assert result.tolist() == pytest.approx(reference_per_example_nll(logits, labels), rel=1e-12)


@pytest.mark.parametrize(
    "logits_shape, labels_shape",
    [((2, 5, VOCAB), (2, 4)), ((2, 5), (2, 5)), ((2, 5, VOCAB), (3, 5))],
)
def test_shape_mismatch_rejected(logits_shape, labels_shape):
    logits = torch.zeros(logits_shape)
    labels = torch.zeros(labels_shape, dtype=torch.long)
    with pytest.raises(ValueError):
        per_example_nll(logits, labels)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_length_grouped_batches_give_the_whole_batch_loss_and_gradient(micro_batches):
    """run_finetune's length groups, weighted by their share of the examples, reproduce the
    loss and gradient of the whole batch collated in one piece (float64 model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ngdiff_ds.data.batching import StepBatches
    from ngdiff_ds.data.task import TaskData

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB + 3, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=0)
    model = LlamaForCausalLM(config).double()
    lengths = [6, 5, 40, 7, 6, 38, 5, 6]
    examples = []
    for length in lengths:
        ids = torch.randint(1, VOCAB, (length,)).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 2 + ids[2:]})
    micro = len(examples) // micro_batches
    data = TaskData("mixed", examples, StepBatches(len(examples), micro, micro_batches, 1, seed=0), 0)

    def loss_and_grad(batches, weights):
        model.zero_grad()
        total = sum(w * answer_nll(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                   b["labels"]) for b, w in zip(batches, weights))
        total.backward()
        return total.item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    grouped, weights = data.length_grouped_batches(0, 0, "cpu")
    # every micro-batch is cut in two (a side with no row runs a zero-weight stand-in)
    assert len(grouped) == 2 * micro_batches
    assert sum(b["input_ids"].shape[0] for b, w in zip(grouped, weights) if w > 0) == 8
    assert sum(weights) == pytest.approx(1.0)
    loss, grad = loss_and_grad(grouped, weights)
    whole_loss, whole_grad = loss_and_grad(data.micro_batches(0, 0, "cpu"),
                                           [1.0 / micro_batches] * micro_batches)
    assert loss == pytest.approx(whole_loss, rel=1e-10)
    assert torch.allclose(grad, whole_grad, rtol=1e-8, atol=1e-12)

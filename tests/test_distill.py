"""moee.distill: the KD loss, the training loop, dict (BERT) batches, seeding and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import blob_images, text_batches, tiny_bert, tiny_moe_model, tiny_vit
from transformers import BertConfig, BertModel

import moee
from moee.losses import kd_loss

# ---- helpers ------------------------------------------------------------------------------


def extract_bert(dense: BertModel, work_dir) -> moee.MoEModel:
    config = moee.ExtractConfig(
        record=moee.RecordConfig(n_tokens=600),
        cluster=moee.ClusterConfig(min_cluster_fraction=0.05, min_samples=5, reduce_dims=8),
        work_dir=str(work_dir), progress=False)
    moe_model, report = moee.extract(dense, text_batches(), config)
    assert moe_model.moe_layers(), report.table()
    return moe_model


def image_data(n_batches: int = 4) -> list[torch.Tensor]:
    images = blob_images(n=24 * n_batches)
    return list(images.split(24))


# ---- kd_loss ------------------------------------------------------------------------------


def reference_kd(student: list[list[float]], teacher: list[list[float]], t: float) -> float:
    """sum over rows and classes of p_t * (log p_t - log p_s), / rows, * t^2, in plain Python."""
    def log_softmax(row: list[float]) -> list[float]:
        z = [v / t for v in row]
        m = max(z)
        lse = m + math.log(sum(math.exp(v - m) for v in z))
        return [v - lse for v in z]

    total = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        log_ps, log_pt = log_softmax(s_row), log_softmax(t_row)
        total += sum(math.exp(lt) * (lt - ls) for lt, ls in zip(log_pt, log_ps, strict=True))
    return total / len(student) * t * t


STUDENT = [[1.0, -0.5, 2.0, 0.0], [0.3, 0.3, -1.2, 4.0], [-2.0, 1.5, 0.5, 0.25]]
TEACHER = [[0.5, 0.0, 3.0, -1.0], [1.0, -0.7, 0.2, 2.5], [-1.0, 2.5, -0.5, 0.0]]


@pytest.mark.parametrize("t", [1.0, 2.0, 0.5])
def test_kd_loss_matches_hand_computed_kl(t):
    got = kd_loss(torch.tensor(STUDENT, dtype=torch.float64),
                  torch.tensor(TEACHER, dtype=torch.float64), t)
    want = reference_kd(STUDENT, TEACHER, t)
    assert want > 0.01  # the fixed tensors really differ
    assert abs(float(got) - want) <= 1e-12 * max(1.0, want)  # float64: rounding only


def test_kd_loss_on_sequence_logits_averages_over_every_token():
    """(B, T, V) logits: rows = B*T tokens, not B examples."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    te = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    got = float(kd_loss(s, te, 2.0))
    want = reference_kd(s.reshape(6, 5).tolist(), te.reshape(6, 5).tolist(), 2.0)
    assert abs(got - want) <= 1e-12 * max(1.0, want)
    # float32 inputs: the same value to float32 rounding (stated tolerance 1e-6 relative).
    got32 = float(kd_loss(s.float(), te.float(), 2.0))
    assert abs(got32 - want) <= 1e-6 * max(1.0, want)


def test_kd_loss_is_zero_for_identical_logits():
    x = torch.tensor(STUDENT)
    assert abs(float(kd_loss(x, x.clone(), 3.0))) < 1e-7


# ---- the training loop --------------------------------------------------------------------


def test_loss_decreases_on_a_tiny_model():
    """A randomly initialised tiny ViT predicts near-uniform classes and 6-neuron random
    experts barely move them, so the student would start at a KL of ~3e-5: nothing to learn.
    A confident teacher head and a student head drawn afresh give a gap to close."""
    student, teacher = tiny_moe_model(), tiny_vit()
    head = student.model.classifier.weight
    with torch.no_grad():
        teacher.classifier.weight.mul_(10)
        head.copy_(torch.randn(head.shape, generator=torch.Generator().manual_seed(3)))
    losses = moee.distill(student, teacher, image_data(),
                          moee.DistillConfig(epochs=5, lr=1e-2))
    assert len(losses) == 20
    assert all(math.isfinite(v) for v in losses)
    assert losses[0] > 0.1, losses  # a real gap at the start
    assert sum(losses[-4:]) / 4 < losses[0] / 10, losses
    assert student.training is False and not any(m.training for m in student.modules())


def test_one_step_updates_the_shared_union_weights_and_not_the_teacher():
    student, teacher = tiny_moe_model(), tiny_vit()
    layers = student.moe_layers()
    assert len(layers) == 2
    before = {n: m.fc1.weight.detach().clone() for n, m in layers.items()}
    fc2_before = {n: m.fc2.weight.detach().clone() for n, m in layers.items()}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    losses = moee.distill(student, teacher, image_data(),
                          moee.DistillConfig(epochs=0.25, lr=1e-2))
    assert len(losses) == 1
    for n, m in layers.items():
        assert not torch.equal(m.fc1.weight, before[n]), f"{n}.fc1 got no gradient"
        assert not torch.equal(m.fc2.weight, fc2_before[n]), f"{n}.fc2 got no gradient"
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), f"teacher {k} changed"


@pytest.mark.parametrize(("epochs", "steps"), [(1.5, 6), (0.25, 1), (1.0, 4), (2.0, 8)])
def test_epochs_sets_the_number_of_steps(epochs, steps):
    calls = []
    losses = moee.distill(tiny_moe_model(), tiny_vit(), image_data(4),
                          moee.DistillConfig(epochs=epochs),
                          on_step=lambda i, loss: calls.append((i, loss)))
    assert len(losses) == steps
    assert calls == list(enumerate(losses))


def test_an_iterable_without_length_is_read_once():
    data = image_data(4)
    losses = moee.distill(tiny_moe_model(), tiny_vit(), iter(data),
                          moee.DistillConfig(epochs=1.5))
    assert len(losses) == 6


# ---- dict batches (BERT) ------------------------------------------------------------------


def test_dict_batches_use_mse_over_real_tokens_only(tmp_path):
    teacher = tiny_bert(dropout=0.0)
    student = extract_bert(teacher, tmp_path)
    batch = text_batches(1, seed=5)[0]
    mask = batch["attention_mask"].bool()
    assert not mask.all()  # the batch has padding
    student.train()
    with torch.no_grad():
        s = student(**batch).last_hidden_state
        t = teacher(**batch).last_hidden_state
    assert getattr(teacher(**batch), "logits", None) is None
    want = float(F.mse_loss(s[mask], t[mask]))
    everything = float(F.mse_loss(s, t))
    kl = float(kd_loss(s[mask], t[mask], 1.0))
    # The reference is distinguishable from the two wrong answers.
    assert abs(want - everything) > 1e-3 * want and abs(want - kl) > 1e-3 * want

    losses = moee.distill(student, teacher, [batch], moee.DistillConfig(epochs=1, lr=1e-3))
    assert len(losses) == 1
    assert losses[0] == pytest.approx(want, rel=1e-6)
    assert student.training is False


def test_pooled_cosine_loss_is_one_minus_cosine_of_masked_mean_embeddings(tmp_path):
    teacher = tiny_bert(dropout=0.0)
    student = extract_bert(teacher, tmp_path)
    batch = text_batches(1, seed=5)[0]
    mask = batch["attention_mask"]
    assert not mask.bool().all()  # the batch has padding
    torch.manual_seed(0)
    with torch.no_grad():  # a student far enough from its teacher for fp32 to resolve the loss
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    student.train()
    with torch.no_grad():
        s = student(**batch).last_hidden_state.double()
        t = teacher(**batch).last_hidden_state.double()
    # Reference written per sentence: the mean of its real tokens, then 1 - cosine.
    per_sentence = []
    for i in range(len(mask)):
        real = mask[i].bool()
        a, b = s[i][real].mean(0), t[i][real].mean(0)
        per_sentence.append(1 - float(a @ b / (a.norm() * b.norm())))
    want = sum(per_sentence) / len(per_sentence)
    with_padding = float((1 - F.cosine_similarity(s.mean(1), t.mean(1), dim=-1)).mean())
    assert abs(want - with_padding) > 1e-3 * want  # padding would change the value

    losses = moee.distill(student, teacher, [batch],
                          moee.DistillConfig(epochs=1, lr=1e-3, loss="pooled_cosine"))
    assert losses[0] == pytest.approx(want, rel=1e-4)


def test_sequence_classification_logits_are_not_masked_as_tokens():
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=32, num_labels=16,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        attn_implementation="eager")
    teacher = BertForSequenceClassification(config).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.classifier.weight.mul_(-1)
    batch = text_batches(1)[0]  # (8, 16) tokens with padding, and 16 labels
    with torch.no_grad():
        want = float(kd_loss(student(**batch).logits, teacher(**batch).logits, 1.0))
    losses = moee.distill(student, teacher, [batch], moee.DistillConfig(epochs=1))
    assert losses[0] == pytest.approx(want, rel=1e-6)


def test_seed_makes_dropout_runs_reproducible(tmp_path):
    teacher = tiny_bert(dropout=0.1)
    student = extract_bert(teacher, tmp_path)
    data = text_batches(3, seed=2)
    runs = {}
    state = torch.random.get_rng_state()
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        runs[name] = moee.distill(copy.deepcopy(student), teacher, data,
                                  moee.DistillConfig(epochs=1, lr=1e-3, seed=seed))
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]
    # The run's draws come from a forked generator: the caller's stream is untouched.
    assert torch.equal(torch.random.get_rng_state(), state)


def test_without_dropout_the_loss_is_deterministic_and_the_moe_layers_still_learn(tmp_path):
    teacher = tiny_bert(dropout=0.3)
    student = extract_bert(teacher, tmp_path)
    data = text_batches(2, seed=2)
    runs = {}
    for name, seed, dropout in (("a", 7, False), ("b", 8, False), ("c", 7, True)):
        s = copy.deepcopy(student)
        before = {n: p.clone() for n, p in s.named_parameters()}
        runs[name] = moee.distill(s, teacher, data, moee.DistillConfig(
            epochs=1, lr=1e-3, seed=seed, dropout=dropout))
        moved = [n for n, p in s.named_parameters() if not torch.equal(p, before[n])]
        assert any("intermediate" in n for n in moved)  # gradients reach the MoE layers
    assert runs["a"] == pytest.approx(runs["b"], rel=1e-6)  # no random draw left
    assert runs["a"][0] != pytest.approx(runs["c"][0], rel=1e-3)  # dropout changes the loss
    # The first step's loss is the eval-mode divergence.
    with torch.no_grad():
        batch = data[0]
        want = F.mse_loss(*(m(**batch).last_hidden_state[batch["attention_mask"].bool()]
                            for m in (student.eval(), teacher.eval())))
    assert runs["a"][0] == pytest.approx(float(want), rel=1e-4)


# ---- bad input ----------------------------------------------------------------------------


def test_empty_data_is_a_clear_error():
    with pytest.raises(moee.EmptyDataError):
        moee.distill(tiny_moe_model(), tiny_vit(), [])
    with pytest.raises(moee.EmptyDataError):
        moee.distill(tiny_moe_model(), tiny_vit(), iter([]))


def test_unknown_loss_names_the_field():
    with pytest.raises(moee.ConfigError, match=r"distill\.loss"):
        moee.DistillConfig(loss="bogus")
    with pytest.raises(moee.ConfigError, match=r"distill\.epochs"):
        moee.DistillConfig(epochs=0)

"""The stages that make experts reproduce their layer: output errors and oracle labels, the
fitted router, the least-squares refit; each against an exact reference."""

import numpy as np
import pytest
import torch
from test_api import small_config

import moee
from moee.extraction.down_refit import _moments, _solve, refit_down
from moee.extraction.output_error import expert_errors, held_out_rows, relative_error
from moee.extraction.router_fit import fit_router


def _layer(seed=0, n=600, width=12, d_out=5):
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((n, width)).astype(np.float32)
    down = rng.standard_normal((d_out, width)).astype(np.float32)
    experts = [np.array([0, 1, 2, 3, 4, 5, 6]), np.array([3, 4, 5, 6, 7, 8, 9, 10]),
               np.array([0, 2, 9, 10, 11])]
    return rng, hidden, down, experts


def test_expert_errors_equal_the_direct_computation_and_label_the_exact_expert():
    rng, hidden, down, experts = _layer()
    owner = rng.integers(0, 3, len(hidden))
    for t, e in enumerate(owner):  # each token lives on its expert's neurons only
        outside = np.setdiff1d(np.arange(hidden.shape[1]), experts[e])
        hidden[t, outside] = 0
    offsets = rng.standard_normal((3, down.shape[0])).astype(np.float32) * 0.01
    errors = expert_errors(hidden, down, experts, offsets)
    for t in (0, 17, 311):
        for e in range(3):
            y_e = down[:, experts[e]] @ hidden[t, experts[e]] + offsets[e]
            assert errors[t, e] == pytest.approx(((down @ hidden[t] - y_e) ** 2).sum(), rel=1e-4)
    assert (errors.argmin(1) == owner).mean() > 0.99  # offsets are tiny: only ties could differ


def test_refit_solution_equals_lstsq_of_the_stacked_ridge_system():
    rng, hidden, down, experts = _layer(seed=1)
    kept = np.unique(np.concatenate(experts))
    position = np.full(hidden.shape[1], -1)
    position[kept] = np.arange(len(kept))
    routed = rng.integers(0, 3, len(hidden))
    everything = np.ones(len(hidden), dtype=bool)
    (m,) = _moments(hidden, [everything], down.astype(np.float64), experts, position, routed)
    u, k = len(kept), len(experts)
    prior = rng.standard_normal((u + k, down.shape[0]))
    penalty = np.concatenate([np.full(u, 3.0), np.full(k, 1e-6)])
    theta = _solve(m, prior, penalty, u + k)
    # Reference: every token's masked features and one-hot offset, plus sqrt(λ) prior rows.
    z = np.zeros((len(hidden), u + k))
    for t, e in enumerate(routed):
        z[t, position[experts[e]]] = hidden[t, experts[e]]
        z[t, u + e] = 1.0
    y = hidden.astype(np.float64) @ down.T.astype(np.float64)
    root = np.sqrt(penalty)[:, None]
    a = torch.as_tensor(np.concatenate([z, np.diag(np.sqrt(penalty))]))
    b = torch.as_tensor(np.concatenate([y, root * prior]))
    expected = torch.linalg.lstsq(a, b).solution.numpy()
    np.testing.assert_allclose(theta, expected, rtol=1e-6, atol=1e-8)
    # Offsets held at the prior (an export without expert biases): the union columns alone,
    # fitted to the target minus each token's fixed offset.
    held = _solve(m, prior, penalty, u)
    fixed = y - prior[u:][routed]
    a = torch.as_tensor(np.concatenate([z[:, :u], np.diag(np.sqrt(penalty[:u]))]))
    b = torch.as_tensor(np.concatenate([fixed, root[:u] * prior[:u]]))
    np.testing.assert_allclose(held[:u], torch.linalg.lstsq(a, b).solution.numpy(),
                               rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(held[u:], prior[u:])


def test_refit_lowers_held_out_error_and_keeps_the_original_when_it_cannot():
    rng, hidden, down, experts = _layer(seed=2, n=2048)
    hidden[:, 11] = hidden[:, 0] + hidden[:, 1]  # a left-out neuron others can stand in for
    kept = np.unique(np.concatenate(experts))
    routed = rng.integers(0, 3, len(hidden))
    held = held_out_rows(len(hidden), 0.25, block=64)
    offsets = np.zeros((3, down.shape[0]), np.float32)
    refit = refit_down(hidden, down, experts, kept, offsets, routed, held, (0.01, 0.1, 1.0))
    assert refit.report["heldout_error_after"] < refit.report["heldout_error_before"]
    full = [np.arange(12)] * 3  # every expert exact: nothing to gain, weights unchanged
    same = refit_down(hidden, down, full, np.arange(12), offsets, routed, held, (0.01, 1.0))
    np.testing.assert_allclose(same.down, down, atol=1e-4)
    np.testing.assert_allclose(same.offsets, 0, atol=1e-4)


def test_fitted_router_learns_a_linear_rule_and_beats_a_bad_baseline():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3000, 6)).astype(np.float32)
    best = (x @ rng.standard_normal((6, 3))).argmax(1)  # a linear rule decides the best expert
    errors = np.ones((3000, 3))
    errors[np.arange(3000), best] = 0.0
    energy = np.full(3000, 3.0)
    held = held_out_rows(3000, 0.2, block=100)
    baseline = rng.integers(0, 3, 3000)
    fitted = fit_router(x, errors, held, baseline, energy, (0.1, 10.0), 10_000)
    assert fitted.report["fitted_agreement"] > 0.95 > fitted.report["baseline_agreement"]
    choice = (x @ fitted.rows.T).argmax(1)  # the engine's "dot" routing on the rows
    assert relative_error(errors, fitted.experts[choice], energy) < 0.05
    assert fitted_router_is_kept_out_when_one_expert_serves_all(x, held, energy)


def fitted_router_is_kept_out_when_one_expert_serves_all(x, held, energy) -> bool:
    errors = np.ones((len(x), 3))
    errors[:, 1] = 0.0
    return fit_router(x, errors, held, np.ones(len(x), int), energy, (1.0,), 1000) is None


def test_held_out_rows_are_whole_blocks():
    mask = held_out_rows(4000, 0.2, block=100)
    assert mask.sum() == 800 and mask[400:500].all() and not mask[:400].any()
    assert 0.15 < held_out_rows(768, 0.2).mean() < 0.25  # few tokens: smaller blocks


def test_reproducing_stages_are_exact_at_p_1(vit, images, tmp_path):
    """At p = 1 every expert is the whole layer: the refit keeps the dense weights and the
    router has nothing to choose, so the model equals the dense one."""
    config = small_config(tmp_path)
    config = moee.ExtractConfig(**{**config.__dict__,
                                   "select": moee.SelectConfig(p=1.0, refit_down=True),
                                   "router": moee.RouterConfig(centres="fitted")})
    batches = [images[i : i + 40] for i in range(0, 240, 40)]
    moe_model, report = moee.extract(vit, batches, config)
    with torch.no_grad():
        assert torch.allclose(moe_model(images[:20]).logits, vit(images[:20]).logits, atol=1e-5)
    assert all("refit" in r["reproduction"] for r in report.layers)


@pytest.mark.parametrize("top_k", [1, 2])
def test_the_refit_reuses_the_fits_routing_and_gives_the_same_model(vit, images, tmp_path,
                                                                   monkeypatch, top_k):
    """The refit takes each token's expert from the fit (routed once per layer) instead of
    routing every recorded token again for each plan; the model is the one it gives when it
    routes them itself."""
    import moee.extraction.fit as fit
    import moee.extraction.reproduce as reproduce

    config = moee.ExtractConfig(**{**small_config(tmp_path).__dict__,
                                   "router": moee.RouterConfig(top_k=top_k)})
    batches = [images[i : i + 40] for i in range(0, 240, 40)]
    with_routing, _ = moee.extract(vit, batches, config)
    calls = []
    original = reproduce.route_tokens
    monkeypatch.setattr(reproduce, "route_tokens",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    again, _ = moee.extract(vit, batches, config)
    assert calls == []  # the refit routed nothing itself
    real = fit.reproduce_output
    monkeypatch.setattr(fit, "reproduce_output", lambda *a: real(*a[:-1], None))  # route anew
    routed_anew, _ = moee.extract(vit, batches, config)
    assert calls  # now it did
    with torch.no_grad():
        for model in (again, routed_anew):
            torch.testing.assert_close(model(images[:16]).logits,
                                       with_routing(images[:16]).logits, rtol=0, atol=0)


def test_static_method_is_one_expert_for_every_token(vit, images, tmp_path):
    config = small_config(tmp_path).with_method("static")
    batches = [images[i : i + 40] for i in range(0, 240, 40)]
    moe_model, report = moee.extract(vit, batches, config)
    assert all(r["experts"] == 1 for r in report.layers)
    assert all(m.num_experts == 1 for m in moe_model.moe_layers().values())


def _llama_batches(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, 50, (4, 16), generator=g)} for _ in range(n)]


def test_fitted_router_and_refit_on_a_gated_model_run_exactly_and_save(tmp_path):
    """A tiny LLaMA through both stages: the held-out error never rises, every MoE layer's
    engine equals the per-token reference, and the checkpoint reloads to the same logits."""
    from tiny_models import FAMILIES

    dense = FAMILIES["hf-llama"][0]()
    config = moee.ExtractConfig(
        record=moee.RecordConfig(n_tokens=768),
        cluster=moee.ClusterConfig(algorithm="kmeans", n_clusters=3, reduce_dims=8,
                                   stability=False),
        select=moee.SelectConfig(p=0.7, refit_down=True),
        router=moee.RouterConfig(centres="fitted"), work_dir=str(tmp_path / "w"),
        progress=False)
    moe_model, report = moee.extract(dense, _llama_batches(), config)
    for row in report.layers:
        refit = row["reproduction"]["refit"]
        assert refit["heldout_error_after"] <= refit["heldout_error_before"]
        assert abs(sum(row["load_share"]) - 1) < 1e-9 and len(row["load_share"]) == row[
            "expert_sizes"].__len__()
    x = torch.randn(30, 16)
    for layer in moe_model.moe_layers().values():
        torch.testing.assert_close(layer(x), layer.forward_reference(x), atol=1e-5, rtol=1e-5)
    ids = _llama_batches(1, seed=5)[0]
    moe_model.save_pretrained(tmp_path / "ckpt")
    again = moee.MoEModel.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(again.model(**ids).logits, moe_model.model(**ids).logits)


def test_activation_threshold_is_exact_at_zero_and_meets_its_mac_target():
    from tiny_models import FAMILIES

    from moee.activation_threshold import ThresholdMLP, keep_share, sparsify_activations

    dense = FAMILIES["hf-llama"][0]()
    batches = _llama_batches(4)
    exact = sparsify_activations(dense, batches, 1.0, n_tokens=256)
    for m in exact.modules():
        if isinstance(m, ThresholdMLP):
            m.threshold = 0.0
    with torch.no_grad():
        torch.testing.assert_close(exact(**batches[0]).logits, dense(**batches[0]).logits)
    sparse = sparsify_activations(dense, batches, 0.6, n_tokens=256)
    with torch.no_grad():
        for b in batches:
            sparse(**b)
    site = moee.find_mlp_sites(dense)[0]
    assert keep_share(site, 0.6) == pytest.approx((0.6 * 48 - 16) / 32)
    dense_macs = 48 * 3 * 16  # gate, up and down: 48 neurons of 16 inputs / outputs each
    for m in sparse.modules():
        if isinstance(m, ThresholdMLP):  # calibrated on these very tokens
            assert m.macs_per_token() / dense_macs == pytest.approx(0.6, abs=0.02)
    with pytest.raises(moee.ConfigError, match="first projection"):
        keep_share(site, 0.2)


def test_layer_local_distillation_lowers_held_out_error_and_resumes(tmp_path):
    from tiny_models import FAMILIES

    dense = FAMILIES["hf-llama"][0]()
    config = moee.ExtractConfig(
        record=moee.RecordConfig(n_tokens=768),
        cluster=moee.ClusterConfig(algorithm="kmeans", n_clusters=3, reduce_dims=8,
                                   stability=False),
        select=moee.SelectConfig(p=0.7), local=moee.LocalDistillConfig(steps=30, lr=1e-2),
        work_dir=str(tmp_path), progress=False)
    first, report = moee.extract(dense, _llama_batches(), config)
    for row in report.layers:
        local = row["reproduction"]["local"]
        assert local["heldout_error_after"] <= local["heldout_error_before"]
    assert any(row["reproduction"]["local"]["kept"] for row in report.layers)
    again, report = moee.extract(dense, _llama_batches(), config)  # every layer from disk
    assert all(row["reproduction"]["local"] == {"reused": True} for row in report.layers)
    ids = _llama_batches(1, seed=5)[0]
    with torch.no_grad():
        torch.testing.assert_close(again.model(**ids).logits, first.model(**ids).logits)


def test_labels_within_a_size_budget_trade_error_for_cost():
    from moee.extraction.router_fit import labels_within

    errors = np.array([[0.0, 1.0], [0.0, 0.2], [0.0, 5.0], [0.0, 0.1]])  # expert 0 always exact
    sizes = np.array([10, 2])
    assert labels_within(errors, sizes, 10).tolist() == [0, 0, 0, 0]  # no constraint binds
    # Half the tokens must move to the small expert: those it serves best (0.1 and 0.2).
    assert labels_within(errors, sizes, 6).tolist() == [0, 1, 0, 1]
    assert labels_within(errors, sizes, 2).tolist() == [1, 1, 1, 1]

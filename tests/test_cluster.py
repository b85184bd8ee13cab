import numpy as np
import pytest

from moee.config import ClusterConfig
from moee.extraction.cluster import TooFewTokensError, cluster_layer, unstable_remedy


def blobs(n_per: int = 150, centers: int = 3, dim: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, dim)) * 10
    return np.concatenate([c[i] + rng.normal(size=(n_per, dim)) for i in range(centers)])


@pytest.mark.parametrize("algorithm", ["hdbscan", "dbscan", "optics", "kmeans", "birch"])
def test_every_algorithm_finds_separated_blobs(algorithm):
    config = ClusterConfig(algorithm=algorithm, min_cluster_fraction=0.05, min_samples=5,
                           reduce_dims=None, n_clusters=3, eps=4.0, stability=False)
    result = cluster_layer(blobs(), config)
    assert result.n_clusters == 3
    truth = np.repeat(np.arange(3), 150)
    for c in range(3):  # each cluster lies inside one true blob
        assert len(np.unique(truth[result.labels == c])) == 1


def test_stability_high_on_clear_structure_and_pca_path():
    config = ClusterConfig(min_cluster_fraction=0.05, min_samples=5, reduce_dims=4)
    result = cluster_layer(blobs(dim=40), config)
    assert result.n_clusters == 3 and result.stability > 0.9


def test_no_structure_gives_no_clusters_or_noise():
    rng = np.random.default_rng(0)
    config = ClusterConfig(min_cluster_fraction=0.4, min_samples=5, reduce_dims=None,
                           stability=False)
    result = cluster_layer(rng.uniform(size=(200, 6)), config)
    assert result.n_clusters <= 1


def test_too_few_tokens_is_a_clear_error():
    with pytest.raises(TooFewTokensError, match="fewer than the minimum cluster size"):
        cluster_layer(np.zeros((1, 4)), ClusterConfig())


def test_max_clusters_merges_the_nearest_clusters_and_keeps_noise():
    from moee.extraction.cluster import merge_clusters

    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0], [1, 0], [20, 0], [21, 0], [0, 40]])  # pairs 0-1 and 2-3
    truth = np.repeat(np.arange(5), 40)
    z = centres[truth] + rng.normal(scale=0.1, size=(200, 2))
    labels = truth.copy()
    labels[::7] = -1  # noise
    merged = merge_clusters(z, labels, 3)
    assert np.array_equal(merged[labels < 0], labels[labels < 0])
    assert sorted(np.unique(merged[merged >= 0])) == [0, 1, 2]
    groups = {tuple(np.unique(truth[(merged == c)])) for c in range(3)}
    assert groups == {(0, 1), (2, 3), (4,)}
    assert np.array_equal(merge_clusters(z, labels, 5), labels)  # nothing to merge

    config = ClusterConfig(algorithm="kmeans", n_clusters=5, max_clusters=3, reduce_dims=None,
                           stability=False, min_cluster_fraction=0.05)
    result = cluster_layer(z, config)
    assert result.n_clusters == 3 and int(result.labels.max()) == 2


def test_a_clustered_subsample_assigns_the_rest_and_leaves_outliers_noise():
    x = blobs(n_per=400, dim=40)
    outliers = np.random.default_rng(1).normal(size=(6, 40)) * 60
    x = np.concatenate([x, outliers])
    config = ClusterConfig(min_cluster_fraction=0.05, min_samples=5, reduce_dims=4,
                           stability=False, max_tokens=300)
    result = cluster_layer(x, config)
    truth = np.repeat(np.arange(3), 400)
    labelled = result.labels[:1200] >= 0
    assert result.n_clusters == 3 and labelled.mean() > 0.9  # most of the rest assigned
    for c in range(3):  # and to the cluster of its own blob
        assert len(np.unique(truth[result.labels[:1200] == c])) == 1
    assert (result.labels[1200:] == -1).all()
    assert result.noise_fraction == pytest.approx((result.labels < 0).mean())


def test_unstable_layer_remedies_act_only_below_their_threshold():
    x = np.random.default_rng(1).uniform(size=(400, 6))  # no structure: k-means cuts vary
    base = ClusterConfig(algorithm="kmeans", n_clusters=4, min_cluster_fraction=0.05,
                         reduce_dims=None)
    plain = cluster_layer(x, base)
    s = plain.stability
    assert plain.n_clusters == 4 and -1 < s < 0.99
    above = ClusterConfig(**{**base.__dict__, "dense_below_stability": s - 0.01,
                             "merge_below_stability": s - 0.01})
    assert np.array_equal(unstable_remedy(plain, above).labels, plain.labels)
    dense = unstable_remedy(plain, ClusterConfig(**{**base.__dict__,
                                                   "dense_below_stability": s + 0.01}))
    assert dense.n_clusters == 0 and (dense.labels == -1).all() and dense.stability == s
    merged = unstable_remedy(plain, ClusterConfig(**{**base.__dict__,
                                                    "merge_below_stability": s + 0.01}))
    assert merged.n_clusters == 1
    assert np.array_equal(merged.labels, np.where(plain.labels >= 0, 0, -1))


def test_a_remedy_needs_the_stability_score():
    from moee.errors import ConfigError

    with pytest.raises(ConfigError, match="dense_below_stability"):
        ClusterConfig(stability=False, dense_below_stability=0.5)


def test_unset_optional_settings_leave_cache_keys_unchanged():
    from dataclasses import replace

    from moee.config import ExtractConfig
    from moee.extraction.cluster_cache import clustering_key
    from moee.util.cache_key import settings_dict

    base = ExtractConfig()
    assert "dense_below_stability" not in settings_dict(base.cluster)
    assert settings_dict(ClusterConfig(max_clusters=3))["max_clusters"] == 3
    merged = replace(base, cluster=ClusterConfig(max_clusters=3))
    assert clustering_key({}, base, 0) != clustering_key({}, merged, 0)
    # a remedy acts on the cached clustering: it reuses it
    remedied = replace(base, cluster=ClusterConfig(dense_below_stability=0.2))
    assert clustering_key({}, base, 0) == clustering_key({}, remedied, 0)


def test_making_the_default_clusterer_keeps_torchs_thread_count():
    """fast_hdbscan's first import raises torch's thread count; moee puts it back (in a fresh
    process, where the import is really the first)."""
    import subprocess
    import sys

    code = ("import torch; torch.set_num_threads(1)\n"
            "from moee.extraction.cluster import make_clusterer\n"
            "from moee.config import ClusterConfig\n"
            "make_clusterer(ClusterConfig(), 100)\nprint(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


@pytest.mark.slow
def test_raw_activations_cluster_without_pca():
    """`reduce_dims=None` (CLI --reduce-dims 0) clusters the raw hidden vectors: above about
    30 dimensions fast_hdbscan takes its approximate path, which needs pynndescent."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 48)) * 10
    x = (centres[rng.integers(0, 3, 900)] + rng.standard_normal((900, 48))).astype(np.float32)
    result = cluster_layer(x, ClusterConfig(reduce_dims=None, min_cluster_fraction=0.05,
                                            stability=False))
    assert result.n_clusters == 3

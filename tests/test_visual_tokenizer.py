"""Hierarchical k-means visual tokenizer: planted clusters, determinism, save/load, errors."""
import pytest
import torch

from videobert.visual_tokenizer import HierarchicalKMeans


def planted(gen, groups=3, subgroups=3, per=40, dim=8):
    """Features of groups x subgroups tight blobs: sub-blobs near their group's centre, groups far apart."""
    centres = torch.randn(groups, 1, dim, generator=gen) * 50
    subs = centres + torch.randn(groups, subgroups, dim, generator=gen) * 5
    points = subs[:, :, None, :] + 0.1 * torch.randn(groups, subgroups, per, dim, generator=gen)
    leaf = torch.arange(groups * subgroups).repeat_interleave(per)
    perm = torch.randperm(leaf.numel(), generator=gen)
    return points.reshape(-1, dim)[perm], leaf[perm]


@pytest.mark.parametrize("engine", ["torch", "faiss"])
@pytest.mark.parametrize("seed", range(5))
def test_planted_clusters_are_recovered_as_paths(seed, engine):
    if engine == "faiss":
        pytest.importorskip("faiss", reason="faiss is not installed (pip install faiss-cpu)")
    gen = torch.Generator().manual_seed(seed)
    x, leaf = planted(gen)
    tok = HierarchicalKMeans(levels=2, branching=3, iterations=10, seed=seed, engine=engine).fit(x)
    tokens = tok.encode(x)
    assert tok.vocab_size == 9 and tokens.min() >= 0 and tokens.max() < 9
    # one token per planted leaf, and different leaves get different tokens
    pairs = set(zip(leaf.tolist(), tokens.tolist()))
    assert len(pairs) == 9 and len({t for _, t in pairs}) == 9
    # the first level is the group: leaves of one group share the token's leading digit
    group_of_token = {t // 3 for lf, t in pairs if lf // 3 == 0}
    assert len(group_of_token) == 1


def test_fit_and_encode_are_deterministic_and_decode_gives_leaf_centroids():
    gen = torch.Generator().manual_seed(2)
    x, _ = planted(gen, groups=2, subgroups=2, per=10)
    a = HierarchicalKMeans(levels=3, branching=2, iterations=5, seed=7, engine="torch").fit(x)
    b = HierarchicalKMeans(levels=3, branching=2, iterations=5, seed=7, engine="torch").fit(x)
    for ca, cb in zip(a.centroids, b.centroids):
        assert torch.equal(ca, cb)
    assert torch.equal(a.encode(x), b.encode(x))
    centroids = a.decode(a.encode(x))
    assert centroids.shape == x.shape


def test_nodes_with_few_or_no_points():
    x = torch.tensor([[0.0, 0.0], [10.0, 10.0], [10.0, 10.5]])
    tok = HierarchicalKMeans(levels=3, branching=4, iterations=3).fit(x)
    tokens = tok.encode(x)
    assert tokens.shape == (3,) and len(set(tokens.tolist())) == 3
    assert tok.encode(torch.tensor([[100.0, -5.0]])).item() < tok.vocab_size  # unseen features still map


def test_save_load_round_trip_and_errors(tmp_path):
    gen = torch.Generator().manual_seed(3)
    x, _ = planted(gen, groups=2, subgroups=2, per=5)
    tok = HierarchicalKMeans(levels=2, branching=2, iterations=3).fit(x)
    path = tmp_path / "visual.safetensors"
    tok.save(path)
    loaded = HierarchicalKMeans.load(path)
    assert (loaded.levels, loaded.branching, loaded.feature_dim) == (2, 2, 8)
    assert torch.equal(loaded.encode(x), tok.encode(x))
    assert [p.name for p in tmp_path.iterdir()] == ["visual.safetensors"]  # no temporary left behind
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:  # plain tensors and string metadata: nothing to unpickle
        assert sorted(f.keys()) == ["centroids.0", "centroids.1"] and f.metadata()["branching"] == "2"
    from videobert.config import VideoBERTConfig

    loaded.check_config(VideoBERTConfig.tiny(num_visual_tokens=4))
    with pytest.raises(ValueError, match="num_visual_tokens=20736, the visual tokenizer 4"):
        loaded.check_config(VideoBERTConfig.tiny())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HierarchicalKMeans.load(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_text("not a tokenizer")
    with pytest.raises(ValueError, match="bad.pt is not a visual tokenizer file"):
        HierarchicalKMeans.load(tmp_path / "bad.pt")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors", metadata={"format": "something else"})
    with pytest.raises(ValueError, match="other.safetensors is not a visual tokenizer file"):
        HierarchicalKMeans.load(tmp_path / "other.safetensors")
    torch.save({"format": "videobert.visual_tokenizer/1"}, tmp_path / "old.pt")  # an earlier version's pickle
    with pytest.raises(ValueError, match="old.pt is a visual tokenizer of an earlier videobert .* --fit"):
        HierarchicalKMeans.load(tmp_path / "old.pt")
    with pytest.raises(ValueError, match="features must have dimension 8"):
        tok.encode(torch.randn(3, 5))
    with pytest.raises(ValueError, match="NaN or infinite"):
        tok.encode(torch.full((1, 8), float("nan")))
    with pytest.raises(RuntimeError, match="not fitted"):
        HierarchicalKMeans().encode(x)
    with pytest.raises(ValueError, match="branching must be an int >= 2"):
        HierarchicalKMeans(branching=1)
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 4\)"):
        tok.decode(torch.tensor([4]))


def test_bad_settings_and_inputs_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="engine must be 'auto', 'torch' or 'faiss'"):
        HierarchicalKMeans(engine="sklearn")
    with pytest.raises(ValueError, match="features must be a 2-D floating-point tensor"):
        HierarchicalKMeans().fit(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one clip"):
        HierarchicalKMeans().fit(torch.zeros(0, 3))
    from videobert.real_data import DataError
    from videobert.visual_tokenizer import tokenize_folder

    (tmp_path / "features").mkdir()
    with pytest.raises(DataError, match="no .npy feature files"):
        tokenize_folder(tmp_path, tmp_path / "tok.pt")

"""Visual tokenizer: hierarchical k-means over clip features, as in the VideoBERT paper (4 levels x 12
clusters = 20736 visual words by default).

Level l splits every node of level l - 1 into `branching` clusters by k-means over the features routed to it;
a feature's token is its path through the tree read as a number in base `branching` (so tokens that share a
prefix are near in feature space). Engines: faiss' k-means per node for CPU features when faiss is installed,
else (and for CUDA features) a torch implementation that runs all nodes of a level together in batched ops,
chunked so memory stays bounded, with k-means++ seeding. Deterministic given the seed (the torch engine
bit for bit). Saved as one safetensors file: the centroids of each level and the settings as its metadata
(nothing is unpickled; the torch.save files of earlier versions are pickles and are refused, saying to refit).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch

from videobert._optional import require

FORMAT = "videobert.visual_tokenizer/2"  # /1: a torch.save pickle, no longer read
SETTINGS = ("levels", "branching", "iterations", "seed")  # the file's metadata besides the format
TOKEN_CLIPS = "token_clips.json"  # in a data folder: per visual token, the clip nearest its centroid


def _faiss():
    """The faiss module, or None when it is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


class HierarchicalKMeans:
    """A fitted or empty tree of `levels` x `branching` clusters; `fit`, `encode`, `save`, `load`."""

    def __init__(self, levels: int = 4, branching: int = 12, iterations: int = 20, seed: int = 0,
                 chunk_size: int = 8192, engine: str = "auto"):
        for name, value, low in (("levels", levels, 1), ("branching", branching, 2), ("iterations", iterations, 1),
                                 ("chunk_size", chunk_size, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if engine not in ("auto", "torch", "faiss"):
            raise ValueError(f"engine must be 'auto', 'torch' or 'faiss', got {engine!r}")
        self.levels, self.branching, self.iterations, self.seed = levels, branching, iterations, seed
        self.chunk_size, self.engine = chunk_size, engine
        # centroids[l]: (branching ** l, branching, F), the children of every node of level l
        self.centroids: list[torch.Tensor] = []

    @property
    def vocab_size(self) -> int:
        """Number of visual tokens: branching ** levels."""
        return self.branching ** self.levels

    @property
    def feature_dim(self) -> int:
        """Dimension of the features the tree was fitted on."""
        self._require_fitted()
        return self.centroids[0].shape[-1]

    def _require_fitted(self) -> None:
        if not self.centroids:
            raise RuntimeError("the tokenizer is not fitted: call fit(features) or HierarchicalKMeans.load(path)")

    def _check_features(self, features: torch.Tensor, expected_dim: Optional[int]) -> torch.Tensor:
        if not isinstance(features, torch.Tensor) or features.dim() != 2 or not features.is_floating_point():
            raise ValueError("features must be a 2-D floating-point tensor (clips, feature_dim), got "
                             f"{getattr(features, 'shape', type(features).__name__)}")
        if expected_dim is not None and features.shape[1] != expected_dim:
            raise ValueError(f"features must have dimension {expected_dim} (the fitted one), got {features.shape[1]}")
        if not bool(torch.isfinite(features).all()):
            raise ValueError("features contain NaN or infinite values")
        return features.float()

    def _nearest_child(self, x: torch.Tensor, node: torch.Tensor, level: int) -> torch.Tensor:
        """Index in [0, branching) of the nearest child of each point's node, in chunks of points."""
        out = torch.empty_like(node)
        for start in range(0, x.shape[0], self.chunk_size):
            xs, ns = x[start:start + self.chunk_size], node[start:start + self.chunk_size]
            children = self.centroids[level][ns]  # (chunk, branching, F)
            dist = (children * children).sum(-1) - 2 * torch.einsum("nf,nkf->nk", xs, children)
            out[start:start + xs.shape[0]] = dist.argmin(-1)
        return out

    def fit(self, features: torch.Tensor) -> "HierarchicalKMeans":
        """Fit the tree on (N, F) features (N >= 1); returns self."""
        x = self._check_features(features, None)
        if x.shape[0] == 0:
            raise ValueError("features must hold at least one clip")
        gen = torch.Generator().manual_seed(self.seed)
        k, N = self.branching, x.shape[0]
        node = torch.zeros(N, dtype=torch.long, device=x.device)
        faiss = _faiss() if self.engine != "torch" and x.device.type == "cpu" else None
        if self.engine == "faiss" and faiss is None:
            require("faiss", "video", "engine='faiss' (k-means on CPU features)")
        self.centroids = []
        for level in range(self.levels):
            nodes = k ** level
            if faiss is not None:
                self.centroids.append(self._fit_level_faiss(faiss, x, node, nodes))
                node = node * k + self._nearest_child(x, node, level)
                continue
            centroids = self._init(x, node, nodes, gen)
            self.centroids.append(centroids)
            for _ in range(self.iterations):
                child = self._nearest_child(x, node, level)
                slot = node * k + child
                sums = torch.zeros(nodes * k, x.shape[1], device=x.device).index_add_(0, slot, x)
                counts = torch.bincount(slot, minlength=nodes * k).to(x.dtype)
                updated = sums / counts.clamp(min=1)[:, None]
                flat = centroids.view(nodes * k, -1)
                # An empty cluster keeps its centroid (it may still win points later in the iteration).
                flat.copy_(torch.where(counts[:, None] > 0, updated, flat))
            node = node * k + self._nearest_child(x, node, level)
        return self

    def _fit_level_faiss(self, faiss, x: torch.Tensor, node: torch.Tensor, nodes: int) -> torch.Tensor:
        """(nodes, k, F) centroids of one level with faiss' k-means per node (CPU)."""
        k = self.branching
        centroids = torch.zeros(nodes, k, x.shape[1])
        order = torch.argsort(node, stable=True)
        counts = torch.bincount(node, minlength=nodes).tolist()
        start = 0
        for index, count in enumerate(counts):
            members = x[order[start:start + count]]
            start += count
            if count == 0:
                continue
            if count <= k:  # too few points to cluster: each is a centroid (cycled)
                centroids[index] = members[torch.arange(k) % count]
                continue
            # Several restarts, keeping the best: faiss seeds at random (no k-means++).
            km = faiss.Kmeans(x.shape[1], k, niter=self.iterations, seed=self.seed + index, nredo=5, verbose=False,
                              min_points_per_centroid=1)
            km.train(members.numpy())
            centroids[index] = torch.from_numpy(km.centroids)
        return centroids

    def _init(self, x: torch.Tensor, node: torch.Tensor, nodes: int, gen: torch.Generator) -> torch.Tensor:
        """(nodes, k, F) initial centroids by k-means++ within every node at once: each next centre is a member
        drawn with probability proportional to its squared distance to the nearest centre so far (an exponential
        race per node). Nodes with fewer than k distinct members repeat one; nodes with none get zeros."""
        N, k = x.shape[0], self.branching
        centroids = torch.zeros(nodes, k, x.shape[1], device=x.device)
        nearest = torch.full((N,), float("inf"), device=x.device)
        index = torch.arange(N, device=x.device)
        for j in range(k):
            u = torch.rand(N, generator=gen, dtype=torch.float64).to(x.device).clamp(min=1e-300)
            weight = torch.where(torch.isinf(nearest), 1.0, nearest.double())
            key = -torch.log(u) / weight  # smallest key wins: P(win) is proportional to weight
            best = torch.full((nodes,), float("inf"), device=x.device, dtype=key.dtype)
            best = best.scatter_reduce(0, node, key, "amin")
            winner = torch.full((nodes,), N, device=x.device).scatter_reduce(
                0, node, torch.where(key == best[node], index, N), "amin")
            centroids[:, j] = torch.where((winner < N)[:, None], x[winner.clamp(max=N - 1)], 0.0)
            nearest = torch.minimum(nearest, ((x - centroids[node, j]) ** 2).sum(-1))
        return centroids

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """(N,) int64 tokens in [0, vocab_size) of (N, F) features: the path through the tree."""
        self._require_fitted()
        x = self._check_features(features, self.feature_dim).to(self.centroids[0].device)
        node = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        for level in range(self.levels):
            node = node * self.branching + self._nearest_child(x, node, level)
        return node

    def check_config(self, config) -> None:
        """Raise ValueError unless the model config's visual vocabulary is this tokenizer's."""
        if config.num_visual_tokens != self.vocab_size:
            raise ValueError(f"the model config has num_visual_tokens={config.num_visual_tokens}, the visual "
                             f"tokenizer {self.vocab_size} ({self.levels} levels x {self.branching})")

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, F) leaf centroids of tokens (what a visual word stands for)."""
        self._require_fitted()
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.numel() and not bool(((tokens >= 0) & (tokens < self.vocab_size)).all()):
            raise ValueError(f"tokens must lie in [0, {self.vocab_size})")
        return self.centroids[-1].view(self.vocab_size, -1)[tokens.to(self.centroids[-1].device)]

    def save(self, path: Union[str, Path]) -> None:
        """Write the centroids (tensors `centroids.<level>`) and the settings (metadata) to `path` as safetensors,
        atomically (a temporary file renamed into place)."""
        from safetensors.torch import save_file

        self._require_fitted()
        path = Path(path)
        tensors = {f"centroids.{level}": c.detach().cpu().contiguous() for level, c in enumerate(self.centroids)}
        metadata = {"format": FORMAT, **{name: str(getattr(self, name)) for name in SETTINGS}}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> "HierarchicalKMeans":
        """A tokenizer saved by `save`; raises ValueError naming the file when it is not one."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"visual tokenizer file {path} does not exist")
        with open(path, "rb") as f:
            if f.read(2) == b"PK":  # a zip: torch.save's format
                raise ValueError(f"{path} is a visual tokenizer of an earlier videobert (a pickle, which is not read): "
                                 "fit it again with videobert tokenize-video DATA --fit")
        try:
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{path} is not a visual tokenizer file ({exc})") from exc
        if metadata.get("format") != FORMAT or not all(name in metadata for name in SETTINGS):
            raise ValueError(f"{path} is not a visual tokenizer file (format {FORMAT} expected)")
        tok = cls(*(int(metadata[name]) for name in SETTINGS))
        centroids = [tensors.get(f"centroids.{level}") for level in range(len(tensors))]
        k = tok.branching
        if (len(centroids) != tok.levels or
                any(c is None or tuple(c.shape[:2]) != (k ** level, k) for level, c in enumerate(centroids)) or
                len({c.shape[-1] for c in centroids}) != 1):
            raise ValueError(f"{path}: centroid shapes do not match levels={tok.levels}, branching={k}")
        tok.centroids = [c.float().to(device) for c in centroids]
        return tok


def tokenize_folder(root: Union[str, Path], tokenizer_path: Union[str, Path], fit: bool = False,
                    max_fit_clips: int = 200_000, levels: int = 4, branching: int = 12, iterations: int = 20,
                    seed: int = 0, log=print) -> HierarchicalKMeans:
    """Write tokens/<id>.npy for every features/<id>.npy of a data folder (see `videobert.real_data`), with the
    tokenizer at `tokenizer_path`, fitted first (on up to `max_fit_clips` clips, spread over the videos, and
    saved there) when `fit` or when the file does not exist; and token_clips.json, per visual token the clip
    nearest its centroid among the clips it was given (what pictures of the token show)."""
    import json

    import numpy as np

    from videobert.real_data import DataError, read_features

    root, tokenizer_path = Path(root), Path(tokenizer_path)
    features_dir = root / "features"
    ids = sorted(p.stem for p in features_dir.glob("*.npy"))
    if not ids:
        raise DataError(f"{features_dir}: no .npy feature files")
    dim = None

    def features(video_id: str) -> torch.Tensor:
        nonlocal dim
        array = read_features(features_dir / f"{video_id}.npy", dim)
        dim = array.shape[1]
        return torch.from_numpy(array)

    if fit or not tokenizer_path.exists():
        per_video = max(1, max_fit_clips // len(ids))
        gen = torch.Generator().manual_seed(seed)
        parts = []
        for video_id in ids:
            x = features(video_id)
            keep = torch.randperm(x.shape[0], generator=gen)[:per_video]
            parts.append(x[keep.sort().values])
        fit_on = torch.cat(parts)
        log(f"fitting {levels} x {branching} hierarchical k-means on {fit_on.shape[0]} clips of {len(ids)} videos")
        tokenizer = HierarchicalKMeans(levels, branching, iterations, seed).fit(fit_on)
        tokenizer.save(tokenizer_path)
    else:
        tokenizer = HierarchicalKMeans.load(tokenizer_path)
        dim = tokenizer.feature_dim
    out_dir = root / "tokens"
    out_dir.mkdir(exist_ok=True)
    nearest: dict[int, tuple[float, str, int]] = {}  # token -> (squared distance, video, clip)
    for count, video_id in enumerate(ids, 1):
        x = features(video_id)
        encoded = tokenizer.encode(x)
        distances = ((x.to(encoded.device) - tokenizer.decode(encoded)) ** 2).sum(-1)
        for clip, (token, distance) in enumerate(zip(encoded.tolist(), distances.tolist())):
            if token not in nearest or distance < nearest[token][0]:
                nearest[token] = (distance, video_id, clip)
        tmp = out_dir / f".{video_id}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, encoded.cpu().numpy())
        os.replace(tmp, out_dir / f"{video_id}.npy")
        if count % 100 == 0 or count == len(ids):
            log(f"tokenized {count}/{len(ids)} videos")
    clips = {str(token): {"video": video_id, "clip": clip} for token, (_, video_id, clip) in sorted(nearest.items())}
    tmp = root / ".token_clips.json.tmp"
    tmp.write_text(json.dumps({"tokenizer": str(tokenizer_path), "tokens": clips}) + "\n")
    os.replace(tmp, root / TOKEN_CLIPS)
    return tokenizer

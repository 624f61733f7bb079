"""Raw video to clip features, as the paper prepared them: decode with PyAV, resample to 20 fps, cut 30-frame
(1.5 s) clips, run a video backbone, write one (clips, F) float32 `.npy` per video, and keep one small
thumbnail per clip (its middle frame) for pictures of visual tokens.

A final clip with fewer than half its frames (under 0.75 s of video) is dropped; a longer one repeats its last
frame. The backbone is torchvision's Kinetics-400 S3D (the paper's network; 1024-d features), its weights from a
local state-dict file (`weights`) or torch hub's cache (downloaded there when online), or any `torch.nn.Module`
taking (B, 3, T, H, W) and returning (B, F) (further dimensions are averaged). Frames go through the backbone's
own preprocessing: S3D's weights' transforms (resize, centre crop, Kinetics normalisation), a module's
`transforms` attribute (torchvision-style: (T, 3, H, W) uint8 -> (3, T, H', W') floats), else
`default_preprocess`. PyAV is optional: `pip install av`.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from videobert._optional import require

FPS = 20
CLIP_FRAMES = 30
THUMBNAIL_SIZE = 64
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)

Preprocess = Callable[[torch.Tensor], torch.Tensor]


class Backbone(NamedTuple):
    """A feature network in eval mode and the preprocessing its weights expect."""

    module: torch.nn.Module
    preprocess: Preprocess


def _av():
    return require("av", "video", "decoding video")


def clips(path: Union[str, Path], fps: int = FPS, clip_frames: int = CLIP_FRAMES) -> Iterator[torch.Tensor]:
    """(clip_frames, 3, H, W) uint8 frames of each clip of a video resampled to `fps` (each target time takes the
    last decoded frame at or before it). A final clip with fewer than half its frames is dropped; a longer one
    repeats its last frame."""
    av = _av()
    path = Path(path)
    try:
        container = av.open(str(path))
    except Exception as exc:  # PyAV raises several error types for unreadable files
        raise ValueError(f"{path}: cannot open video ({exc})") from exc
    with container:
        stream = container.streams.video[0]
        frames: list[torch.Tensor] = []
        next_time, last = 0.0, None
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            t = float(frame.pts * stream.time_base)
            image = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
            while last is not None and next_time < t:
                frames.append(last)
                next_time += 1.0 / fps
                if len(frames) == clip_frames:
                    yield torch.stack(frames)
                    frames = []
            last = image
        if last is not None:
            frames.append(last)
        if 2 * len(frames) >= clip_frames:
            yield torch.stack(frames + [frames[-1]] * (clip_frames - len(frames)))


def default_preprocess(size: int = 224) -> Preprocess:
    """Kinetics-style preprocessing for a backbone without its own: the shorter side resized to size * 8 / 7
    (256 for 224), a centre crop of size x size, Kinetics' mean and std."""
    resize = round(size * 8 / 7)
    mean, std = torch.tensor(KINETICS_MEAN).view(3, 1, 1, 1), torch.tensor(KINETICS_STD).view(3, 1, 1, 1)

    def preprocess(frames: torch.Tensor) -> torch.Tensor:
        video = _square_crop(frames.float() / 255.0, resize, size)
        return (video.permute(1, 0, 2, 3) - mean) / std
    return preprocess


def _square_crop(frames: torch.Tensor, resize: int, crop: int) -> torch.Tensor:
    """(T, C, H, W) float frames with the shorter side resized to `resize`, centre-cropped to crop x crop."""
    h, w = frames.shape[-2:]
    scale = resize / min(h, w)
    frames = F.interpolate(frames, size=(max(crop, round(h * scale)), max(crop, round(w * scale))),
                           mode="bilinear", align_corners=False, antialias=True)
    top, left = (frames.shape[-2] - crop) // 2, (frames.shape[-1] - crop) // 2
    return frames[..., top:top + crop, left:left + crop]


def thumbnail(frames: torch.Tensor, size: int = THUMBNAIL_SIZE) -> np.ndarray:
    """(size, size, 3) uint8 picture of a clip: its middle frame, centre square, resized."""
    middle = frames[frames.shape[0] // 2: frames.shape[0] // 2 + 1].float()
    return _square_crop(middle, size, size)[0].round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def _load_state(module: torch.nn.Module, path: Path, what: str) -> None:
    """Load a state-dict file into `module`, or ValueError naming the file and what it should hold."""
    if not path.is_file():
        raise ValueError(f"--weights {path}: file does not exist (expected a state dict of {what})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        module.load_state_dict(state)
    except Exception as exc:  # unpickling and load_state_dict raise several types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"--weights {path}: not a state dict of {what} ({reason})") from None


def _s3d_weights_file(url: str) -> Path:
    """torch hub's cached copy of the S3D weights, downloaded when missing; ValueError saying which file to fetch
    and where to put it when that fails (offline)."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not cached.is_file():
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(cached), progress=False)
        except Exception as exc:  # urllib and OSError variants: no network, proxy, disk
            raise ValueError(f"the S3D weights are not on this machine and cannot be downloaded "
                             f"({type(exc).__name__}): fetch {url} and pass it with --weights PATH, or put it at "
                             f"{cached}") from None
    return cached


def load_backbone(spec: str = "s3d", weights: Optional[Union[str, Path]] = None, size: int = 224) -> Backbone:
    """"s3d" (torchvision's Kinetics-400 S3D without its classifier, with its weights' preprocessing) or
    "package.module:factory" returning a module (its `transforms`, else `default_preprocess(size)`); `weights`
    a local state-dict file of that network."""
    if spec == "s3d":
        video = require("torchvision.models.video", "video",
                        "the S3D backbone (or pass --backbone package.module:factory)")
        known = video.S3D_Weights.KINETICS400_V1
        model = video.s3d(weights=None)
        _load_state(model, Path(weights) if weights else _s3d_weights_file(known.url), "torchvision's S3D")
        model.classifier = torch.nn.Identity()
        return Backbone(model.eval(), known.transforms())
    module_name, _, factory = spec.partition(":")
    if not factory:
        raise ValueError(f"--backbone must be 's3d' or 'package.module:factory', got {spec!r}")
    try:
        model = getattr(importlib.import_module(module_name), factory)()
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--backbone {spec}: cannot make the module ({exc})") from None
    if weights:
        _load_state(model, Path(weights), spec)
    own = getattr(model, "transforms", None)
    return Backbone(model.eval(), own if own is not None else default_preprocess(size))


@torch.no_grad()
def extract_features(video_dir: Union[str, Path], out_dir: Union[str, Path], backbone: Backbone,
                     batch_size: int = 8, device: Union[str, torch.device] = "cpu",
                     thumbnails: Optional[Union[str, Path]] = None, thumbnail_size: int = THUMBNAIL_SIZE,
                     log: Callable[[str], None] = print) -> list[Path]:
    """Write <out_dir>/<stem>.npy (clips, F) for every video file of `video_dir`, and with `thumbnails` a folder,
    <thumbnails>/<stem>.npy (clips, size, size, 3) uint8; returns the feature files written. A video shorter
    than half a clip has no clip: it is skipped, saying so."""
    video_dir, out_dir = Path(video_dir), Path(out_dir)
    videos = sorted(p for p in video_dir.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES) if video_dir.is_dir() else []
    if not videos:
        raise ValueError(f"{video_dir}: no video files ({', '.join(VIDEO_SUFFIXES)})")
    out_dir.mkdir(parents=True, exist_ok=True)
    if thumbnails is not None:
        Path(thumbnails).mkdir(parents=True, exist_ok=True)
    module = backbone.module.to(device)
    written = []
    for index, path in enumerate(videos, 1):
        features, batch, pictures = [], [], []
        for frames in clips(path):
            batch.append(backbone.preprocess(frames))
            if thumbnails is not None:
                pictures.append(thumbnail(frames, thumbnail_size))
            if len(batch) == batch_size:
                features.append(_embed(module, batch, device))
                batch = []
        if batch:
            features.append(_embed(module, batch, device))
        if not features:
            log(f"[{index}/{len(videos)}] {path.name}: skipped (shorter than half a clip, "
                f"{CLIP_FRAMES / FPS / 2} s)")
            continue
        array = np.concatenate(features).astype(np.float32)
        if thumbnails is not None:
            _save_npy(Path(thumbnails) / f"{path.stem}.npy", np.stack(pictures))
        written.append(_save_npy(out_dir / f"{path.stem}.npy", array))
        log(f"[{index}/{len(videos)}] {path.name}: {array.shape[0]} clips x {array.shape[1]} features")
    return written


def _save_npy(target: Path, array: np.ndarray) -> Path:
    tmp = target.with_name(f".{target.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, target)
    return target


def _embed(backbone: torch.nn.Module, batch: list[torch.Tensor], device) -> np.ndarray:
    out = backbone(torch.stack(batch).to(device))
    if out.dim() > 2:
        out = out.flatten(2).mean(-1)
    return out.float().cpu().numpy()

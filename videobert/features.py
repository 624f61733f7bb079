"""Raw video to clip features, as the paper prepared them: decode with PyAV, resample to 20 fps, cut 30-frame
(1.5 s) clips, run a video backbone, write one (clips, F) float32 `.npy` per video.

The backbone is torchvision's Kinetics-400 S3D (the paper's network; 1024-d features) when torchvision and its
weights are available, or any `torch.nn.Module` taking (B, 3, T, H, W) floats in [0, 1] normalised as
Kinetics and returning (B, F) (further dimensions are averaged). PyAV is optional: `pip install av`.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Callable, Iterator, Union

import numpy as np
import torch

from videobert._optional import require
import torch.nn.functional as F

FPS = 20
CLIP_FRAMES = 30
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")
_MEAN = torch.tensor([0.43216, 0.394666, 0.37645]).view(3, 1, 1, 1)
_STD = torch.tensor([0.22803, 0.22145, 0.216989]).view(3, 1, 1, 1)


def _av():
    return require("av", "video", "decoding video")


def clips(path: Union[str, Path], size: int = 224, fps: int = FPS, clip_frames: int = CLIP_FRAMES
          ) -> Iterator[torch.Tensor]:
    """(3, clip_frames, size, size) float clips in [0, 1] of a video resampled to `fps` (each target time takes
    the last decoded frame at or before it; a final partial clip repeats its last frame)."""
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
                    yield _to_clip(frames, size)
                    frames = []
            last = image
        if last is not None:
            frames.append(last)
        if frames:
            frames += [frames[-1]] * (clip_frames - len(frames))
            yield _to_clip(frames, size)


def _to_clip(frames: list[torch.Tensor], size: int) -> torch.Tensor:
    video = torch.stack(frames).float() / 255.0  # (T, 3, H, W)
    video = F.interpolate(video, size=(size, size), mode="bilinear", align_corners=False)
    return video.permute(1, 0, 2, 3).contiguous()  # (3, T, H, W)


def load_backbone(spec: str = "s3d") -> torch.nn.Module:
    """"s3d" (torchvision Kinetics-400 S3D without its classifier) or "package.module:factory" returning a
    module."""
    if spec == "s3d":
        video = require("torchvision.models.video", "video",
                        "the S3D backbone (or pass --backbone package.module:factory)")
        model = video.s3d(weights=video.S3D_Weights.KINETICS400_V1)
        model.classifier = torch.nn.Identity()
        return model.eval()
    module_name, _, factory = spec.partition(":")
    if not factory:
        raise ValueError(f"backbone must be 's3d' or 'package.module:factory', got {spec!r}")
    return getattr(importlib.import_module(module_name), factory)().eval()


@torch.no_grad()
def extract_features(video_dir: Union[str, Path], out_dir: Union[str, Path], backbone: torch.nn.Module,
                     size: int = 224, batch_size: int = 8, device: Union[str, torch.device] = "cpu",
                     log: Callable[[str], None] = print) -> list[Path]:
    """Write <out_dir>/<stem>.npy (clips, F) for every video file of `video_dir`; returns the written paths."""
    video_dir, out_dir = Path(video_dir), Path(out_dir)
    videos = sorted(p for p in video_dir.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES) if video_dir.is_dir() else []
    if not videos:
        raise ValueError(f"{video_dir}: no video files ({', '.join(VIDEO_SUFFIXES)})")
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone = backbone.to(device)
    written = []
    for index, path in enumerate(videos, 1):
        features, batch = [], []
        for clip in clips(path, size):
            batch.append((clip - _MEAN) / _STD)
            if len(batch) == batch_size:
                features.append(_embed(backbone, batch, device))
                batch = []
        if batch:
            features.append(_embed(backbone, batch, device))
        array = np.concatenate(features).astype(np.float32)
        target = out_dir / f"{path.stem}.npy"
        tmp = out_dir / f".{path.stem}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, target)
        written.append(target)
        log(f"[{index}/{len(videos)}] {path.name}: {array.shape[0]} clips x {array.shape[1]} features")
    return written


def _embed(backbone: torch.nn.Module, batch: list[torch.Tensor], device) -> np.ndarray:
    out = backbone(torch.stack(batch).to(device))
    if out.dim() > 2:
        out = out.flatten(2).mean(-1)
    return out.float().cpu().numpy()

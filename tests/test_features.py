"""Raw video to clip features with PyAV and a tiny backbone (a video the test writes itself)."""
import numpy as np
import pytest
import torch

av = pytest.importorskip("av", reason="PyAV is not installed (pip install av)")

from videobert.features import clips, extract_features  # noqa: E402


def tiny_backbone():
    """A random 3D-conv backbone giving 8 features per clip (also loadable as 'test_features:tiny_backbone')."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(3, 8, kernel_size=3, stride=2), torch.nn.AdaptiveAvgPool3d(1),
                               torch.nn.Flatten())


def write_video(path, seconds=2.0, fps=25, size=32):
    """An MPEG-4 file of grey frames whose level changes every frame."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(int(seconds * fps)):
            image = np.full((size, size, 3), (i * 5) % 255, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_clips_are_20fps_30_frame_windows(tmp_path):
    write_video(tmp_path / "a.mp4", seconds=2.0)
    out = list(clips(tmp_path / "a.mp4", size=16))
    assert len(out) == 2  # 40 frames at 20 fps: one full clip and one padded
    assert all(c.shape == (3, 30, 16, 16) and 0 <= c.min() and c.max() <= 1 for c in out)
    assert torch.equal(out[1][:, -1], out[1][:, 20])  # padding repeats the last frame
    # brightness increases over time: resampled frames keep their order
    means = out[0].mean(dim=(0, 2, 3))
    assert (means[1:] >= means[:-1] - 1e-3).all()


def test_extract_features_writes_one_npy_per_video(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "b.mp4", seconds=1.0)
    write_video(videos / "a.mp4", seconds=3.1)
    (videos / "notes.txt").write_text("not a video")
    written = extract_features(videos, tmp_path / "features", tiny_backbone(), size=16, batch_size=2,
                               log=lambda m: None)
    assert [p.name for p in written] == ["a.npy", "b.npy"]
    a, b = (np.load(p) for p in written)
    assert a.shape == (3, 8) and b.shape == (1, 8) and a.dtype == np.float32
    with pytest.raises(ValueError, match="no video files"):
        extract_features(tmp_path / "features", tmp_path / "x", tiny_backbone())


def test_extract_features_command(tmp_path, capsys):
    from videobert.cli import main

    (tmp_path / "v").mkdir()
    write_video(tmp_path / "v" / "c.mp4", seconds=1.0)
    assert main(["extract-features", str(tmp_path / "v"), "--out", str(tmp_path / "f"), "--size", "16",
                 "--backbone", "test_features:tiny_backbone"]) == 0
    assert np.load(tmp_path / "f" / "c.npy").shape == (1, 8)
    assert "[1/1] c.mp4: 1 clips x 8 features" in capsys.readouterr().out


def test_bad_backbone_specs_and_unreadable_videos(tmp_path):
    from videobert.features import load_backbone

    with pytest.raises(ValueError, match="backbone must be 's3d' or 'package.module:factory'"):
        load_backbone("resnet")
    with pytest.raises(ModuleNotFoundError):
        load_backbone("no_such_module_here:factory")
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="broken.mp4: cannot open video"):
        list(clips(tmp_path / "broken.mp4"))

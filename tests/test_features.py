"""Raw video to clip features with PyAV and a tiny backbone (a video the test writes itself)."""
import sys
import types

import numpy as np
import pytest
import torch

av = pytest.importorskip("av", reason="PyAV is not installed (pip install av)")

from videobert.features import clips, default_preprocess, extract_features, load_backbone  # noqa: E402


def tiny_backbone():
    """A random 3D-conv backbone giving 8 features per clip (also loadable as 'test_features:tiny_backbone')."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(3, 8, kernel_size=3, stride=2), torch.nn.AdaptiveAvgPool3d(1),
                               torch.nn.Flatten())


def tiny(size=16):
    """tiny_backbone with the default preprocessing at `size`."""
    return load_backbone("test_features:tiny_backbone", size=size)


def write_video(path, seconds=2.0, fps=25, size=32, width=None):
    """An MPEG-4 file of grey frames whose level changes every frame."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = width or size, size
        stream.pix_fmt = "yuv420p"
        for i in range(int(seconds * fps)):
            image = np.full((size, width or size, 3), (i * 5) % 255, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_clips_are_20fps_30_frame_windows_and_a_short_last_clip_is_dropped(tmp_path):
    write_video(tmp_path / "a.mp4", seconds=3.0)  # 60 frames at 20 fps and one more: that 1-frame clip goes
    out = list(clips(tmp_path / "a.mp4"))
    assert len(out) == 2 and all(c.shape == (30, 3, 32, 32) and c.dtype == torch.uint8 for c in out)
    means = out[0].float().mean(dim=(1, 2, 3))
    assert (means[1:] >= means[:-1] - 1).all()  # resampled frames keep their order
    write_video(tmp_path / "b.mp4", seconds=2.0)  # 40 frames: the second clip has 10 real ones, under half
    assert len(list(clips(tmp_path / "b.mp4"))) == 1
    write_video(tmp_path / "c.mp4", seconds=2.4)  # 48 frames: 18 real ones, kept, padded with the last
    last = list(clips(tmp_path / "c.mp4"))[-1]
    assert torch.equal(last[-1], last[18]) and not torch.equal(last[0], last[-1])


def test_default_preprocessing_resizes_the_short_side_and_centre_crops():
    frames = torch.zeros(30, 3, 40, 80, dtype=torch.uint8)
    frames[..., 20:60] = 255  # a white centre between black sides, as wide as the frame is high
    clip = default_preprocess(14)(frames)  # short side to 16, crop 14 of the 32 x 16 frame: centre only
    assert clip.shape == (3, 30, 14, 14)
    white = (1 - torch.tensor([0.43216, 0.394666, 0.37645])) / torch.tensor([0.22803, 0.22145, 0.216989])
    torch.testing.assert_close(clip[:, :, 7, 7], white[:, None].expand(3, 30), atol=1e-4, rtol=0)
    assert (clip[:, :, :, 1:-1] > 0).all()  # no black side made it into the crop's interior


def test_extract_features_writes_features_and_thumbnails(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "b.mp4", seconds=1.0)
    write_video(videos / "a.mp4", seconds=3.1, width=48)
    write_video(videos / "c.mp4", seconds=0.5)  # 10 frames: less than half a clip, no clip at all
    (videos / "notes.txt").write_text("not a video")
    logged = []
    written = extract_features(videos, tmp_path / "features", tiny(), batch_size=2, thumbnails=tmp_path / "thumbs",
                               thumbnail_size=12, log=logged.append)
    assert [p.name for p in written] == ["a.npy", "b.npy"]
    a, b = (np.load(p) for p in written)
    assert a.shape == (2, 8) and b.shape == (1, 8) and a.dtype == np.float32
    pictures = np.load(tmp_path / "thumbs" / "a.npy")
    assert pictures.shape == (2, 12, 12, 3) and pictures.dtype == np.uint8
    assert abs(pictures[0].mean() - 90) < 8 and pictures[1].mean() != pictures[0].mean()  # middle frames: 18 and 56
    assert any("c.mp4: skipped (shorter than half a clip" in line for line in logged)
    with pytest.raises(ValueError, match="no video files"):
        extract_features(tmp_path / "features", tmp_path / "x", tiny())


def test_extract_features_command(tmp_path, capsys):
    from videobert.cli import main

    (tmp_path / "v").mkdir()
    write_video(tmp_path / "v" / "c.mp4", seconds=1.0)
    assert main(["extract-features", str(tmp_path / "v"), "--out", str(tmp_path / "d" / "features"), "--size", "16",
                 "--backbone", "test_features:tiny_backbone"]) == 0
    assert np.load(tmp_path / "d" / "features" / "c.npy").shape == (1, 8)
    assert np.load(tmp_path / "d" / "thumbnails" / "c.npy").shape == (1, 64, 64, 3)
    assert "[1/1] c.mp4: 1 clips x 8 features" in capsys.readouterr().out


def test_extract_features_help_states_the_last_clip_rule(capsys):
    from videobert.cli import main

    with pytest.raises(SystemExit):
        main(["extract-features", "--help"])
    assert "fewer than half its frames" in " ".join(capsys.readouterr().out.split())


def test_weights_load_from_a_local_state_dict(tmp_path):
    source = tiny_backbone()
    for p in source.parameters():
        p.data.add_(1.0)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    loaded = load_backbone("test_features:tiny_backbone", weights=tmp_path / "w.pth").module
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), source.state_dict().values()))
    torch.save({"other": torch.zeros(2)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="--weights .*bad.pth: not a state dict of test_features:tiny_backbone"):
        load_backbone("test_features:tiny_backbone", weights=tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="--weights .*missing.pth: file does not exist"):
        load_backbone("test_features:tiny_backbone", weights=tmp_path / "missing.pth")


@pytest.fixture
def offline_torchvision(tmp_path, monkeypatch):
    """A stand-in torchvision.models.video whose S3D is tiny and whose weights' URL cannot be reached."""
    weights = types.SimpleNamespace(url="http://127.0.0.1:9/s3d-test.pth", transforms=lambda: default_preprocess(16))

    def s3d(weights=None):
        model = tiny_backbone()
        model.classifier = torch.nn.Linear(8, 4)
        return model
    video = types.ModuleType("torchvision.models.video")
    video.s3d, video.S3D_Weights = s3d, types.SimpleNamespace(KINETICS400_V1=weights)
    for name, module in (("torchvision", types.ModuleType("torchvision")),
                         ("torchvision.models", types.ModuleType("torchvision.models")),
                         ("torchvision.models.video", video)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return s3d


def test_s3d_offline_says_which_file_to_fetch_and_where(offline_torchvision, tmp_path, capsys):
    from videobert.cli import main

    (tmp_path / "v").mkdir()
    write_video(tmp_path / "v" / "a.mp4", seconds=1.0)
    assert main(["extract-features", str(tmp_path / "v"), "--out", str(tmp_path / "f")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: the S3D weights are not on this machine")
    assert "fetch http://127.0.0.1:9/s3d-test.pth and pass it with --weights PATH" in err
    assert str(tmp_path / "hub" / "checkpoints" / "s3d-test.pth") in err
    torch.save(offline_torchvision().state_dict(), tmp_path / "s3d.pth")  # with the classifier, as torchvision's
    assert main(["extract-features", str(tmp_path / "v"), "--out", str(tmp_path / "f"),
                 "--weights", str(tmp_path / "s3d.pth")]) == 0
    assert np.load(tmp_path / "f" / "a.npy").shape == (1, 8)  # the classifier is dropped: backbone features


def test_bad_backbone_specs_and_unreadable_videos(tmp_path):
    with pytest.raises(ValueError, match="backbone must be 's3d' or 'package.module:factory'"):
        load_backbone("resnet")
    with pytest.raises(ValueError, match="--backbone no_such_module_here:factory: cannot make the module"):
        load_backbone("no_such_module_here:factory")
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="broken.mp4: cannot open video"):
        list(clips(tmp_path / "broken.mp4"))

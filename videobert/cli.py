"""The `videobert` command line: `info` (backends and versions), `demo` (the encoder end to end),
`pretrain` (the main job), `extract-features` (raw video to clip features), `tokenize-video` (clip features to
visual tokens), and the uses of a pretrained model: `zero-shot`, `retrieve`, `finetune`, `caption`, `embed`."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from videobert import __version__
from videobert._optional import MissingDependency
from videobert.config import PRESETS
from videobert.flags import COUNT, NATURAL, NON_NEGATIVE, Parser, Range, parse_args


def _cuda_extension() -> str:
    """Whether the CUDA library (libvideobert_kernels.so) is built and loads here: "built and loadable" or why not."""
    try:
        import videobert._kernels.cuda  # noqa: F401  (its import loads the library)
    except ImportError as exc:
        return str(exc)
    return "built and loadable"


def _info(args: argparse.Namespace) -> int:
    from videobert.ops import available_backends

    report = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "cuda_extension": _cuda_extension(), "backends": available_backends()}
    try:
        import triton
        report["triton"] = triton.__version__
    except ImportError as exc:
        report["triton"] = f"not importable ({exc})"
    print(json.dumps(report, indent=2))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from videobert import VideoBERTConfig, VideoBERTForPretraining
    from videobert.data import random_pretraining_batch

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = VideoBERTConfig.preset(args.preset)
    model = VideoBERTForPretraining(config).to(device)
    batch = random_pretraining_batch(config, args.samples, args.row_length, seed=args.seed).to(device)
    real = int((batch.segment_ids >= 0).sum())
    print(f"VideoBERT-{args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters on {device}; "
          f"{args.samples} samples packed into {batch.input_ids.shape[0]} rows of {args.row_length} "
          f"({real} real tokens). Overfitting one batch of random samples: the loss must fall.")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    first = last = None
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            out = model(**batch.model_inputs())
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        stats = {name: float(value.detach()) for name, value in out.items()}
        last = stats["loss"]
        first = last if first is None else first
        print(f"step {step:3d}  loss {last:7.4f}  " + "  ".join(
            f"{name} {stats[name + '_loss']:.4f} (acc {stats[name + '_acc']:.2f})"
            for name in ("text_mlm", "visual_mlm", "vtm")))
    elapsed = time.perf_counter() - start
    print(f"{args.steps} steps in {elapsed:.1f} s ({args.steps * real / elapsed:.0f} tokens/s); "
          f"loss {first:.3f} -> {last:.3f}")
    if not last < first:
        print("error: the loss did not decrease")
        return 1
    return 0


def _tokenize_video(args: argparse.Namespace) -> int:
    from videobert.visual_tokenizer import tokenize_folder

    tokenizer = args.tokenizer or str(Path(args.data_dir) / "visual_tokenizer.safetensors")
    tokenize_folder(args.data_dir, tokenizer, fit=args.fit, max_fit_clips=args.max_fit_clips, levels=args.levels,
                    branching=args.branching, iterations=args.iterations, seed=args.seed)
    return 0


def _reported(command):
    """A command whose bad input (missing checkpoint, vocabulary mismatch, bad data) ends in one error line, exit 1."""
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (ValueError, OSError, KeyError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return run


def _load(args: argparse.Namespace, task: str, build=None):
    from videobert.tasks import device_of, load_checkpoint, load_segments

    checkpoint = load_checkpoint(args.ckpt, build, data=args.data)
    segments = load_segments(args.data, args.split, task, checkpoint.config, args.videos)
    return checkpoint, segments, device_of(args.device)


def _print_metrics(result: dict) -> None:
    print(json.dumps({k: v for k, v in result.items() if k not in ("predictions", "scores")}, indent=2))


@_reported
def _zero_shot(args: argparse.Namespace) -> int:
    from videobert.corpus import ACTIONS, OBJECTS
    from videobert.tasks import read_word_list, write_atomic, zero_shot

    if args.data != "synthetic" and not (args.verbs and args.nouns):
        raise ValueError("--verbs FILE and --nouns FILE are required with a data folder")
    verbs = read_word_list(args.verbs, "verb") if args.verbs else list(ACTIONS)
    nouns = read_word_list(args.nouns, "noun") if args.nouns else list(OBJECTS)
    checkpoint, segments, device = _load(args, "zero-shot")
    result = zero_shot(checkpoint, segments, verbs, nouns, args.template, device)
    _print_metrics(result)
    if args.out:
        lines = "".join(json.dumps(p) + "\n" for p in result["predictions"])
        write_atomic(Path(args.out), lambda tmp: tmp.write_text(lines))
    return 0


@_reported
def _retrieve(args: argparse.Namespace) -> int:
    from videobert.tasks import retrieval, save_npy

    checkpoint, segments, device = _load(args, "retrieval")
    result = retrieval(checkpoint, segments[:args.candidates], device)
    _print_metrics(result)
    if args.out:
        save_npy(Path(args.out), result["scores"].numpy())
    return 0


@_reported
def _caption(args: argparse.Namespace) -> int:
    from videobert.finetune import build_model, evaluate_captions

    checkpoint, segments, device = _load(args, "caption", lambda config, info: build_model(config, info, "caption"))
    _print_metrics(evaluate_captions(checkpoint, segments, Path(args.out) if args.out else None, args.beam, device))
    return 0


@_reported
def _embed(args: argparse.Namespace) -> int:
    from videobert.tasks import SYNTHETIC_SPLIT_SEEDS, device_of, embed_videos, load_checkpoint, save_embeddings, shown

    checkpoint = load_checkpoint(args.ckpt, data=args.data)
    dim = checkpoint.config.video_feature_dim  # a continuous-feature checkpoint reads the clips' features
    if args.data == "synthetic":
        from videobert.samples import synthetic_videos

        videos = synthetic_videos(SYNTHETIC_SPLIT_SEEDS[args.split], checkpoint.config.num_visual_tokens, dim)
        total = args.videos
        source = (videos(i, i + 1)[0] for i in range(total))
    else:
        from videobert.real_data import VideoFolder

        folder = VideoFolder(args.data, dim, with_features=dim is not None)
        total = len(folder)
        source = (folder.video(i) for i in range(total))
    count = 0
    for emb in shown(embed_videos(checkpoint, source, device_of(args.device)), total, "videos"):
        save_embeddings(emb, args.out, args.format)
        count += 1
    print(f"embeddings of {count} videos in {args.out} ({args.format})")
    return 0


# ------------------------------------------------------------------------------------------- real data (issue 26)

@_reported
def _extract_features(args: argparse.Namespace) -> int:
    from videobert.features import extract_features, load_backbone

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    thumbnails = None if args.thumbnail_size == 0 else (args.thumbnails or str(Path(args.out).parent / "thumbnails"))
    extract_features(args.video_dir, args.out, load_backbone(args.backbone, args.weights, args.size),
                     batch_size=args.batch_size, device=device, thumbnails=thumbnails,
                     thumbnail_size=args.thumbnail_size)
    return 0


@_reported
def _build_vocab(args: argparse.Namespace) -> int:
    from videobert.real_data import build_vocab
    from videobert.text_tokenizer import TextTokenizer

    path = build_vocab(args.data, args.size, args.from_bert)
    print(f"{path}: {TextTokenizer.from_vocab(path).vocab_size} word pieces"
          + (f" (from {args.from_bert})" if args.from_bert else " (WordPiece on the folder's sentences)"))
    return 0


@_reported
def _import_youcook2(args: argparse.Namespace) -> int:
    from videobert.youcook2 import import_youcook2

    import_youcook2(args.annotations, args.features_dir, args.data)
    return 0


def _add_real_data_commands(sub) -> None:
    """The commands that turn videos, subtitles and published annotations into a data folder."""
    ext = sub.add_parser("extract-features", help="decode VIDEO_DIR's videos at 20 fps into 1.5 s clips and write "
                                                   "one (clips, F) .npy of backbone features per video",
                         description="Decode at 20 fps, cut 30-frame (1.5 s) clips, write one (clips, F) .npy per "
                                     "video and one thumbnail per clip. A final clip with fewer than half its frames "
                                     "(under 0.75 s) is dropped; a longer one repeats its last frame.")
    ext.add_argument("video_dir", help="folder of videos (any format PyAV decodes)")
    ext.add_argument("--out", required=True, help="feature folder (DATA/features)")
    ext.add_argument("--backbone", default="s3d", help="'s3d' (torchvision) or package.module:factory")
    ext.add_argument("--weights", help="local state-dict file of the backbone (S3D: torchvision's s3d-d76dad2f.pth); "
                                       "default for s3d: torch hub's cache, downloaded when online")
    ext.add_argument("--size", type=COUNT, default=224, help="crop size for a backbone without its own preprocessing")
    ext.add_argument("--thumbnails", help="thumbnail folder (default: thumbnails/ beside --out)")
    ext.add_argument("--thumbnail-size", type=NATURAL, default=64, help="pixels per side (0: no thumbnails)")
    ext.add_argument("--batch-size", type=COUNT, default=8, help="clips per backbone forward")
    ext.add_argument("--device", default="auto", help=DEVICE_HELP)
    ext.set_defaults(func=_extract_features)
    voc = sub.add_parser("build-vocab", help="write DATA/vocab.txt: WordPiece trained on the folder's sentences, or "
                                             "a BERT vocabulary copied")
    voc.add_argument("data", help="the data folder (its text/ sentences; vocab.txt is written there)")
    how = voc.add_mutually_exclusive_group()
    how.add_argument("--size", type=COUNT, default=8000, help="word pieces at most (specials and characters included)")
    how.add_argument("--from-bert", metavar="DIR", help="copy a Hugging Face BERT folder's vocab.txt (for "
                                                        "pretrain --init-from-bert DIR)")
    voc.set_defaults(func=_build_vocab)
    yc2 = sub.add_parser("import-youcook2", help="YouCook2's youcookii_annotations_trainval.json and clip features "
                                                 "into a data folder: sentences, tasks/{train,validation}.jsonl "
                                                 "with verb and noun, verbs.txt and nouns.txt")
    yc2.add_argument("annotations", help="youcookii_annotations_trainval.json")
    yc2.add_argument("features_dir", help="one <video id>.npy of clip features per video (extract-features)")
    yc2.add_argument("data", help="the data folder to write")
    yc2.set_defaults(func=_import_youcook2)


def _run_and_data(args: argparse.Namespace):
    """(checkpoint, data): --data, else the data the run was trained on; ValueError for a continuous-feature
    checkpoint (these commands predict visual tokens)."""
    from videobert.generation import require_visual_tokens
    from videobert.tasks import checkpoint_folders, load_checkpoint

    run, _ = checkpoint_folders(args.ckpt)
    info = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
    data = args.data or info.get("args", {}).get("data", "synthetic")
    checkpoint = load_checkpoint(args.ckpt, data=data)
    require_visual_tokens(checkpoint, args.command)
    return checkpoint, data


@_reported
def _generate(args: argparse.Namespace) -> int:
    from videobert.generation import draw, generate, split_sentences, token_tiles
    from videobert.tasks import device_of

    checkpoint, data = _run_and_data(args)
    tile, known = token_tiles(data, checkpoint.config.num_visual_tokens)
    result = generate(checkpoint, split_sentences(args.text), args.length, device_of(args.device), known)
    out = Path(args.out) if args.out else checkpoint.path.parents[1] / "generate.png"
    rows = [("\n".join(_wrapped(r["sentence"])), r["sequence"]) for r in result]
    draw(rows, tile, out, f"text to video: {checkpoint.path}")
    print(json.dumps({"generated": result, "picture": str(out)}, indent=2))
    return 0


@_reported
def _forecast(args: argparse.Namespace) -> int:
    from videobert.generation import draw, forecast, token_tiles, video_tokens
    from videobert.tasks import device_of

    checkpoint, data = _run_and_data(args)
    scales = args.scales
    tokens = video_tokens(data, args.video, checkpoint.config.num_visual_tokens)
    tile, known = token_tiles(data, checkpoint.config.num_visual_tokens)
    result = forecast(checkpoint, tokens, args.clip, scales, args.context, device=device_of(args.device),
                      allowed=known)
    out = Path(args.out) if args.out else checkpoint.path.parents[1] / "forecast.png"
    rows = [(f"clips to {args.clip}\n(stride 1)", result[0]["context"])]
    rows += [(f"+{r['seconds_ahead']:g} s\n(stride {r['scale']})", r["top"]) for r in result]
    draw(rows, tile, out,
         f"forecast after clip {args.clip} of {args.video}: top {len(result[0]['top'])} per time scale")
    print(json.dumps({"forecast": result, "picture": str(out)}, indent=2))
    return 0


def _strides(text: str) -> list[int]:
    """--scales: comma-separated clip strides, each an integer >= 1."""
    try:
        return [COUNT(s) for s in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}") from None


def _wrapped(text: str, width: int = 28) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


def _add_generation_commands(sub) -> None:
    """`generate` and `forecast`: the paper's text-to-video and forecasting, with pictures."""
    common = Parser(add_help=False)
    common.add_argument("--ckpt", required=True, help="a pretraining run folder (its newest checkpoint) or a step "
                                                      "folder")
    common.add_argument("--data", help="'synthetic' or the data folder whose token pictures to show (default: the "
                                       "run's)")
    common.add_argument("--out", help="the PNG to write (default: generate.png / forecast.png in the run folder)")
    common.add_argument("--device", default="auto", help=DEVICE_HELP)
    gen = sub.add_parser("generate", parents=[common], help="text to video: per sentence the most likely visual "
                                                            "token and a short sequence, drawn as a PNG")
    gen.add_argument("--text", required=True, help="one or more sentences, e.g. \"season the steak. flip it.\"")
    gen.add_argument("--length", type=COUNT, default=4, help="visual tokens drawn per sentence")
    gen.set_defaults(func=_generate)
    fc = sub.add_parser("forecast", parents=[common], help="the top 3 next visual tokens after a video's clip T at "
                                                           "several time scales, drawn as a PNG")
    fc.add_argument("--video", required=True, help="a video id of the data (synthetic: synthetic-<seed>-<index>)")
    fc.add_argument("--clip", type=NATURAL, required=True, help="the last clip seen (T)")
    fc.add_argument("--scales", type=_strides, default="1,2,3",
                    help="clip strides: the forecast is 1.5 s x stride ahead")
    fc.add_argument("--context", type=COUNT, default=4, help="clips seen, T and those before it at the stride")
    fc.set_defaults(func=_forecast)


def _task_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="a run folder (its newest checkpoint) or a step folder")
    parser.add_argument("--data", default="synthetic", help="'synthetic' or a data folder with tasks/<split>.jsonl")
    parser.add_argument("--split", default="test", choices=("train", "validation", "test"), help="the split to use")
    parser.add_argument("--videos", type=COUNT, default=64, help="synthetic data: videos of the split")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)


BENCHMARKS = ("attention", "layer_norm", "mlm_loss", "train", "tune")
DEVICE_HELP = "'auto' (a GPU when there is one), 'cpu', 'cuda' or 'cuda:N'"


def _bench(args: argparse.Namespace) -> int:
    """Run bench/<name>.py (or each in turn for "all") in its own process with the remaining arguments."""
    import subprocess

    folder = Path(__file__).resolve().parents[1] / "bench"
    if not folder.is_dir():
        print(f"error: the benchmarks run from a source checkout (its bench/ folder; none beside this installed "
              f"package at {folder.parent}): clone the repository, pip install -e '.[bench]' there and run "
              "videobert bench from it", file=sys.stderr)
        return 2
    status = 0
    for name in BENCHMARKS if args.name == "all" else (args.name,):
        print(f"== bench/{name}.py {' '.join(args.script_args)}", flush=True)
        status |= subprocess.call([sys.executable, str(folder / f"{name}.py"), *args.script_args])
    return 1 if status else 0


def build_parser() -> Parser:
    """The `videobert` parser: every subcommand and flag, each with its help line and default."""
    parser = Parser(prog="videobert", description=__doc__)
    parser.add_argument("--version", action="version", version=f"videobert {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and which backend of each op is available").set_defaults(func=_info)
    demo = sub.add_parser("demo", help="train the encoder on one packed batch of random samples")
    demo.add_argument("--preset", default="tiny", choices=PRESETS, help="model size")
    demo.add_argument("--steps", type=COUNT, default=20, help="optimizer steps on the one batch")
    demo.add_argument("--samples", type=COUNT, default=16, help="random samples in the batch")
    demo.add_argument("--row-length", type=COUNT, default=128, help="tokens per packed row")
    demo.add_argument("--lr", type=NON_NEGATIVE, default=1e-3, help="AdamW learning rate")
    demo.add_argument("--seed", type=int, default=0, help="seed of the model and the samples")
    demo.set_defaults(func=_demo)
    from videobert import train

    pre = sub.add_parser("pretrain", help="pretrain VideoBERT (the main job): synthetic or real data, checkpoints, "
                                          "metrics.jsonl and curves.png in --out")
    train.add_arguments(pre)
    pre.set_defaults(func=train.main)
    from videobert import finetune
    from videobert.tasks import ZERO_SHOT_TEMPLATE

    zs = sub.add_parser("zero-shot", help="zero-shot action classification: rank verbs and nouns at the masks of a "
                                           "template sentence given the video")
    _task_arguments(zs)
    zs.add_argument("--verbs", help="verb list, one per line (synthetic default: the generator's actions)")
    zs.add_argument("--nouns", help="noun list, one per line (synthetic default: the generator's objects)")
    zs.add_argument("--template", default=ZERO_SHOT_TEMPLATE, help="sentence with a verb [MASK] then a noun [MASK]")
    zs.add_argument("--out", help="write per-segment predictions (JSON lines) here")
    zs.set_defaults(func=_zero_shot)
    ret = sub.add_parser("retrieve", help="video-text retrieval by the matching head: Recall@1/5/10, median rank")
    _task_arguments(ret)
    ret.add_argument("--candidates", type=COUNT, default=100, help="the first N segments are the candidate pool")
    ret.add_argument("--out", help="write the (sentences x videos) log-probability matrix here (.npy)")
    ret.set_defaults(func=_retrieve)
    fin = sub.add_parser("finetune", help="fine-tune a pretrained checkpoint: classify, multiple-choice or caption")
    finetune.add_arguments(fin)
    fin.set_defaults(func=finetune.main)
    cap = sub.add_parser("caption", help="caption a split with a captioning fine-tune: BLEU-3/4, METEOR, ROUGE-L, "
                                         "CIDEr (pycocoevalcap)")
    _task_arguments(cap)
    cap.add_argument("--beam", type=COUNT, default=1, help="beam width (1: greedy)")
    cap.add_argument("--out", help="write the captions (JSON lines) here")
    cap.set_defaults(func=_caption)
    emb = sub.add_parser("embed", help="write contextual per-clip, per-window and per-sentence embeddings")
    _task_arguments(emb)
    emb.add_argument("--out", required=True, help="folder for one file (or one .npy per tensor) per video")
    emb.add_argument("--format", default="safetensors", choices=("safetensors", "npy"),
                     help="one .safetensors file per video, or one .npy per tensor")
    emb.set_defaults(func=_embed)
    tok = sub.add_parser("tokenize-video", help="turn DATA_DIR/features/*.npy into DATA_DIR/tokens/*.npy with "
                                                 "hierarchical k-means (fitted first if needed)")
    tok.add_argument("data_dir", help="the data folder (features/ in, tokens/ out)")
    tok.add_argument("--tokenizer", help="tokenizer file (default DATA_DIR/visual_tokenizer.safetensors)")
    tok.add_argument("--fit", action="store_true", help="fit (and overwrite) the tokenizer even if it exists")
    tok.add_argument("--max-fit-clips", type=COUNT, default=200_000, help="clips sampled to fit the k-means on")
    tok.add_argument("--levels", type=COUNT, default=4, help="levels of the k-means tree")
    tok.add_argument("--branching", type=Range(int, 2), default=12, help="clusters per node (tokens: branching ** "
                                                                         "levels)")
    tok.add_argument("--iterations", type=COUNT, default=20, help="k-means iterations per level")
    tok.add_argument("--seed", type=int, default=0, help="seed of the k-means++ seeding and the sampled clips")
    tok.set_defaults(func=_tokenize_video)
    _add_real_data_commands(sub)
    _add_generation_commands(sub)
    bench = sub.add_parser("bench", help="run the benchmarks (bench/*.py; results in bench/results/<gpu>/<date>/)")
    bench.add_argument("name", choices=BENCHMARKS + ("all",), help="the benchmark (bench/NAME.py), or all in turn")
    bench.add_argument("script_args", nargs=argparse.REMAINDER, help="passed on, e.g. --quick")
    bench.set_defaults(func=_bench)
    return parser


def main(argv=None) -> int:
    """Entry point of the `videobert` command."""
    args = parse_args(build_parser(), argv)
    try:
        return args.func(args)
    except MissingDependency as exc:  # an optional package a flag needs: one line saying how to install it
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

"""End-to-end training throughput: this project's encoder with the fused ops on packed rows, the same model with
the PyTorch reference ops on packed rows, and Hugging Face `BertForPreTraining` (random init) on the very same
samples, its MLM head over every position as it does by default, in the setups a user would pick: padded
batches with SDPA, and padding-free packed rows (position_ids restarting per sample, as transformers'
DataCollatorWithFlattening feeds them; flash-attention-2 where flash-attn is importable, else SDPA with the
block-diagonal mask transformers builds), eager and under torch.compile.

Each provider runs full training steps (forward, backward, AdamW) under bf16 autocast; reported: steps/s, real
(non-padding) tokens/s, MFU on real tokens (FLOPs counted as in videobert/train.py, against the card's dense
bf16 peak measured in the same run), peak memory, the padded batches' padding waste, and each provider's
speedup over the best Hugging Face row of its preset (named in `best_hugging_face`). Synthetic VideoBERT-like
data: joint, text-only and video-only samples of 5 to 128 tokens from the embedded corpus (videobert.samples),
51k-entry joint vocabulary.
Our fused model also runs as `--cuda-graphs` trains (videobert_fused+cuda_graphs, GPU only: whole steps replayed
from CUDA graphs, every batch shape captured before the timing).
Usage: python bench/train.py [--quick] [--presets base,large] [--videos 256] [--providers ...] [--compile]
(--compile: every other provider under torch.compile too). Without a GPU it runs a toy smoke pass (tiny preset,
a few steps, no compiled rows) on the CPU and says so.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, markdown_table, measure_peaks, on_gpu, write_results  # noqa: E402

from videobert.config import PRESETS, VideoBERTConfig  # noqa: E402
from videobert.corpus import synthetic_corpus  # noqa: E402
from videobert.data import allowed_pairs, static_batch  # noqa: E402
from videobert.model import VideoBERTForPretraining  # noqa: E402
from videobert.samples import SampleOptions, make_batch, synthetic_videos  # noqa: E402
from videobert.text_tokenizer import TextTokenizer  # noqa: E402
from videobert.train import GraphedSteps, flops_per_token  # noqa: E402


def batches(config: VideoBERTConfig, tokenizer: TextTokenizer, videos: int, count: int, row_length: int):
    """`count` pairs (packed batch, padded batch, stats) of the same samples; padded rows are cut to the
    longest sample of their batch (dynamic padding, as a Hugging Face data collator does)."""
    corpus = synthetic_videos(0)
    out = []
    for index in range(count):
        chunk = corpus(index * videos, (index + 1) * videos)
        packed, stats = make_batch(chunk, tokenizer.encode, config, SampleOptions(), row_length, (0, index))
        padded, _ = make_batch(chunk, tokenizer.encode, config, SampleOptions(), 128, (0, index), packed=False)
        width = int((padded.segment_ids >= 0).sum(1).max())
        for name in ("input_ids", "token_type_ids", "segment_ids", "mlm_labels"):
            setattr(padded, name, getattr(padded, name)[:, :width].contiguous())
        out.append((packed, padded, stats))
    return out


def _hugging_face_model(config: VideoBERTConfig, device, attn_implementation: str):
    """BertForPreTraining of the preset's sizes and joint vocabulary, random init."""
    from transformers import BertConfig, BertForPreTraining

    hf_config = BertConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                           num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                           intermediate_size=config.intermediate_size,
                           max_position_embeddings=config.max_position_embeddings, type_vocab_size=2,
                           attn_implementation=attn_implementation)
    return BertForPreTraining(hf_config).to(device)


def hugging_face_step(config: VideoBERTConfig, device):
    """(model, step(batch) -> loss) of BertForPreTraining with SDPA on padded batches."""
    model = _hugging_face_model(config, device, "sdpa")

    def step(batch):
        out = model(input_ids=batch.input_ids, token_type_ids=batch.token_type_ids,
                    attention_mask=(batch.segment_ids >= 0).long(), labels=batch.mlm_labels,
                    next_sentence_label=batch.vtm_labels)
        return out.loss
    return model, step


def packed_attention() -> str:
    """The attention Hugging Face runs padding-free packed rows with: flash-attention-2 where flash-attn is
    importable (its varlen path), else SDPA with the block-diagonal mask transformers builds from position_ids."""
    return "flash_attention_2" if on_gpu() and importlib.util.find_spec("flash_attn") else "sdpa"


def hugging_face_packed_step(config: VideoBERTConfig, device):
    """(model, step(batch) -> loss) of BertForPreTraining on the packed rows, padding-free as transformers'
    DataCollatorWithFlattening feeds it: position_ids restart at every sample (each padding token its own
    one-token sequence), no attention mask; the matching head scores each row's first sample (the pooled first
    token), the MLM head every position."""
    from videobert.model import segment_positions

    model = _hugging_face_model(config, device, packed_attention())

    def step(batch):
        per_row = (batch.input_ids == config.cls_token_id).sum(1)
        first_sample = torch.cumsum(per_row, 0) - per_row  # index of each row's first [CLS] among all samples
        out = model(input_ids=batch.input_ids, token_type_ids=batch.token_type_ids,
                    position_ids=segment_positions(batch.segment_ids), labels=batch.mlm_labels,
                    next_sentence_label=batch.vtm_labels[first_sample])
        return out.loss
    return model, step


def ours_step(config: VideoBERTConfig, device):
    """(model, step(batch) -> loss) of this project's pretraining model on packed batches."""
    model = VideoBERTForPretraining(config).to(device)
    return model, lambda batch: model(**batch.model_inputs())["loss"]


def ours_graphed_step(config: VideoBERTConfig, device):
    """(model, step(CPU batch) -> loss) of this project's model trained by whole steps replayed from CUDA graphs
    (`--cuda-graphs`: static batches, capturable fused AdamW, clipping inside the graph)."""
    model = VideoBERTForPretraining(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-4, device=device), fused=True,
                                  capturable=True)
    graphed = GraphedSteps(model, optimizer, lambda batch: static_batch(batch, config), 1.0, device)

    def step(batch):
        return graphed(batch)["loss"]
    step.whole_step = True  # forward, backward and the optimizer's update in one call, on the CPU batch
    return model, step


def run_provider(name, make, config, layout, data, device, steps, warmup, compile_model, peak_tflops,
                 counted_model):
    """One provider's timed steps on the packed (layout 0) or padded (1) batches; FLOPs are counted on
    `counted_model` (this project's model for the preset, the same useful work for every provider)."""
    model, step = make(config, device)
    whole_step = getattr(step, "whole_step", False)
    if whole_step:  # every batch shape captured before the timing starts
        warmup = max(warmup, 3 * len(data))
    runner = torch.compile(step) if compile_model else step
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    keys_per_token = [allowed_pairs(packed.segment_ids) / stats.tokens for packed, _, stats in data]  # not timed
    timed_tokens, mean_keys = 0, 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        packed_or_padded = data[i % len(data)]
        batch, stats = packed_or_padded[layout], packed_or_padded[2]
        if whole_step:
            runner(batch)
        else:
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                loss = runner(batch.to(device))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            timed_tokens += stats.tokens
            mean_keys += keys_per_token[i % len(data)] / steps
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tokens_per_s = timed_tokens / elapsed
    flops = tokens_per_s * flops_per_token(config, counted_model, mean_keys)
    row = dict(provider=name, steps_per_s=steps / elapsed, tokens_per_s=tokens_per_s,
               tflops=flops / 1e12, mfu=flops / 1e12 / peak_tflops if peak_tflops == peak_tflops else "",
               peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else "")
    del model, optimizer
    return row


PROVIDERS = ("videobert_fused", "videobert_fused+cuda_graphs", "videobert_reference_ops", "hugging_face_bert_sdpa",
             "hugging_face_bert_packed", "hugging_face_bert_packed+compile")


def _providers(text: str) -> list[str]:
    """Provider names from "videobert_fused,hugging_face_bert_sdpa"; each must be one of PROVIDERS."""
    names = text.split(",")
    if any(name not in PROVIDERS for name in names):
        raise argparse.ArgumentTypeError(f"expected comma-separated providers of {', '.join(PROVIDERS)}, got {text!r}")
    return names


def _presets(text: str) -> list[str]:
    """Preset names from "base,large"; each must be a VideoBERTConfig preset."""
    names = text.split(",")
    if any(name not in PRESETS for name in names):
        raise argparse.ArgumentTypeError(f"expected comma-separated presets of {', '.join(PRESETS)}, got {text!r}")
    return names


def main(argv=None) -> int:
    """Run the end-to-end benchmark; writes train.{csv,json,md} under bench/results/<gpu>/<date>/."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer steps, and base only unless --presets")
    parser.add_argument("--presets", type=_presets, help=f"comma-separated presets of {', '.join(PRESETS)} "
                                                         "(default: base,large; base with --quick)")
    parser.add_argument("--videos", type=int, default=256, help="videos per batch (about 60 real tokens each)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of each provider")
    parser.add_argument("--providers", type=_providers, default=list(PROVIDERS),
                        help=f"comma-separated providers of {', '.join(PROVIDERS)} (default: all)")
    args = parser.parse_args(argv)
    if on_gpu():
        default = "base" if args.quick else "base,large"
        device, presets = torch.device("cuda"), args.presets or default.split(",")
        steps, warmup = (10, 3) if args.quick else (20, 5)
        videos, row_length = args.videos, 512
    else:
        print("No CUDA device: a toy-size smoke pass on the CPU (tiny preset). These are NOT GPU figures.")
        device, presets, steps, warmup, videos, row_length = torch.device("cpu"), ["tiny"], 2, 1, 4, 128
    peaks = measure_peaks()
    tokenizer = TextTokenizer.train((s.text for v in synthetic_corpus(200) for s in v.sentences), vocab_size=400)
    results = []
    # The synthetic tokenizer's few hundred word pieces sit inside BERT's 30522, which the models keep: their
    # masked-token heads score the real joint vocabulary (30522 + specials + 20736 visual tokens).
    overrides = {**tokenizer.config_overrides(), "text_vocab_size": VideoBERTConfig.text_vocab_size}
    meta = {"peaks": peaks, "videos_per_batch": videos, "row_length": row_length,
            "vocab_size": VideoBERTConfig.preset(presets[0], **overrides).vocab_size}  # the same for every preset
    for preset in presets:
        config = VideoBERTConfig.preset(preset, **overrides)
        data = batches(config, tokenizer, videos, 4, row_length)
        with torch.device("meta"):  # parameter counts only: no memory, no initialisation
            counted_model = VideoBERTForPretraining(config)
        padded_positions = sum(p[1].input_ids.numel() for p in data)
        waste = 1 - sum(p[2].tokens for p in data) / padded_positions
        reference = VideoBERTConfig.preset(preset, **overrides, backend="torch")
        # (name, make, config, layout: 0 packed, 1 padded, compiled)
        providers = [("videobert_fused", ours_step, config, 0, False),
                     ("videobert_reference_ops", ours_step, reference, 0, False)]
        graphed = [("videobert_fused+cuda_graphs", ours_graphed_step, config, 0, False)] if on_gpu() else []
        if not graphed:
            print("videobert_fused+cuda_graphs: CUDA graphs need a GPU")
        if importlib.util.find_spec("transformers") is None:
            print("transformers not importable: no Hugging Face rows")
        else:
            providers += [("hugging_face_bert_sdpa", hugging_face_step, config, 1, False),
                          ("hugging_face_bert_packed", hugging_face_packed_step, config, 0, False)]
            if on_gpu():
                providers.append(("hugging_face_bert_packed+compile", hugging_face_packed_step, config, 0, True))
            else:
                print("hugging_face_bert_packed+compile: compiled on a GPU only (minutes of Inductor on a CPU)")
        if args.compile:
            providers += [(name + "+compile", make, cfg, layout, True) for name, make, cfg, layout, compiled
                          in providers if not compiled and name + "+compile" not in {p[0] for p in providers}]
        providers += graphed  # last: a capped run keeps the goal's rows first
        for name, make, provider_config, layout, compiled in providers:
            extra_compiled = args.compile and compiled and name.removesuffix("+compile") in args.providers
            if name not in args.providers and not extra_compiled:
                continue
            try:
                row = run_provider(name, make, provider_config, layout, data, device, steps, warmup, compiled,
                                   peaks["matmul_tflops"], counted_model)
            except Exception as exc:  # a provider that cannot run is reported, not fatal
                print(f"{name} {preset}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
                continue
            results.append(dict(preset=preset, **row, padded_waste=waste if layout == 1 else "",
                                attention=(packed_attention() if name.startswith("hugging_face_bert_packed")
                                           else "sdpa" if name.startswith("hugging_face") else "segment")))
            write_results("train", results, meta)  # after every row: a later crash keeps the earlier ones
        # Ratios against the best Hugging Face setup of the preset, not the weakest.
        hf = [r for r in results if r["preset"] == preset and r["provider"].startswith("hugging_face")]
        best = max(hf, key=lambda r: r["tokens_per_s"], default=None)
        for row in results:
            if row["preset"] == preset:
                row["speedup_over_best_hugging_face"] = row["tokens_per_s"] / best["tokens_per_s"] if best else ""
                row["best_hugging_face"] = best["provider"] if best else ""
    if results:
        write_results("train", results, meta)
    print(markdown_table(results))
    print(f"({device_name()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

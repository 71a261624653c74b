from __future__ import annotations

import json

import pytest

from sautomed.data.splits import kfold_split, resolve_split

IDS = [f"case_{i:02d}" for i in range(12)]


def test_kfold_deterministic_and_complete():
    splits = kfold_split(IDS, folds=5, seed=3)
    assert splits == kfold_split(list(reversed(IDS)), folds=5, seed=3)  # input order does not matter
    assert splits != kfold_split(IDS, folds=5, seed=4)
    assert len(splits) == 5
    vals = [i for s in splits for i in s["val"]]
    assert sorted(vals) == IDS  # every case validated exactly once
    for s in splits:
        assert not set(s["train"]) & set(s["val"]) and sorted(s["train"] + s["val"]) == IDS
        assert len(s["val"]) in (2, 3)


def test_few_cases():
    (only,) = kfold_split(["a"], folds=5)
    assert only == {"train": ["a"], "val": ["a"]}
    with pytest.warns(UserWarning, match="4 cases for 5 folds"):
        splits = kfold_split(["a", "b", "c", "d"], folds=5)
    assert len(splits) == 4 and all(len(s["val"]) == 1 for s in splits)
    with pytest.raises(ValueError):
        kfold_split([], folds=5)


def test_resolve_writes_and_reuses(tmp_path):
    run = tmp_path / "run"
    train, val = resolve_split(IDS, run, fold=2, seed=1)
    written = json.loads((run / "splits.json").read_text())
    assert written == kfold_split(IDS, 5, 1) and (train, val) == (written[2]["train"], written[2]["val"])
    assert [p.name for p in run.iterdir()] == ["splits.json"]  # no temp file left
    assert resolve_split(IDS, run, fold=2, seed=1) == (train, val)  # reused as it is
    with pytest.raises(ValueError, match="fold 5 out of range.*0..4"):
        resolve_split(IDS, run, fold=5, seed=1)


def test_without_a_run_folder_nothing_is_written(tmp_path, monkeypatch):
    """A data module used without a trainer (the Python API) must not drop splits.json into the working
    folder, where it could replace a user's own file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "splits.json").write_text("mine")
    assert resolve_split(IDS, None, fold=1, seed=1) == (
        kfold_split(IDS, 5, 1)[1]["train"],
        kfold_split(IDS, 5, 1)[1]["val"],
    )
    assert (tmp_path / "splits.json").read_text() == "mine" and len(list(tmp_path.iterdir())) == 1


def test_run_folder_split_of_other_folds_or_seed_is_an_error(tmp_path):
    run = tmp_path / "run"
    resolve_split(IDS, run, fold=0, folds=5, seed=1)
    with pytest.raises(ValueError, match=r"has 5 folds but data.folds=3 makes 3"):
        resolve_split(IDS, run, fold=0, folds=3, seed=1)
    with pytest.raises(
        ValueError, match=r"not the split of data.folds=5, data.split_seed=99.*fold 0 validates"
    ):
        resolve_split(IDS, run, fold=0, folds=5, seed=99)
    with pytest.raises(ValueError, match="other cases"):  # a case more in the dataset than in the split
        resolve_split([*IDS, "case_99"], run, fold=0, folds=5, seed=1)


def test_user_split_training_on_a_validation_case_is_an_error(tmp_path):
    user = tmp_path / "mine.json"
    user.write_text(json.dumps([{"train": IDS[1:], "val": IDS[:2]}]))
    with pytest.raises(ValueError, match=r"mine.json: fold 0 has 1 case\(s\) in both train and val: case_01"):
        resolve_split(IDS, tmp_path / "run", fold=0, user_file=user)


def test_user_file_wins(tmp_path):
    user = tmp_path / "mine.json"
    user.write_text(json.dumps([{"train": IDS[2:], "val": IDS[:2]}]))
    run = tmp_path / "run"
    (run).mkdir()
    (run / "splits.json").write_text(json.dumps(kfold_split(IDS, 5, 0)))
    assert resolve_split(IDS, run, fold=0, user_file=user) == (IDS[2:], IDS[:2])
    assert json.loads((run / "splits.json").read_text()) == [{"train": IDS[2:], "val": IDS[:2]}]
    with pytest.raises(ValueError, match="out of range"):
        resolve_split(IDS, run, fold=1, user_file=user)
    user.write_text(json.dumps([{"train": ["ghost"], "val": IDS[:2]}]))
    with pytest.raises(ValueError, match="ghost"):
        resolve_split(IDS, run, fold=0, user_file=user)
    user.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        resolve_split(IDS, run, fold=0, user_file=user)

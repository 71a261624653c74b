from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from sautomed.data.splits import (
    FitRecord,
    fit_record,
    fit_split_record,
    fit_validates,
    kfold_split,
    resolve_split,
    split_provenance,
)

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


def _checkpoint(callbacks: dict) -> dict:
    split = {"train": {"a": "h_a", "b": "h_b"}, "val": {"c": "h_c"}}
    return {"sautomed": {"split": split}, "callbacks": callbacks}


def test_fit_record_takes_the_best_path_from_a_monitored_checkpoint_callback_only():
    last_only = {"ModelCheckpoint{'monitor': None}": {"monitor": None, "best_model_path": "/r/last.ckpt"}}
    record = fit_record(_checkpoint(last_only))
    assert record == FitRecord({"a": "h_a", "b": "h_b"}, {"c": "h_c"}, True, None)  # older record: validated
    monitored = {
        "ModelCheckpoint{'monitor': 'val/mean_dsc'}": {
            "monitor": "val/mean_dsc",
            "best_model_path": "/r/best.ckpt",
        }
    }
    assert fit_record(_checkpoint({**last_only, **monitored})).best_path == "/r/best.ckpt"
    assert fit_record({"callbacks": monitored}) is None  # no record of the fit's cases


def test_provenance_names_the_choosing_cases_only_where_validation_chose_a_file():
    evaluated = {"c": "h_c", "x": "h_a"}  # x: a training case under another name, found by content
    chosen = FitRecord({"a": "h_a"}, {"c": "h_c"}, True, "/run/best.ckpt")
    assert split_provenance(chosen, evaluated, "/elsewhere/best.ckpt") == {
        "best_ckpt_chosen_on": ["c"],
        "checkpoint_chosen_on": ["c"],
        "overlaps_training": ["x"],
    }
    assert split_provenance(chosen, evaluated, "/run/last.ckpt")["checkpoint_chosen_on"] == []
    unvalidated = FitRecord({"a": "h_a"}, {"c": "h_c"}, False)  # a fit without validation: nothing chose
    assert split_provenance(unvalidated, evaluated, "/run/last.ckpt") == {
        "best_ckpt_chosen_on": None,
        "checkpoint_chosen_on": [],
        "overlaps_training": ["x"],
    }
    assert set(split_provenance(None, evaluated).values()) == {None}
    not_yet = FitRecord(
        {"a": "h_a"}, {"c": "h_c"}, True, None
    )  # last.ckpt written before the last validation
    assert split_provenance(not_yet, evaluated, "/run/last.ckpt")["best_ckpt_chosen_on"] == ["c"]


def test_a_fit_validates_only_if_its_interval_is_reached():
    def trainer(every, max_epochs, enabled=True):
        return SimpleNamespace(
            check_val_every_n_epoch=every, max_epochs=max_epochs, enable_validation=enabled
        )

    assert fit_validates(trainer(1, 1)) and fit_validates(trainer(5, 5)) and fit_validates(trainer(None, 3))
    assert fit_validates(trainer(10, -1))  # no epoch limit
    assert not fit_validates(trainer(100000, 1000))  # chaos_mr_litemedsam: every case trains
    assert not fit_validates(trainer(1, 10, enabled=False))  # no val data, or limit_val_batches 0


def test_a_split_record_names_the_cases_and_whether_they_validate():
    split = {"train": {"a": "h_a"}, "val": {"c": "h_c"}}
    datamodule = SimpleNamespace(case_fingerprints=lambda k: split[k])
    record = fit_split_record(datamodule, SimpleNamespace(check_val_every_n_epoch=100000, max_epochs=10))
    assert record == {**split, "validates": False}
    assert fit_record({"sautomed": {"split": record}}) == FitRecord({"a": "h_a"}, {"c": "h_c"}, False)
    assert fit_split_record(SimpleNamespace(), None) is None  # a datamodule that cannot name its cases

"""Plans: deterministic, patient-level split by keyed hash, dedupe by SOP, units and parts."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import pytest

from radpretrain.errors import ConfigError
from radpretrain.shards import deid
from radpretrain.shards.index import Index
from radpretrain.shards.plan import ShardConfig, make_plan, parse_part, select_part, split_of


def _index(pseudo: deid.Pseudonymizer, patients: int, per_patient: int = 2) -> Index:
    rows: list[dict[str, Any]] = []
    for p in range(patients):
        for i in range(per_patient):
            n = p * per_patient + i
            rows.append(
                {
                    "file": pseudo("file", f"f{n}"),
                    "sop": pseudo("sop", f"1.2.{n}"),
                    "patient": pseudo("patient", f"P{p}"),
                    "status": "ok",
                    "reason": None,
                }
            )
    return Index(meta={"source": "s", "files": len(rows)}, rows=rows)


def test_patient_level_split_fractions_and_determinism() -> None:
    pseudo = deid.Pseudonymizer(b"a" * 32)
    index = _index(pseudo, 1500)
    config = ShardConfig(shard_size=100, val_fraction=0.1, test_fraction=0.2)
    plan = make_plan(index, config, pseudo)
    split_of_file = {f: u.split for u in plan.units for f in u.files}
    patient_of = {r["file"]: r["patient"] for r in index.rows}
    splits_of_patient: dict[str, set[str]] = defaultdict(set)
    for file, split in split_of_file.items():
        splits_of_patient[patient_of[file]].add(split)
    assert all(len(s) == 1 for s in splits_of_patient.values())
    share = Counter(next(iter(s)) for s in splits_of_patient.values())
    assert 0.07 < share["val"] / 1500 < 0.13 and 0.16 < share["test"] / 1500 < 0.24
    assert all(len(u.files) <= 100 for u in plan.units) and len(split_of_file) == 3000

    again = make_plan(index, config, pseudo)
    assert again.fingerprint == plan.fingerprint and [u.files for u in again.units] == [u.files for u in plan.units]
    reseeded = make_plan(index, ShardConfig(shard_size=100, val_fraction=0.1, test_fraction=0.2, seed=1), pseudo)
    assert reseeded.fingerprint != plan.fingerprint
    assert {f: u.split for u in reseeded.units for f in u.files} == split_of_file  # the seed only shuffles
    other = deid.Pseudonymizer(b"b" * 32)
    assert make_plan(index, config, other).fingerprint != plan.fingerprint
    assert split_of(pseudo("patient", "P1"), config, pseudo) == split_of(pseudo("patient", "P1"), config, pseudo)


def test_dedupe_keeps_first_copy_and_accounts_for_the_rest() -> None:
    pseudo = deid.Pseudonymizer(b"a" * 32)
    index = _index(pseudo, 3)
    copy = {**index.rows[0], "file": pseudo("file", "copy")}
    skipped = {**index.rows[1], "file": pseudo("file", "ct"), "status": "skipped", "reason": "modality not selected"}
    index.rows += [copy, skipped]
    plan = make_plan(index, ShardConfig(shard_size=2), pseudo)
    planned = [f for u in plan.units for f in u.files]
    assert index.rows[0]["file"] in planned and copy["file"] not in planned
    assert plan.not_planned == {
        copy["file"]: ("duplicate", "duplicate"),
        skipped["file"]: ("skipped", skipped["reason"]),
    }
    assert plan.files_seen == len(planned) + len(plan.not_planned)


def test_parts_cover_the_plan_once() -> None:
    pseudo = deid.Pseudonymizer(b"a" * 32)
    plan = make_plan(_index(pseudo, 40), ShardConfig(shard_size=3), pseudo)
    parts = [select_part(plan.units, (i, 3)) for i in range(3)]
    names = [u.name for part in parts for u in part]
    assert sorted(names) == sorted(u.name for u in plan.units) and len(names) == len(set(names))
    assert parse_part("2/4") == (2, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "1/0"):
        with pytest.raises(ConfigError, match="i/N"):
            parse_part(bad)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"size": 4}, "size"),
        ({"shard_size": -1}, "shard size"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "room for training"),
    ],
)
def test_config_refuses_bad_values(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ShardConfig(**changes).validate()

"""data.positives: second views from another image of the patient or study (MICLe), on a real sharded archive."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from radpretrain.config import load_config
from radpretrain.data import positives
from radpretrain.data.positives import GROUP_FIELD, MemberIndex, Partners, check_views, open_partners
from radpretrain.data.transforms import AugmentConfig, ViewsConfig, build_sample_fn, encode_labels, make_views
from radpretrain.errors import ConfigError
from radpretrain.pretrain.config import DataConfig, PretrainConfig
from radpretrain.pretrain.loop import pretrain
from radpretrain.pretrain.stream import with_key
from radpretrain.shards import codecs
from radpretrain.shards.format import STRONG_VIEWS, ShardSet
from radpretrain.shards.reader import build_pipeline

MakeConfig = Callable[..., PretrainConfig]
SIZE = 32


def read_train(shards: Path) -> dict[str, dict[str, Any]]:
    """Every train sample read with tarfile, independently of the index: key -> {"meta", "pixels", "shard"}."""
    samples: dict[str, dict[str, Any]] = {}
    for url in ShardSet.open(shards).urls("train"):
        with tarfile.open(url) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                entry = samples.setdefault(key, {"shard": Path(url).name})
                if ext == "json":
                    entry["meta"] = json.loads(data)
                else:
                    entry["pixels"] = codecs.decode_image(ext, data)
    return samples


def groups_of(truth: Mapping[str, Mapping[str, Any]], mode: str) -> dict[str, set[str]]:
    """key -> the keys of the train images of its patient (same_patient) or study (same_study), itself included."""
    field = GROUP_FIELD[mode]
    members: dict[str, set[str]] = {}
    for key, sample in truth.items():
        members.setdefault(sample["meta"][field], set()).add(key)
    return {key: members[sample["meta"][field]] for key, sample in truth.items()}


def allowed_share(keys: Iterable[str], groups: Mapping[str, set[str]]) -> float:
    """The share of `keys` whose patient / study has another train image: what the archive allows to pair."""
    keys = list(keys)
    return sum(len(groups[key]) >= 2 for key in keys) / len(keys)


def check_pairs(pairs: Iterable[tuple[str, str]], groups: Mapping[str, set[str]]) -> float:
    """Each (key, partner) is another image of the group where there is one, else the image itself; the
    measured share of cross-image pairs."""
    pairs = list(pairs)
    for key, partner in pairs:
        if len(groups[key]) >= 2:
            assert partner != key and partner in groups[key], (key, partner)
        else:
            assert partner == key, (key, partner)
    return sum(key != partner for key, partner in pairs) / len(pairs)


@pytest.fixture(scope="module")
def truth(tiny_shards: Path) -> dict[str, dict[str, Any]]:
    return read_train(tiny_shards)


#: The whole image at the stored window, nothing random: a view says which image it came from.
EXACT = AugmentConfig.evaluation()


def exact_view(sample: Mapping[str, Any]) -> np.ndarray:
    views = make_views(sample, ("plain",), ViewsConfig(plain=EXACT), image_size=SIZE)
    return views["plain"]


@pytest.mark.parametrize("mode", ["same_patient", "same_study"])
def test_every_sample_pairs_with_another_image_of_its_group_where_the_archive_has_one(
    mode: str, tiny_shards: Path, truth: dict[str, dict[str, Any]]
) -> None:
    shards = ShardSet.open(tiny_shards)
    partners = open_partners(mode, shards.urls("train"))
    groups = groups_of(truth, mode)
    expected = allowed_share(truth, groups)
    assert 0.5 < expected < 1.0  # the synthetic archive has both: groups of several images, and images alone
    assert partners.paired == round(expected * len(truth))
    assert partners.describe() == (
        f"{mode}: {expected:.0%} of {len(truth):,} train images have another image of their {GROUP_FIELD[mode]}"
    )

    # One pass over the train shards through the reader, strong views made with a deterministic policy
    fn = build_sample_fn(STRONG_VIEWS, ViewsConfig(strong=EXACT), shards.vocab, SIZE, seed=3, partners=partners)
    out = list(build_pipeline(shards.urls("train"), shuffle=0, map_fn=with_key(fn)))
    assert sorted(sample["key"] for sample in out) == sorted(truth)  # every train image once
    measured = check_pairs(((s["key"], s["partner"]) for s in out), groups)
    assert measured == pytest.approx(expected)
    # the views say where they came from: the first from the sample's own image, the second from its partner's
    for sample in out:
        own, other = truth[sample["key"]], truth[sample["partner"]]
        np.testing.assert_array_equal(sample["view0"].numpy(), exact_view(own), err_msg=sample["key"])
        np.testing.assert_array_equal(sample["view1"].numpy(), exact_view(other), err_msg=sample["key"])
        if mode == "same_study":  # a study belongs to one patient
            assert own["meta"]["patient"] == other["meta"]["patient"]
        labels = encode_labels(own["meta"], shards.vocab)  # the sample's own labels, whatever the partner
        assert {name: int(sample[name]) for name in labels} == labels


def test_partner_draws_are_uniform_seeded_and_never_the_image_itself(tiny_shards: Path) -> None:
    partners = open_partners("same_patient", ShardSet.open(tiny_shards).urls("train"))
    index = partners.index
    biggest = int(np.argmax(partners.size))
    key, size = index.keys[biggest].decode(), int(partners.size[biggest])
    assert size >= 4
    rng = np.random.default_rng(0)
    draws = Counter(partners.draw(key, rng) for _ in range(700 * (size - 1) // 7))
    others = set(partners.order[partners.start[biggest] : partners.start[biggest] + size].tolist()) - {biggest}
    assert set(draws) == others  # every other image of the patient, and never the image itself
    assert min(draws.values()) > 0.6 * 100 and max(draws.values()) < 1.4 * 100  # about 100 each
    assert partners.draw("not-a-key", rng) is None

    # The same seed draws the same partners; another seed others
    urls = ShardSet.open(tiny_shards).urls("train")

    def pairs(seed: int) -> list[tuple[str, str]]:
        fn = build_sample_fn(STRONG_VIEWS, None, {}, SIZE, seed=seed, partners=partners)
        return [(s["key"], s["partner"]) for s in build_pipeline(urls, shuffle=0, map_fn=with_key(fn))]

    assert pairs(5) == pairs(5)
    assert pairs(5) != pairs(6)


def test_images_alone_in_their_group_get_exactly_the_augment_views(tiny_shards: Path) -> None:
    """With no partner anywhere, same_patient makes byte for byte the views `augment` makes (random policies)."""
    shards = ShardSet.open(tiny_shards)
    urls = shards.urls("train")
    index = MemberIndex.build(urls)
    alone = Partners(dataclasses.replace(index, patient=np.full(len(index), -1)), "same_patient")
    assert alone.paired == 0 and "0% of" in alone.describe() and "have no patient in their json" in alone.describe()

    def run(partners: Partners | None) -> list[dict[str, Any]]:
        fn = build_sample_fn(("view0", "view1", "plain"), None, shards.vocab, SIZE, seed=11, partners=partners)
        return list(build_pipeline(urls, shuffle=8, seed=2, map_fn=with_key(fn)))

    today, paired = run(None), run(alone)
    assert len(today) == len(paired) == len(index)
    for a, b in zip(today, paired, strict=True):
        assert "partner" not in a and b["partner"] == b["key"] == a["key"]
        for name in ("view0", "view1", "plain", "body_part", "sex"):
            assert torch.equal(a[name], b[name]), (a["key"], name)


def test_the_member_index_is_cached_and_rebuilt_when_a_shard_changes(
    tiny_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    urls = []
    for url in ShardSet.open(tiny_shards).urls("train")[:3]:
        urls.append(str(shutil.copy2(url, tmp_path)))
    built: list[int] = []
    real_build = MemberIndex.build.__func__  # type: ignore[attr-defined]

    def counting_build(cls: type[MemberIndex], urls: Any) -> MemberIndex:
        built.append(len(urls))
        return real_build(cls, urls)

    monkeypatch.setattr(MemberIndex, "build", classmethod(counting_build))
    cache = tmp_path / "run" / positives.INDEX_FILE
    cache.parent.mkdir()
    first = MemberIndex.open(urls, cache)
    assert built == [3] and cache.is_file()
    again = MemberIndex.open(urls, cache)
    assert built == [3]  # read from the cache: not scanned again
    for name in MemberIndex.ARRAYS:
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert [p.name for p in cache.parent.iterdir()] == [positives.INDEX_FILE]  # written atomically, no temp left

    stat = os.stat(urls[1])
    os.utime(urls[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a shard rewritten since
    MemberIndex.open(urls, cache)
    assert built == [3, 3]
    MemberIndex.open(urls[:2], cache)  # other shards
    assert built == [3, 3, 2]
    cache.write_bytes(b"not an npz")
    with caplog.at_level(logging.WARNING):
        rebuilt = MemberIndex.open(urls, cache)
    assert built == [3, 3, 2, 3] and "rebuilding the member index" in caplog.text
    np.testing.assert_array_equal(rebuilt.keys, first.keys)


def test_a_partner_that_cannot_be_read_pairs_the_sample_with_itself_and_says_so(
    tiny_shards: Path, truth: dict[str, dict[str, Any]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    urls = [str(shutil.copy2(url, tmp_path)) for url in ShardSet.open(tiny_shards).urls("train")]
    partners = open_partners("same_patient", urls)
    for url in urls:  # every shard loses its second half after the index was made
        os.truncate(url, os.path.getsize(url) // 2)
    fn = build_sample_fn(STRONG_VIEWS, None, {}, SIZE, seed=0, partners=partners)
    with caplog.at_level(logging.WARNING, logger="radpretrain.data.transforms"):
        pairs = [(key, fn({"key": key, **sample})["partner"]) for key, sample in truth.items()]
    groups = groups_of(truth, "same_patient")
    alone = sum(key == partner for key, partner in pairs if len(groups[key]) >= 2)
    assert 0 < alone < partners.paired  # partners in the lost halves: the sample itself; the others still pair
    assert fn.unread == alone  # type: ignore[attr-defined]
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 3 and all("a partner image could not be read" in line for line in warned)
    assert "before the member its index names" in warned[0]


def test_bad_values_urls_and_one_view_runs_are_refused_in_one_line(tiny_shards: Path, make_config: MakeConfig) -> None:
    with pytest.raises(ConfigError, match=r"data\.positives.*'same_patients'"):
        load_config(PretrainConfig, None, ["data.positives=same_patients"])
    with pytest.raises(ConfigError, match="Did you mean 'same_patient'"):
        DataConfig(positives="same_patients").validate()  # type: ignore[arg-type]
    shard = ShardSet.open(tiny_shards).urls("train")[0]
    for url in (f"pipe:cat {shard}", "https://example.org/shards/train-000000.tar", str(tiny_shards / "no.tar")):
        with pytest.raises(ConfigError, match=r"reads partner images by offset from local tar files.*augment") as err:
            open_partners("same_patient", [shard, url])
        assert "\n" not in str(err.value)

    check_views("augment", ("plain",), ["patch_ae"])
    check_views("same_study", ("view0", "view1", "plain"), ["simclr", "metadata"])
    with pytest.raises(ConfigError, match=r"no task of this run \(patch_ae\) uses two views; add a two-view task"):
        check_views("same_patient", ("plain",), ["patch_ae"])
    run = make_config("tasks={metadata: 1.0}", "data.positives=same_patient").out
    with pytest.raises(ConfigError, match=r"\(metadata\) uses two views.*simclr.*vicreg"):
        pretrain(make_config("tasks={metadata: 1.0}", "data.positives=same_patient"))
    assert not (run / positives.INDEX_FILE).exists()  # refused before any work


def test_a_same_patient_run_logs_its_pairs_and_resumes_exactly(
    make_config: MakeConfig, tmp_path: Path, truth: dict[str, dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    # One loader worker: partner images are read in a forked process. 8 steps of 16 cross no epoch; stop at 3.
    common = ["steps=8", "data.batch_size=16", "data.workers=1", "data.log_samples=true", "probe.k=3"]
    common += ["data.positives=same_patient"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    with caplog.at_level(logging.INFO, logger="radpretrain.pretrain.loop"):
        pretrain(make_config(*common, out=whole))
    groups = groups_of(truth, "same_patient")
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("positives:")]
    share = allowed_share(truth, groups)
    assert said == [
        f"positives: same_patient: {share:.0%} of {len(truth):,} train images have another image of their patient"
    ]
    assert (whole / positives.INDEX_FILE).is_file()

    logged = [json.loads(line) for line in (whole / "samples-rank0.jsonl").read_text().splitlines()]
    pairs = [pair for line in logged for pair in zip(line["keys"], line["partners"], strict=True)]
    assert len(pairs) == 8 * 16
    measured = check_pairs(pairs, groups)
    assert measured == pytest.approx(allowed_share((key for key, _ in pairs), groups))
    assert measured > 0.5

    assert pretrain(make_config(*common, "stop_after=3", out=parts)).step == 3
    with pytest.raises(ConfigError, match=r"data\.positives was 'same_patient' and is now 'augment'"):
        pretrain(make_config(*common, "resume=true", "data.positives=augment", out=parts))
    assert pretrain(make_config(*common, "resume=true", out=parts)).step == 8
    assert (parts / "samples-rank0.jsonl").read_text() == (whole / "samples-rank0.jsonl").read_text()
    a, b = ([json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()] for run in (whole, parts))
    for ra, rb in zip(a, b, strict=True):
        for key, value in ra.items():
            if key != "images_per_s":
                assert rb[key] == pytest.approx(value, abs=1e-6), (ra["step"], key)

"""Model store: bit-exact round trips, cards, version ids, pruning, promotion and rollback, tamper detection."""

from __future__ import annotations

import json
import re
import struct
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from torch import nn

from inspection.errors import StoreError
from inspection.store import (
    STORE_FIELDS,
    STORE_FORMAT,
    ModelStore,
    ModelVersion,
    state_dict_sha256,
)

VERSION_RE = re.compile(r"^m(\d{4})-([0-9a-f]{8})$")
CARD = {"config": {"backbone": "mobilenetv2_100", "queries": 8}, "metrics": {"auroc": 0.97}, "threshold_version": 3}


def make_module() -> nn.Module:
    """A small model whose state_dict has float32 weights, BatchNorm buffers (int64 included), fp16 and bf16."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    model.train()
    model(torch.randn(16, 4))  # moves running_mean / running_var and num_batches_tracked off their defaults
    model.register_buffer("scale_half", torch.randn(3, 5).half())
    model.register_buffer("scale_bf16", torch.randn(7).bfloat16())
    model.register_buffer("threshold", torch.tensor([float("nan"), 0.5]))  # uncalibrated state is NaN
    return model


def bits(tensor: torch.Tensor) -> bytes:
    """The tensor's raw bytes, so NaN and the sign of zero compare exactly."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bit_exact(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert actual[key].shape == tensor.shape, key
        assert bits(actual[key]) == bits(tensor), key


def small_state(seed: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2,), float(seed))}


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models", keep=3)


def test_module_state_dict_round_trip_is_bit_exact(store: ModelStore) -> None:
    model = make_module()
    state = model.state_dict()
    assert state["1.num_batches_tracked"].dtype == torch.int64
    saved = store.save(state, CARD, promote=True)

    loaded, _ = store.load()
    assert_bit_exact({k: v.detach() for k, v in state.items()}, loaded)
    assert store.load(saved.version)[0].keys() == loaded.keys()

    fresh = make_module()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(loaded)
    model.eval()
    fresh.eval()
    x = torch.randn(5, 4)
    assert torch.equal(fresh(x), model(x))


def test_shared_and_non_contiguous_tensors_are_saved_as_plain_copies(store: ModelStore) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {"a": base, "tied": base, "t": base.t(), "row": base[1], "empty": torch.zeros(0, 3, dtype=torch.int32)}
    store.save(state, {}, promote=True)
    loaded, _ = store.load()
    assert_bit_exact({k: v.contiguous() for k, v in state.items()}, loaded)
    loaded["a"][0, 0] = -1.0
    assert loaded["tied"][0, 0] == 0.0 and base[0, 0] == 0.0


def test_card_round_trip_carries_store_fields(store: ModelStore) -> None:
    saved = store.save(make_module().state_dict(), CARD)
    weights = saved.path / "weights.safetensors"
    _, card = store.load(saved.version)

    assert {k: card[k] for k in CARD} == CARD
    assert set(card) == set(CARD) | set(STORE_FIELDS)
    assert card["version"] == saved.version
    assert card["format"] == STORE_FORMAT
    assert card["weights_file"] == "weights.safetensors"
    assert card["weights_sha256"] == state_dict_sha256(weights) == saved.sha256
    assert card["weights_bytes"] == weights.stat().st_size
    assert card["tensors"] == len(make_module().state_dict())
    assert card["created"] == saved.created and saved.created.endswith("Z")
    created = datetime.fromisoformat(saved.created)
    assert created.utcoffset() is not None and created.utcoffset().total_seconds() == 0
    assert abs((datetime.now(UTC) - created).total_seconds()) < 60
    assert json.loads((saved.path / "card.json").read_text()) == card
    assert saved.version.endswith(saved.sha256[:8])
    assert saved.promoted is False

    card["metrics"]["auroc"] = 0.0  # the loaded card is the caller's copy
    assert store.get(saved.version).card["metrics"]["auroc"] == 0.97


def test_version_card_is_read_only(store: ModelStore) -> None:
    saved = store.save(small_state(1), CARD)
    with pytest.raises(TypeError):
        saved.card["metrics"] = {}  # type: ignore[index]
    with pytest.raises(TypeError):
        saved.card["config"]["queries"] = 1  # type: ignore[index]
    with pytest.raises(AttributeError):
        saved.version = "m9999-00000000"  # type: ignore[misc]
    assert isinstance(saved, ModelVersion) and hash(saved) == hash(store.get(saved.version))


def test_version_ids_increase_and_are_never_reused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, keep=2)
    ids = [store.save(small_state(i), {"i": i}).version for i in range(5)]
    numbers = [int(VERSION_RE.fullmatch(v).group(1)) for v in ids]
    assert numbers == [1, 2, 3, 4, 5]
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert [v.version for v in store.versions()] == ids[-2:]  # oldest first
    assert store.save(small_state(0), {}).version.startswith("m0006-")  # same weights as m0001, new number


def test_pruning_keeps_newest_plus_promoted_and_rollback_target(store: ModelStore) -> None:
    v1 = store.save(small_state(1), {}, promote=True).version
    v2 = store.save(small_state(2), {}, promote=True).version  # v1 is now the rollback target
    later = [store.save(small_state(i), {}).version for i in range(3, 7)]

    kept = [v.version for v in store.versions()]
    assert kept == [v1, v2, *later[-3:]]
    assert not (store.root / later[0]).exists()
    assert store.promoted().version == v2
    assert store.rollback().version == v1

    # after the rollback v1 is promoted and v2 the target; a plain prune removes nothing else of theirs
    assert store.prune() == []
    store.save(small_state(7), {})
    assert [v.version for v in store.versions()][:2] == [v1, v2]


def test_pruning_without_promotion_keeps_the_newest(store: ModelStore) -> None:
    ids = [store.save(small_state(i), {}).version for i in range(5)]
    assert [v.version for v in store.versions()] == ids[-3:]


def test_promote_rollback_sequence(store: ModelStore) -> None:
    a = store.save(small_state(1), {"name": "a"}).version
    b = store.save(small_state(2), {"name": "b"}).version
    assert store.promoted() is None

    assert store.promote(a).promoted
    with pytest.raises(StoreError, match="no other existing version"):
        store.rollback()
    store.promote(b)
    assert store.promoted().version == b
    assert [v.promoted for v in store.versions()] == [False, True]

    assert store.rollback().version == a
    assert store.load()[1]["name"] == "a"
    assert store.rollback().version == b  # a rollback is a promotion: rolling back again undoes it
    assert store.rollback().version == a

    history = json.loads((store.root / "promotions.json").read_text())
    assert [e["version"] for e in history] == [a, b, a, b, a]
    assert all(set(e) == {"version", "at"} and e["at"].endswith("Z") for e in history)

    store.promote(a)  # already promoted: no new entry
    assert len(json.loads((store.root / "promotions.json").read_text())) == 5


def test_rollback_with_nothing_promoted_fails(store: ModelStore) -> None:
    store.save(small_state(1), {})
    with pytest.raises(StoreError, match="no version .* is promoted"):
        store.rollback()


def test_promoted_version_falls_back_when_its_directory_is_gone(store: ModelStore) -> None:
    a = store.save(small_state(1), {}, promote=True).version
    b = store.save(small_state(2), {}, promote=True).version
    for f in (store.root / b).iterdir():
        f.unlink()
    (store.root / b).rmdir()
    assert store.promoted().version == a


def test_promote_unknown_version_lists_known(store: ModelStore) -> None:
    a = store.save(small_state(1), {}).version
    with pytest.raises(StoreError, match=f"unknown model version 'm0042-deadbeef'.*{a}"):
        store.promote("m0042-deadbeef")
    with pytest.raises(StoreError, match="unknown model version '../etc'"):
        store.get("../etc")


def test_load_with_nothing_promoted_says_how_to_promote(store: ModelStore) -> None:
    with pytest.raises(StoreError, match=r"promote.*store is empty"):
        store.load()
    v = store.save(small_state(1), {}).version
    with pytest.raises(StoreError, match=rf"ModelStore\.promote\(version\).*{v}"):
        store.load()


def test_flipped_weight_byte_is_detected(store: ModelStore) -> None:
    saved = store.save(make_module().state_dict(), CARD, promote=True)
    weights = saved.path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # last byte of the last tensor's data: still a valid safetensors file
    weights.write_bytes(bytes(data))
    actual = state_dict_sha256(weights)
    with pytest.raises(StoreError) as info:
        store.load()
    message = str(info.value)
    assert "tampered or corrupted" in message
    assert str(weights) in message and saved.sha256 in message and actual in message


def test_edited_card_hash_is_detected(store: ModelStore) -> None:
    saved = store.save(small_state(1), CARD, promote=True)
    card_path = saved.path / "card.json"
    card = json.loads(card_path.read_text())
    card["weights_sha256"] = "0" * 64
    card_path.write_text(json.dumps(card))
    with pytest.raises(StoreError, match=f"tampered or corrupted: expected sha256 {'0' * 64}.*{saved.sha256}"):
        store.load(saved.version)


def test_unknown_card_format_is_refused(store: ModelStore) -> None:
    saved = store.save(small_state(1), {})
    card_path = saved.path / "card.json"
    card = json.loads(card_path.read_text())
    card["format"] = "inspection.model/2"
    card_path.write_text(json.dumps(card))
    with pytest.raises(StoreError, match="format 'inspection.model/2'"):
        store.load(saved.version)


@pytest.mark.parametrize(
    ("card", "named"),
    [
        ({"metrics": {"auroc": torch.tensor(0.9)}}, "metrics.auroc"),
        ({"opened": datetime(2026, 1, 1)}, "opened"),
        ({"sizes": [1, 2, {3, 4}]}, r"sizes\[2\]"),
        ({"loss": float("nan")}, "loss"),
        ({"by_line": {1: 0.5}}, "by_line"),
        ({"version": "mine"}, "'version' is written by the store"),
    ],
)
def test_non_json_card_is_rejected_naming_the_key(store: ModelStore, card: dict, named: str) -> None:
    with pytest.raises(StoreError, match=named):
        store.save(small_state(1), card)
    assert store.versions() == []
    assert all(p.name == ".lock" for p in store.root.iterdir())


@pytest.mark.parametrize(
    ("state", "named"),
    [
        ({1: torch.zeros(1)}, "keys must be non-empty str"),
        ({"w": [1.0, 2.0]}, r"state_dict\['w'\] must be a torch.Tensor"),
        ({}, "empty"),
        ({"__metadata__": torch.zeros(1)}, "reserved"),
    ],
)
def test_invalid_state_dict_is_rejected(store: ModelStore, state: dict, named: str) -> None:
    with pytest.raises(StoreError, match=named):
        store.save(state, {})


def test_keep_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="keep must be an integer >= 1"):
        ModelStore(tmp_path, keep=0)


def test_concurrent_saves_get_unique_versions(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def worker(offset: int) -> None:
        try:
            store = ModelStore(tmp_path, keep=100)  # one store object per writer, as separate processes would
            for i in range(3):
                store.save(small_state(offset * 10 + i), {"writer": offset})
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    numbers = [v.number for v in ModelStore(tmp_path, keep=100).versions()]
    assert numbers == list(range(1, 13))


def test_store_holds_no_pickles(store: ModelStore) -> None:
    store.save(make_module().state_dict(), CARD, promote=True)
    for i in range(4):
        store.save(small_state(i), {"i": i}, promote=i % 2 == 0)
    store.rollback()
    files = [p for p in store.root.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert path.suffix in {".safetensors", ".json"} or path.name == ".lock", path
        if path.suffix == ".safetensors":
            raw = path.read_bytes()
            (header_len,) = struct.unpack("<Q", raw[:8])
            json.loads(raw[8 : 8 + header_len])  # a safetensors header is JSON, never a pickle
        elif path.suffix == ".json":
            json.loads(path.read_text())
    assert not any(p.name.startswith((".tmp-", ".trash-")) for p in store.root.iterdir())

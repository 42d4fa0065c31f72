"""Model store: bit-exact round trips, cards, version ids, pruning, promotion and rollback, tamper detection,
read-only and missing stores."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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
#: The installed command line, run as a real process.
EXE = str(Path(sys.executable).parent / "inspection")


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
    return ModelStore(tmp_path / "models", keep=3, create=True)


def flip_last_byte(path: Path) -> None:
    """Corrupt a weights file so that it still parses: the last byte of the last tensor's data changes."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (``None`` for a directory), to show nothing changed."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Make ``path`` read-only for this process for real, restoring it afterwards.

    As root, permission bits stop no write, so the directory is bind-mounted read-only over itself; as any
    other user, the write bits are cleared.
    """
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
        for p, mode in modes.items():
            p.chmod(mode & ~0o222)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("running as root without mount(8): cannot make a directory read-only for this process")
    bind = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, text=True)
    if bind.returncode != 0:
        pytest.skip(f"running as root and a bind mount is not allowed here: {bind.stderr.strip()}")
    try:
        ro = subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], capture_output=True, text=True)
        if ro.returncode != 0:
            pytest.skip(f"running as root and a read-only remount is not allowed here: {ro.stderr.strip()}")
        yield
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            # still busy: tensors loaded from the mount keep their files mapped; detach it now, the kernel
            # drops it once they are freed
            subprocess.run(["umount", "--lazy", str(path)], check=True)


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
    a = store.save(small_state(1), {"name": "a", "threshold_version": "t-a"}).version  # promote() needs calibrated
    b = store.save(small_state(2), {"name": "b", "threshold_version": "t-b"}).version
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


@pytest.mark.parametrize("with_lock", [True, False], ids=["lock-file", "no-lock-file"])
def test_read_only_store_serves_and_lists_and_refuses_writers(tmp_path: Path, with_lock: bool) -> None:
    writer = ModelStore(tmp_path / "models", create=True)
    a = writer.save(small_state(1), CARD, promote=True).version
    state = make_module().state_dict()
    b = writer.save(state, CARD, promote=True).version
    if not with_lock:
        (writer.root / ".lock").unlink()  # e.g. a copy of the store without its dot files
    before = tree(writer.root)

    with read_only(writer.root):
        with pytest.raises(OSError):
            (writer.root / "probe").touch()  # the directory really is read-only for this process
        store = ModelStore(writer.root)
        entry = store.promoted()  # what `inspection serve` does: promoted(), then load() of that version
        assert entry is not None and entry.version == b
        loaded, card = store.load(entry.version)
        assert_bit_exact({k: v.detach() for k, v in state.items()}, loaded)
        assert card["version"] == b and store.load()[1]["version"] == b
        assert [(v.version, v.promoted) for v in store.versions()] == [(a, False), (b, True)]

        listed = subprocess.run([EXE, "models", "list", "--store", str(writer.root)], capture_output=True,
                                text=True, timeout=120)
        assert listed.returncode == 0, listed.stderr
        rows = [json.loads(line) for line in listed.stdout.splitlines()]
        assert [(r["version"], r["promoted"]) for r in rows] == [(a, False), (b, True)]

        writers = {
            "save a new version": lambda: store.save(small_state(3), CARD),
            f"promote {a}": lambda: store.promote(a),
            "roll back": store.rollback,
            "prune old versions": store.prune,
        }
        for action, call in writers.items():
            with pytest.raises(StoreError) as info:
                call()
            message = str(info.value)
            assert f"model store {writer.root} is read-only" in message and f"cannot {action}" in message, message
    assert tree(writer.root) == before


def test_missing_store_is_an_error_naming_it_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "typo" / "models"
    store = ModelStore(missing)
    readers_and_writers = [
        store.load, store.promoted, store.versions, lambda: store.get("m0001-deadbeef"),
        lambda: store.promote("m0001-deadbeef"), store.rollback, store.prune,
    ]
    for call in readers_and_writers:
        with pytest.raises(StoreError, match=f"model store {re.escape(str(missing))} does not exist.*nothing was"):
            call()
    assert not (tmp_path / "typo").exists()

    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match="exists but is not a directory"):
        ModelStore(tmp_path / "file")

    saved = ModelStore(missing).save(small_state(1), {})  # only a save (or create=True) makes a store
    assert saved.path.parent == missing and ModelStore(missing).get(saved.version) == saved
    assert ModelStore(tmp_path / "new", create=True).versions() == [] and (tmp_path / "new").is_dir()


def test_promote_refuses_tampered_weights(store: ModelStore) -> None:
    a = store.save(small_state(1), CARD, promote=True).version
    b = store.save(make_module().state_dict(), CARD)
    history = (store.root / "promotions.json").read_bytes()
    weights = b.path / "weights.safetensors"
    flip_last_byte(weights)
    with pytest.raises(StoreError, match=f"{re.escape(str(weights))} of version {b.version} is tampered or "
                                          f"corrupted: expected sha256 {b.sha256}.*refusing to promote it"):
        store.promote(b.version)
    assert store.promoted().version == a
    assert (store.root / "promotions.json").read_bytes() == history


@pytest.mark.parametrize(
    ("state", "card", "named"),
    [
        (small_state(2), {"name": "no threshold version"}, "its card has threshold_version None"),
        (small_state(2), {"threshold_version": None}, "its card has threshold_version None"),  # as train saves
        (small_state(2), {"threshold_version": ""}, "its card has threshold_version ''"),
        ({"w": torch.ones(2), "thresholds": torch.tensor([float("nan"), 0.5])}, {"threshold_version": "t1"},
         "1 of 2 values of its 'thresholds' tensor are NaN or infinite"),
    ],
    ids=["no-field", "null", "empty", "nan-thresholds"],
)
def test_promote_refuses_uncalibrated_versions(store: ModelStore, state: dict, card: dict, named: str) -> None:
    a = store.save(small_state(1), CARD, promote=True).version
    v = store.save(state, card).version
    with pytest.raises(StoreError, match=f"version {v} in .* is not calibrated: {re.escape(named)}.*"
                                          "run `inspection calibrate` on it first"):
        store.promote(v)
    assert store.promoted().version == a
    calibrated = store.save({"w": torch.ones(2), "thresholds": torch.tensor([0.25, 0.5])}, {"threshold_version": "t1"})
    assert store.promote(calibrated.version).promoted
    # saving with promote=True keeps promoting whatever was trained (calibration saves the calibrated version)
    assert store.save(state, card, promote=True).promoted


def test_rollback_refuses_a_tampered_target(store: ModelStore) -> None:
    a = store.save(small_state(1), CARD, promote=True)
    b = store.save(small_state(2), CARD, promote=True).version
    flip_last_byte(a.path / "weights.safetensors")
    with pytest.raises(StoreError, match=f"version {a.version} is tampered or corrupted.*refusing to roll back "
                                          f"to it from {b}"):
        store.rollback()
    assert store.promoted().version == b

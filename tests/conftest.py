"""Shared fixtures: one embedded Kafka broker per test session, fresh topics and group ids per test.

The broker starts only when a test asks for it (directly or through ``topics``); such tests are marked
``kafka`` automatically, so ``-m "not kafka"`` runs everything else without a broker.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from inspection.errors import BrokerError

# kafka-python's protocol schema loader calls the deprecated importlib.resources.read_text at import time;
# the warning is attributed to importlib, so pyproject's "kafka.*" filter does not catch it.
_KAFKA_IMPORT_WARNINGS = r"(open|read)_text is deprecated"
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", _KAFKA_IMPORT_WARNINGS, DeprecationWarning)
    from services.broker import EmbeddedBroker, TopicNames, create_topics, tansu_binary

#: Partitions of each input topic in the per-test topic sets.
TEST_PARTITIONS = 3
_LOG_TAIL_CHARS = 4_000


def pytest_configure(config: pytest.Config) -> None:
    """Silence the same warnings for kafka-python modules first imported later, inside tests."""
    config.addinivalue_line("filterwarnings", f"ignore:{_KAFKA_IMPORT_WARNINGS}:DeprecationWarning")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that uses the session broker (directly or through another fixture) as ``kafka``."""
    for item in items:
        if "broker" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kafka)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """One embedded broker for the whole session; the session fails if its log reports a panic."""
    try:
        tansu_binary()
    except BrokerError as exc:
        pytest.skip(f"embedded Kafka broker unavailable: {exc}")
    log_path = tmp_path_factory.mktemp("broker") / "tansu.log"
    embedded = EmbeddedBroker(log_path=log_path)
    embedded.start()
    try:
        yield embedded
    finally:
        embedded.stop()
    if embedded.panicked():
        pytest.fail(
            f"the session's embedded broker panicked; log {log_path}:\n{embedded.log_text()[-_LOG_TAIL_CHARS:]}",
            pytrace=False,
        )


@pytest.fixture
def topics(broker: EmbeddedBroker) -> TopicNames:
    """A fresh, isolated set of topics (inputs co-partitioned with 3 partitions) on the session broker."""
    names = TopicNames.with_prefix(f"t{uuid.uuid4().hex[:12]}.")
    create_topics(broker.bootstrap, names, TEST_PARTITIONS)
    return names


@pytest.fixture
def group_id() -> str:
    """A consumer group id no other test uses."""
    return f"g-{uuid.uuid4().hex}"


# ---------------------------------------------------------------------------------------------- model factories
#: Width of the small models the model and explanation tests build.
SMALL_DIM = 32


@pytest.fixture(scope="session")
def small_model_factory():
    """Build a small but real fusion model (real timm backbone at 64 px, short spectra, a 4-expert MoE)."""

    def build(**overrides):
        import torch

        from fusion.bridge import BridgeConfig
        from fusion.moe import MoEConfig
        from inspection.model import EncoderSpec, InspectionModel, ModelConfig

        torch.manual_seed(0)
        encoders = {
            "vision": EncoderSpec("vision", {"pretrained": False, "preprocess": {"image_size": 64}}),
            "vibration": EncoderSpec("waveform", {"band_bins": 16, "env_band_bins": 16, "wave_tokens": 4,
                                                  "preprocess": {"n_bins": 64, "env_bins": 32, "wave_len": 512}}),
            "temperature": EncoderSpec("series", {"patch": 5, "preprocess": {"samples": 20}}),
        }
        bridge = BridgeConfig(dim=SMALL_DIM, n_queries=4, n_heads=4, n_layers=1, dropout=0.0,
                              moe=MoEConfig(dim=SMALL_DIM, hidden=16, n_experts=4, top_k=2))
        return InspectionModel(ModelConfig(encoders=encoders, bridge=bridge, lines=("*", "line-2"), **overrides))

    return build


@pytest.fixture(scope="session")
def unit_factory():
    """Build unit ``i`` (lines alternate between line-1 and line-2) with random readings, minus ``drop``."""

    def build(i: int, rng, drop: tuple[str, ...] = ()):
        from datetime import UTC, datetime

        from inspection.records import TemperatureReading, Unit, VibrationReading, VisionReading

        line = "line-1" if i % 2 else "line-2"

        def env(m: str) -> dict:
            return dict(unit_id=f"u{i}", line_id=line, reading_id=f"u{i}-{m}", source="plant/t",
                        event_time=datetime(2026, 2, 1, tzinfo=UTC))

        parts = {
            "vision": VisionReading.from_array(rng.integers(0, 255, (80, 80), dtype="uint8"), **env("vision")),
            "vibration": VibrationReading(values=rng.standard_normal((1, 2000)), sample_rate_hz=48828.0, unit="g",
                                          **env("vibration")),
            "temperature": TemperatureReading(values=rng.normal(50, 3, (2, 30)), sample_rate_hz=1.0, unit="degC",
                                              **env("temperature")),
        }
        return Unit(f"u{i}", line, **{m: r for m, r in parts.items() if m not in drop})

    return build


# ---------------------------------------------------------------------------------------------- S3 emulator
@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A local S3 emulator (``moto[server]``) in a child process; yields the ``AWS_*`` settings for Tansu.

    Tansu's ``s3://`` storage keeps topics, records and committed offsets across a broker restart. Create a
    bucket with ``boto3.client("s3", endpoint_url=env["AWS_ENDPOINT"], ...)`` before pointing a broker at it.
    """
    import socket
    import subprocess
    import sys
    import time

    try:
        import boto3
        import moto.server  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"the S3 emulator needs moto[server] (the dev extra: pip install -e .[dev]): {exc}")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "eu-west-2", "AWS_ALLOW_HTTP": "true"}
    try:
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                              region_name="eu-west-2")
        deadline = time.monotonic() + 30
        while True:
            try:
                client.list_buckets()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the S3 emulator did not start; log {log_path}:\n{log_path.read_text()[-2000:]}")
                time.sleep(0.2)
        yield env
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def serving_store_factory(tmp_path_factory, small_model_factory, unit_factory) -> Callable[..., Path]:
    """Save a small calibrated model into a model store and return the store's directory.

    The model is the shared small fusion model with its feature normalisation fitted on 16 units and both
    line thresholds set to the median score of those units (a calibration by hand, so about half the units
    are defects). ``variant`` shifts the defect head's bias, giving a second model with other scores;
    ``threshold_version`` names the calibration (default ``t-test-<variant>``).
    """

    def build(root: Path | None = None, variant: int = 0, threshold_version: str | None = None) -> Path:
        import numpy as np
        import torch

        from inspection.store import ModelStore

        root = root if root is not None else tmp_path_factory.mktemp("store")
        model = small_model_factory()
        rng = np.random.default_rng(0)
        units = [unit_factory(i, rng) for i in range(16)]
        model.fit_normalisation(model.batch(units))
        model.eval()
        with torch.no_grad():
            model.defect_head.bias.add_(float(variant))
            scores = model(model.batch(units)).score
            model.thresholds.fill_(float(scores.median()))
        card = {"model_config": model.config.to_dict(),
                "threshold_version": threshold_version or f"t-test-{variant}"}
        ModelStore(root).save(model.state_dict(), card, promote=True)
        return root

    return build

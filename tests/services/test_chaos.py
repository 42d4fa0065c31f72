"""A small chaos run (``bench/chaos.py``) in the test suite: mixed codecs, malformed readings and corrupt batches
while the service is SIGKILLed and restarted and the broker (on S3 storage) restarted; nothing may be lost."""

from __future__ import annotations

import importlib.util
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from services.broker import EmbeddedBroker

pytestmark = [pytest.mark.slow]

CHAOS = Path(__file__).parents[2] / "bench" / "chaos.py"


def load_chaos():
    spec = importlib.util.spec_from_file_location("bench_chaos", CHAOS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_small_chaos_run_loses_nothing(s3_endpoint, serving_store, unit_factory, tmp_path):
    import boto3

    chaos = load_chaos()
    bucket = f"chaos-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint["AWS_ENDPOINT"], aws_access_key_id="test",
                 aws_secret_access_key="test", region_name=s3_endpoint["AWS_DEFAULT_REGION"]).create_bucket(
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": s3_endpoint["AWS_DEFAULT_REGION"]})
    rng = np.random.default_rng(21)
    units = [unit_factory(i, rng) for i in range(240)]
    broker = EmbeddedBroker(storage=f"s3://{bucket}/", env=s3_endpoint, log_path=tmp_path / "tansu.log",
                            ready_timeout_s=30)
    broker.start()
    try:
        result = chaos.run_chaos(broker, serving_store, units, tmp_path, kills=1, broker_restarts=1, seed=3,
                                 rate=24.0, malformed_share=0.2, corrupt_share=0.1, settle_timeout_s=240)
    finally:
        broker.stop()
    assert not broker.panicked(), broker.log_text()[-3000:]
    assert result["kills"] == 1 and result["broker_restarts"] == 1
    assert result["lost"] == 0 and result["lost_readings"] == 0, result
    assert result["duplicate_ids_consistent"], result
    assert result["units"] == result["decided"] + result["dead_lettered"]
    assert result["decided"] >= len(units)  # every good unit decided (bad ones are dead-lettered)
    assert not result["wrong_reason"], result
    assert set(result["codecs"]) == {"none", "gzip", "snappy", "lz4", "zstd"}
    assert result["undecodable_batches"] >= 1 and result["dlq_by_reason"].get("undecodable_batch", 0) >= 1
    assert result["service_exit_code"] == 0

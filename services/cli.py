"""The ``inspection`` command line.

Commands::

    inspection broker                 run the embedded Kafka-compatible broker (Tansu) on 127.0.0.1
    inspection topics create          create the co-partitioned input topics, decisions and dlq
    inspection produce                publish units of a data set (or history file) to the input topics
    inspection consume --topic T      print decoded records of a topic as JSON lines
    inspection data info|fetch|export data set sizes and licences; fetch the bearing recordings; export bundled data
                                      as Parquet history or an image folder (docs/own-data.md)
    inspection serve --config F       the stream service: join, score, explain, decide (docs/service.md)
    inspection demo                   train (once) -> broker -> serve with reports -> decisions, dead letters,
                                      re-scoring, summary, on real data (services/demo.py)
    inspection explain --history H    explanation reports (JSON + HTML) of archived units, and an index
    inspection report --from DIR      index page and global view over explanation reports
    inspection adapt --from VERSION   train a line's LoRA adapter on a frozen base version (docs/adapters.md)
    inspection adapters list|promote|rollback   per-line adapter versions of a model store

Exit codes: 0 success, 1 a check failed (e.g. a demo check: the failed checks are named), 2 invalid input or an
error the message explains, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import textwrap
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from inspection.errors import ConfigError, InspectionError, StoreError
from inspection.records import MODALITIES, Decision, Unit

log = logging.getLogger("inspection.cli")


# ----------------------------------------------------------------------------------------------- shared
def _add_models_dir(p: argparse.ArgumentParser) -> None:
    """``--models-dir``: the folder holding one model store per family (``<dir>/<bench>``, ``<dir>/<name>``), for
    the commands that pick the family themselves. ``--store`` names one model store in every command, so here it is
    refused with a pointer to ``--models-dir``."""
    p.add_argument("--models-dir", default="models", metavar="DIR",
                   help="folder of the model stores, one per family: <DIR>/<bench>, <DIR>/<name> (default models)")
    p.add_argument("--store", dest="store_given", help=argparse.SUPPRESS)


def _check_models_dir(args: argparse.Namespace) -> None:
    if getattr(args, "store_given", None) is not None:
        raise ConfigError(f"`inspection {args.command}` takes --models-dir (the folder of the model stores, one per "
                          f"family: --models-dir {args.store_given}); --store names a single "
                          "model store, as in serve, rescore, audit and models")


def _add_kafka_args(p: argparse.ArgumentParser, *, prefix: bool = True) -> None:
    p.add_argument("--bootstrap", default=os.environ.get("INSPECTION_BOOTSTRAP"),
                   help="Kafka bootstrap servers host:port[,host:port] (default: $INSPECTION_BOOTSTRAP)")
    if prefix:
        p.add_argument("--topic-prefix", default="", help="prefix in front of every default topic name")
    g = p.add_argument_group("Kafka security (passed to the client as given)")
    g.add_argument("--security-protocol", default="PLAINTEXT",
                   choices=["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"])
    g.add_argument("--sasl-mechanism")
    g.add_argument("--sasl-username")
    g.add_argument("--sasl-password-env", metavar="VAR",
                   help="name of the environment variable holding the SASL password (never pass it on argv)")
    g.add_argument("--ssl-cafile")
    g.add_argument("--ssl-certfile")
    g.add_argument("--ssl-keyfile")


def _security(args: argparse.Namespace) -> dict:
    from services.clients import security_config

    settings = {
        "sasl_mechanism": args.sasl_mechanism,
        "sasl_plain_username": args.sasl_username,
        "ssl_cafile": args.ssl_cafile,
        "ssl_certfile": args.ssl_certfile,
        "ssl_keyfile": args.ssl_keyfile,
    }
    if args.sasl_password_env:
        if args.sasl_password_env not in os.environ:
            raise ConfigError(f"--sasl-password-env names ${args.sasl_password_env}, which is not set")
        settings["sasl_plain_password"] = os.environ[args.sasl_password_env]
    return security_config(args.security_protocol, **{k: v for k, v in settings.items() if v is not None})


def _bootstrap(args: argparse.Namespace) -> str:
    if not args.bootstrap:
        raise ConfigError("--bootstrap is required (or set $INSPECTION_BOOTSTRAP), e.g. --bootstrap 127.0.0.1:9092")
    return args.bootstrap


def _topics(args: argparse.Namespace):
    from services.broker import TopicNames

    return TopicNames.with_prefix(args.topic_prefix) if args.topic_prefix else TopicNames()


def _progress(total: int | None, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="unit", file=sys.stderr, disable=None, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------- broker
def cmd_broker(args: argparse.Namespace) -> int:
    from services.broker import EmbeddedBroker, check_port_free, create_topics

    if args.port is not None:  # the broker panics on a busy port, yet exits 0: say so in one line instead
        check_port_free("127.0.0.1", args.port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log_path = Path(args.log) if args.log else None
    with EmbeddedBroker(port=args.port, storage=args.storage, log_path=log_path) as broker:
        if args.partitions:
            create_topics(broker.bootstrap, _topics(args), args.partitions)
        print(f"broker ready: bootstrap={broker.bootstrap} pid={broker.pid} storage={args.storage} "
              f"log={broker.log_path}", flush=True)
        print("stop with Ctrl-C or SIGTERM", file=sys.stderr, flush=True)
        while not stop.wait(1.0):
            if not broker.running:
                print(f"inspection: error: the broker exited; log tail:\n{broker.log_text()[-2000:]}", file=sys.stderr)
                return 2
    return 0


def cmd_topics_create(args: argparse.Namespace) -> int:
    from services.broker import create_topics
    from services.clients import check_reachable

    topics = _topics(args)
    check_reachable(_bootstrap(args))
    create_topics(_bootstrap(args), topics, args.partitions, client_config=_security(args))
    print(json.dumps({"created": list(topics.all), "input_partitions": args.partitions}))
    return 0


# --------------------------------------------------------------------------------------------- produce
def _units_from(args: argparse.Namespace) -> tuple[Iterator[Unit], int | None, str]:
    """Units to publish, their count when known, and a note on where they came from."""
    if args.history:
        from inspection.data.history import count_history, read_history

        total = count_history(args.history)
        limit = min(total, args.limit) if args.limit else total
        it = (a.unit for _, a in zip(range(limit), read_history(args.history), strict=False))
        return it, limit, f"history {args.history}"
    from inspection.data.composite import CompositeBuilder, CompositeConfig

    builder = CompositeBuilder(CompositeConfig(seed=args.seed, temperature_source=args.temperature))
    note = f"composite {args.split} split, seed {args.seed}, temperature from {builder.temperature_source}"
    if builder.temperature_source == "synthetic":
        note += " (synthetic temperature)"
    return builder.iter_units(args.split, args.limit), args.limit, note


def cmd_produce(args: argparse.Namespace) -> int:
    from services.clients import check_reachable, make_producer
    from services.publish import FaultPlan, parse_modality_values, publish_units

    bootstrap = _bootstrap(args)
    faults = FaultPlan(
        drop=parse_modality_values(args.drop, "--drop"),
        delay_ms=parse_modality_values(args.delay, "--delay"),
        seed=args.seed,
    )
    if args.history:
        from inspection.data.history import count_history

        count_history(args.history)  # a missing or unreadable history file is named before the broker is tried
    check_reachable(bootstrap)  # before the data sets load: an unreachable broker fails in seconds
    units, total, note = _units_from(args)
    print(f"producing {total if total is not None else 'all'} units: {note}", file=sys.stderr)
    kept: list[Unit] = []
    producer = make_producer(bootstrap, **_security(args))
    try:
        with _progress(total, "produce") as bar:
            def on_unit(u: Unit) -> None:
                bar.update(1)
                if args.archive:
                    kept.append(u)

            report = publish_units(producer, units, _topics(args), rate=args.rate, faults=faults, on_unit=on_unit)
    finally:
        producer.close(timeout=10)
    if args.archive:
        from inspection.data.history import ArchivedUnit, write_history

        archived = []
        for u in kept:  # archive what was sent: readings that were dropped never existed downstream
            sent = {m: report.coordinates[(u.unit_id, m)] for m in u.present if (u.unit_id, m) in report.coordinates}
            if sent:
                archived.append(ArchivedUnit(u.without(*(set(u.present) - set(sent))), sent))
        write_history(args.archive, archived)
    print(json.dumps({"units": report.units, "sent": dict(report.sent), "dropped": dict(report.dropped),
                      "seconds": round(report.seconds, 3), "source": note,
                      "archive": str(args.archive) if args.archive else None}))
    return 0


# --------------------------------------------------------------------------------------------- consume
def _describe(record, topics) -> dict:
    from services.readback import decode_record

    where = f"{record.topic}[{record.partition}]@{record.offset}"
    if record.topic in topics.inputs:
        got = decode_record(record, topics)
        if got.error is not None:
            return {"at": where, "rejected": got.error.reason.value, "detail": got.error.detail}
        r = got.reading
        out = {"at": where, "modality": r.modality, "unit_id": r.unit_id, "line_id": r.line_id,
               "reading_id": r.reading_id, "event_time": r.event_time.isoformat()}
        if r.modality == "vision":
            out |= {"content_type": r.content_type, "bytes": len(r.data), "width": r.width, "height": r.height,
                    "dtype": str(r.image.dtype), "channels": 1 if r.image.ndim == 2 else r.image.shape[2]}
        else:
            out |= {"channels": r.channels, "samples": r.samples, "sample_rate_hz": r.sample_rate_hz,
                    "unit": r.unit, "min": float(r.values.min()), "max": float(r.values.max())}
        return out
    if record.topic == topics.decisions:
        try:
            return {"at": where, **Decision.from_json(record.value).to_cloudevent()}
        except InspectionError as exc:
            return {"at": where, "rejected": str(exc)}
    headers = {k: (v.decode("utf-8", "replace") if v is not None else None) for k, v in record.headers or ()}
    return {"at": where, "key": record.key.decode("utf-8", "replace") if record.key else None,
            "bytes": len(record.value or b""), "headers": headers}


def cmd_consume(args: argparse.Namespace) -> int:
    from services.clients import check_reachable, make_consumer, wait_for_assignment
    from services.readback import drain

    if args.max is not None and args.max < 1:
        raise ConfigError(f"--max must be >= 1; got {args.max}")
    topics = _topics(args)
    group = args.group or f"inspection-consume-{uuid.uuid4().hex[:8]}"
    check_reachable(_bootstrap(args))
    consumer = make_consumer([args.topic], _bootstrap(args), group,
                             auto_offset_reset="earliest" if args.from_beginning else "latest", **_security(args))
    n = 0
    try:
        wait_for_assignment(consumer, timeout_s=30)
        for record in drain(consumer, max_messages=args.max, idle_timeout_s=args.idle_timeout):
            print(json.dumps(_describe(record, topics), default=str), flush=True)
            n += 1
            if n == args.max:  # one poll may return more records than are left to print
                break
    finally:
        consumer.close(autocommit=False)
    print(f"{n} records from {args.topic}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------------ data
def cmd_data_info(args: argparse.Namespace) -> int:
    from inspection.data import bearings, elpv, skab
    from inspection.data.composite import CompositeBuilder, CompositeConfig

    ds = elpv.load_elpv()
    recs = bearings.load_bearings()
    info: dict = {
        "elpv": {"images": len(ds), "grades": ds.grade_counts(), "licence": elpv.LICENCE},
        "bearings": {"recordings": len(recs), "classes": dict(Counter(r.label for r in recs)),
                     "licence": bearings.LICENCE},
    }
    try:
        files = skab.load_skab(args.skab)
        info["skab"] = {"root": str(skab.skab_root(args.skab)), "files": len(files), "licence": skab.LICENCE}
    except InspectionError as exc:
        info["skab"] = {"missing": str(exc)}
    builder = CompositeBuilder(CompositeConfig(seed=args.seed, skab_root=args.skab))
    info["composite"] = {"temperature_source": builder.temperature_source,
                         "pools": {s: builder.pool_sizes(s) for s in ("train", "test")}}
    print(json.dumps(info, indent=2, default=str))
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from inspection.data import bearings

    path = bearings.fetch_bearings()
    print(json.dumps({"bearings": str(path)}))
    return 0


def cmd_data_export(args: argparse.Namespace) -> int:
    """Bundled data in the own-data formats, so `inspection train --data` can be tried without a broker."""
    if args.limit < 1:
        raise ConfigError(f"--limit must be >= 1; got {args.limit}")
    if args.images:
        from inspection.data.own_data import export_elpv_folder

        if args.labels_out:
            raise ConfigError("--labels-out applies to history; an image folder is labelled by its layout")
        counts = export_elpv_folder(args.out, args.limit, seed=args.seed)
        print(json.dumps({"folder": str(args.out), "images": counts}))
        return 0
    from inspection.data.composite import CompositeBuilder, CompositeConfig
    from inspection.data.history import write_history
    from inspection.data.own_data import write_labels

    builder = CompositeBuilder(CompositeConfig(seed=args.seed, temperature_source=args.temperature))
    units = builder.units(args.split, args.limit)
    if args.labels_out:
        write_labels(args.labels_out, units)
        units = [dataclasses.replace(u, label=None) for u in units]
    n = write_history(args.out, units)
    print(json.dumps({"history": str(args.out), "units": n, "labels": str(args.labels_out) if args.labels_out else
                      None, "source": f"composite {args.split} split, seed {args.seed}, temperature from "
                                      f"{builder.temperature_source}"}))
    return 0


# ------------------------------------------------------------------------------------------------ demo
def cmd_demo(args: argparse.Namespace) -> int:
    """``inspection demo`` (:mod:`services.demo`): the summary as JSON on stdout, in words on stderr."""
    from services.demo import DemoOptions, run_demo

    options = DemoOptions(units=args.units, seed=args.seed, rate=args.rate, partitions=args.partitions,
                          out=Path(args.out), store=Path(args.store) if args.store else None, preset=args.preset,
                          missing=args.missing, malformed=args.malformed, keep_running=args.keep_running,
                          page_port=args.page_port, results=Path(args.results) if args.results else None)
    result = run_demo(options)
    print(json.dumps(result.summary, indent=2))
    return result.exit_code


# ----------------------------------------------------------------------------------------------- serve
def cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses as dc

    from services.clients import check_reachable
    from services.serve import StreamService, configure_logging
    from services.service_config import load_service_config

    config = load_service_config(args.config)
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1; got {args.workers}")
    if config.metrics.enabled:  # a configuration error is reported before the network is tried
        from services.operator_page import resolve_token

        resolve_token(config.metrics.host, config.metrics.token_env)
    if args.bootstrap or config.kafka.bootstrap:  # an unreachable broker fails in seconds, before any worker starts
        check_reachable(args.bootstrap or config.kafka.bootstrap)
    if args.workers > 1:
        from services.workers import run_workers

        if args.verbose == 0:
            logging.getLogger().setLevel(logging.INFO)
        serve_args = ["--config", str(args.config.resolve())]
        if args.bootstrap:
            serve_args += ["--bootstrap", args.bootstrap]
        if args.group_id:
            serve_args += ["--group-id", args.group_id]
        port = args.metrics_port if args.metrics_port is not None else config.metrics.port
        return run_workers(serve_args, args.workers, args.instance_id or "serve", port, args.verbose)
    if args.group_id:
        config = dc.replace(config, kafka=dc.replace(config.kafka, group_id=args.group_id))
    if args.metrics_port is not None:
        config = dc.replace(config, metrics=dc.replace(config.metrics, port=args.metrics_port))
    bootstrap = args.bootstrap or config.kafka.bootstrap
    if not bootstrap:
        raise ConfigError("--bootstrap is required (or $INSPECTION_BOOTSTRAP, or kafka.bootstrap in the config)")
    if args.verbose == 0:  # a service logs what it does; the Kafka client only when asked
        logging.getLogger().setLevel(logging.INFO)
    if args.verbose < 2:
        logging.getLogger("kafka").setLevel(logging.WARNING)
    configure_logging(config.log_format)
    service = StreamService(config, bootstrap, instance_id=args.instance_id)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: service.stop())
    service.run()
    # one write of the whole line: workers of one supervisor share its stdout, and print() writes the text and
    # its newline separately when the stream is unbuffered, so two workers' lines could interleave
    sys.stdout.write(json.dumps(service.summary()) + "\n")
    sys.stdout.flush()
    return 0


# ----------------------------------------------------------------------------------------------- model
def cmd_train(args: argparse.Namespace) -> int:
    from inspection.experiments import train_bench
    from inspection.training import TrainConfig

    _check_models_dir(args)
    if args.bench == "skab":
        raise ConfigError("SKAB uses its normal-only per-file protocol: run `inspection evaluate --bench skab`")
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, backbone_lr=args.backbone_lr,
                      seed=args.seed, device=args.device, amp=not args.no_amp, ema_decay=args.ema_decay,
                      soft_targets=args.soft_targets, photometric_jitter=args.photometric_jitter,
                      affine_jitter=args.affine_jitter, encoder_grad=args.encoder_grad)
    if args.mode == "normal-only":
        return _train_normal_only(args)
    if args.target_far is not None:
        raise ConfigError("--target-far applies to --mode normal-only; a supervised model gets its threshold from "
                          "`inspection calibrate`")
    if args.data is not None:
        return _train_data(args, cfg)
    given = [flag for flag, value in (("--labels", args.labels), ("--line", args.line), ("--name", args.name),
                                      ("--allow-mixed-rates", args.allow_mixed_rates)) if value]
    if given:
        raise ConfigError(f"{', '.join(given)} apply to --data (a plant's own data), not to --bench")
    modalities = args.modalities.split(",") if args.modalities else None
    seeds = args.seeds or [args.seed]
    if args.train_seed is not None and len(seeds) != 1:
        raise ConfigError("--train-seed repeats the training of one split: give one --seed with it")
    if args.fold is not None and args.bench != "bearings":
        raise ConfigError("--fold applies to bearings (the cross-validated bench) only")
    folds = _folds(args.bench, args.fold)
    for seed in seeds:
        for fold in folds:
            version = train_bench(args.bench, seed, dataclasses.replace(
                                      cfg, seed=seed if args.train_seed is None else args.train_seed),
                                  store_root=args.models_dir, out_root=args.out, modalities=modalities, dim=args.dim,
                                  image_size=args.image_size, moe=not args.no_moe, resume=args.resume,
                                  progress=args.progress,
                                  overrides=args.model_set, val_fraction=args.val_fraction,
                                  keep=_keep(args, seeds), fold=fold)
            last = version.card["history"][-1]
            print(json.dumps({"bench": args.bench, "seed": seed, "fold": fold, "version": version.version,
                              "store": str(version.path), "last_epoch": last}, default=str), flush=True)
    return 0


def _train_data(args: argparse.Namespace, cfg) -> int:
    """``inspection train --data``: one supervised model on a plant's own history or image folder
    (docs/own-data.md); prints what it trained on, the counted skips and where the model went."""
    from inspection.data.own_data import DEFAULT_VAL_FRACTION, resolve_data
    from inspection.own_training import train_data

    given = [flag for flag, value in (("--seeds", args.seeds), ("--train-seed", args.train_seed),
                                      ("--fold", args.fold), ("--modalities", args.modalities)) if value is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} apply to --bench; --data trains one model (--seed) on the modalities "
                          "its units hold")
    fraction = DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction
    spec = resolve_data(args.data, labels=args.labels, line=args.line, val_fraction=fraction,
                        allow_mixed_rates=args.allow_mixed_rates)
    version, data = train_data(spec, cfg, store_root=args.models_dir, out_root=args.out, name=args.name, dim=args.dim,
                               image_size=args.image_size, moe=not args.no_moe, resume=args.resume,
                               progress=args.progress, overrides=args.model_set,
                               keep=_keep(args, [args.seed]))
    print(json.dumps({"data": args.data, "kind": spec.kind, "files": len(spec.paths), "labels": spec.labels,
                      "model": version.card["name"], "version": version.version, "store": str(version.path),
                      "lines": data.lines, "classes": list(data.class_names),
                      "units": {"train": len(data.train), "val": len(data.val)},
                      "label_sources": data.label_sources, "skipped": data.skips.to_dict(),
                      "last_epoch": version.card["history"][-1]}, default=_plain_json), flush=True)
    return 0


def _train_normal_only(args: argparse.Namespace) -> int:
    """``inspection train --mode normal-only``: a normal-only detector fitted on good units and calibrated at
    ``--target-far`` on held-out good units, saved promoted (docs/own-data.md); prints what it used."""
    import torch

    from inspection.normal_experiments import DEFAULT_TARGET_FAR, family, train_normal_bench

    given = [flag for flag, value in (("--seeds", args.seeds), ("--train-seed", args.train_seed),
                                      ("--modalities", args.modalities), ("--model-set", args.model_set),
                                      ("--resume", args.resume), ("--soft-targets", args.soft_targets)) if value]
    if given:
        raise ConfigError(f"{', '.join(given)} apply to supervised training, not to --mode normal-only")
    far = DEFAULT_TARGET_FAR if args.target_far is None else args.target_far
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    if args.data is None:
        given = [flag for flag, value in (("--labels", args.labels is not None), ("--line", args.line is not None),
                                          ("--name", args.name is not None),
                                          ("--allow-mixed-rates", args.allow_mixed_rates),
                                          ("--val-fraction", args.val_fraction is not None)) if value]
        if given:
            raise ConfigError(f"{', '.join(given)} apply to --data (a plant's own data), not to --bench")
        for version in train_normal_bench(args.bench, args.seed, store_root=args.models_dir, fold=args.fold,
                                          target_far=far, image_size=args.image_size, device=device,
                                          keep=_keep(args, [args.seed])):
            card = version.card
            print(json.dumps({"bench": args.bench, "mode": "normal-only", "seed": args.seed, "fold": card["fold"],
                              "model": family(args.bench), "version": version.version, "store": str(version.path),
                              "units": card["units_used"], "threshold": card["threshold"], "target_far": far,
                              "calibration_far": card["calibration_far"]}, default=_plain_json), flush=True)
        return 0
    from inspection.data.own_data import DEFAULT_VAL_FRACTION, resolve_data
    from inspection.own_training import train_normal_data

    if args.fold is not None:
        raise ConfigError("--fold applies to --bench bearings, not to --data")
    fraction = DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction
    spec = resolve_data(args.data, labels=args.labels, line=args.line, val_fraction=fraction,
                        allow_mixed_rates=args.allow_mixed_rates, mode="normal-only")
    version, data = train_normal_data(spec, store_root=args.models_dir, name=args.name, image_size=args.image_size,
                                      target_far=far, device=device, keep=_keep(args, [args.seed]))
    card = version.card
    print(json.dumps({"data": args.data, "kind": spec.kind, "files": len(spec.paths), "labels": spec.labels,
                      "mode": "normal-only", "model": card["name"], "version": version.version,
                      "store": str(version.path), "lines": data.lines, "modalities": card["modalities"],
                      "units": card["units_used"], "assumed_normal": data.assumed_normal,
                      "label_sources": data.label_sources, "skipped": data.skips.to_dict(),
                      "threshold": card["threshold"], "target_far": far,
                      "calibration_far": card["calibration_far"]}, default=_plain_json), flush=True)
    return 0


def _folds(bench: str, fold: int | None) -> list[int | None]:
    """The folds a command works through: every fold of a cross-validated bench unless one is named."""
    from inspection.benches import BEARINGS_FOLDS

    if bench != "bearings":
        return [None]
    return list(range(BEARINGS_FOLDS)) if fold is None else [fold]


def cmd_calibrate(args: argparse.Namespace) -> int:
    from inspection.experiments import calibrate_version, family

    _check_models_dir(args)
    if args.name is not None:  # a store family by name, e.g. a model trained on own data (train --data)
        if args.modalities or args.all_baselines:
            raise ConfigError("--modalities and --all-baselines apply to --bench, not to --name")
        names = [args.name]
        if _calibrate_normal_only(args):
            return 0
    else:
        names = [family(args.bench, args.modalities.split(",") if args.modalities else None)]
        if args.bench == "composite" and args.all_baselines:
            names += [family("composite", [m]) for m in MODALITIES]
    from inspection.store import ModelStore

    for name in names:
        store = ModelStore(Path(args.models_dir) / name)
        targets = [args.version] if args.version else _uncalibrated_latest(store, args.seeds)
        for version in targets:
            v = calibrate_version(args.models_dir, name, version, method=args.method or "max_f1", target_far=args.target_far,
                                  device=args.device, threshold=args.threshold, keep=_keep(args, args.seeds),
                                  progress=args.progress, data_path=args.data, labels_path=args.labels)
            print(json.dumps({"model": name, "from": version, "version": v.version,
                              "calibration": v.card["calibration"]}, default=_plain_json), flush=True)
    return 0


def _calibrate_normal_only(args: argparse.Namespace) -> bool:
    """``inspection calibrate --name NAME`` of a normal-only version (``--version``, else the promoted one):
    re-choose its threshold at ``--target-far`` on its held-out normal units and save a new, promoted version.
    Returns False, doing nothing, when the version is not normal-only."""
    from inspection.normal_experiments import calibrate_normal_bench
    from inspection.own_training import calibrate_normal_data
    from inspection.store import ModelStore

    store = ModelStore(Path(args.models_dir) / args.name)
    base = store.get(args.version) if args.version else store.promoted()
    if base is None or base.card.get("mode") != "normal-only":
        return False
    wrong = [flag for flag, value in (("--method " + str(args.method), args.method not in (None, "far")),
                                      ("--threshold", args.threshold is not None), ("--seeds", args.seeds))
             if value]
    if wrong:
        raise ConfigError(f"{', '.join(wrong)} do not apply to normal-only version {base.version}: its threshold is "
                          "set at a false-alarm rate on held-out normal units (--target-far)")
    if base.card.get("source") is not None:  # trained on own data
        saved = calibrate_normal_data(store, base.version, args.target_far, device=args.device, data_path=args.data,
                                      labels_path=args.labels)
    else:
        if args.data is not None or args.labels is not None:
            raise ConfigError(f"version {base.version} was fitted on the {base.card.get('bench')} bench; --data and "
                              "--labels apply to models trained on own data")
        saved = calibrate_normal_bench(store, base.version, args.target_far, device=args.device)
    print(json.dumps({"model": args.name, "from": base.version, "version": saved.version,
                      "calibration": saved.card["calibration"]}, default=_plain_json), flush=True)
    return True


def _plain_json(obj):
    """JSON fallback for the store's read-only card mappings and sequences."""
    from collections.abc import Mapping, Sequence

    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(obj, Sequence) and not isinstance(obj, str | bytes):
        return list(obj)
    return str(obj)


def _keep(args: argparse.Namespace, seeds) -> int:
    """Versions a store keeps while a command works through ``seeds`` (and every fold of a cross-validated bench):
    ``--keep`` when given, else at least one per seed and fold, so that saving one model never prunes another
    (trained, or waiting for its threshold)."""
    from inspection.store import DEFAULT_KEEP

    if args.keep is not None:
        if args.keep < 1:
            raise ConfigError(f"--keep must be at least 1; got {args.keep}")
        return args.keep
    return max(DEFAULT_KEEP, len(seeds or ()) * len(_folds(args.bench, None)))


def _uncalibrated_latest(store, seeds) -> list[str]:
    """The newest uncalibrated version per seed (per fold and training run), in store order (or the promoted one
    when no seeds are given)."""
    if not seeds:
        promoted = store.promoted()
        if promoted is None:
            raise ConfigError(f"no promoted model in {store.root}")
        return [promoted.version]
    versions = store.versions()  # oldest first
    latest = {(v.card["seed"], v.card.get("fold"), v.card.get("train_seed", v.card["seed"])): v.version
              for v in versions if v.card.get("seed") in seeds and not v.card.get("threshold_version")}
    missing = [s for s in seeds if s not in {key[0] for key in latest}]
    if missing:
        raise ConfigError(f"{store.root} has no uncalibrated model for seed(s) {missing}")
    # In store order, oldest first: each calibrated save prunes the store's oldest versions beyond one per seed
    # (see _keep), which must already be done by then (seeds trained side by side land in any order).
    chosen = set(latest.values())
    return [v.version for v in versions if v.version in chosen]


def cmd_evaluate(args: argparse.Namespace) -> int:
    _check_models_dir(args)
    if args.mode == "normal-only":
        return _evaluate_normal_only(args)
    if args.bench == "skab":
        from inspection.skab_protocol import evaluate_skab

        path = evaluate_skab(results_dir=args.results, seed=args.seeds[0] if args.seeds else 0,
                             detector=args.detector, target_far=args.target_far)
    else:
        from inspection.experiments import evaluate_bench
        from inspection.store import ModelStore

        ModelStore(Path(args.models_dir) / args.bench).versions()  # a missing store is named before anything is written
        path = evaluate_bench(args.bench, args.models_dir, args.seeds or [0], device=args.device, tta=args.tta,
                              results_dir=args.results, plots_dir=args.plots, note=args.note, progress=args.progress)
    print(json.dumps(json.loads(Path(path).read_text())["summary"], indent=1))
    return 0


def _evaluate_normal_only(args: argparse.Namespace) -> int:
    """``inspection evaluate --bench B --mode normal-only``: the newest stored normal-only version (every fold of
    bearings) on the bench's test split; merged into ``<results>/normal_only.json`` beside ``<results>/<B>.json``."""
    from inspection.normal_experiments import evaluate_normal_bench

    if args.bench == "skab":
        raise ConfigError("SKAB's normal-only protocol is `inspection evaluate --bench skab` (without --mode)")
    if args.tta or (args.seeds and len(args.seeds) > 1):
        raise ConfigError("--mode normal-only evaluates one seed (--seeds S) without --tta")
    path = evaluate_normal_bench(args.bench, args.models_dir, args.seeds[0] if args.seeds else 0,
                                 results_dir=args.results, device=args.device)
    result = json.loads(Path(path).read_text())["benches"][args.bench]
    keys = ("auroc", "f1", "far", "recall", "calibration_far", "threshold", "target_far", "n_fit", "n_calibration",
            "n_test", "auroc_mean_over_folds_with_healthy_test", "auroc_pooled", "recall_pooled", "far_pooled",
            "supervised")
    print(json.dumps({"bench": args.bench, "mode": "normal-only", "result": str(path),
                      **{k: result[k] for k in keys if k in result}}, indent=1))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from explain.report import write_index
    from inspection.data.history import read_history
    from inspection.store import ModelStore
    from services.reports import explain_served_units
    from services.scoring import load_serving_model, resolve_device

    serving = load_serving_model(ModelStore(args.store), args.model, resolve_device(args.device))
    if serving.normal_only is not None:
        raise ConfigError(f"version {serving.version} is a normal-only model: its decisions carry their modality "
                          "attributions (`inspection rescore`); explanation reports explain supervised models")
    wanted = set(args.unit or ())
    units: list[Unit] = []
    for archived in read_history(args.history):
        if wanted and archived.unit.unit_id not in wanted:
            continue
        units.append(archived.unit)
        if args.limit and len(units) >= args.limit:
            break
    missing = sorted(wanted - {u.unit_id for u in units})
    if missing:
        raise ConfigError(f"{len(missing)} unit id(s) are not in {args.history}, e.g. {missing[:5]}")
    if not units:
        raise ConfigError(f"{args.history} holds no units to explain")
    # each unit with its line's promoted adapter in place, where the version has one (docs/adapters.md)
    written = explain_served_units(serving, units, args.out, level=args.level, budget=args.budget, seed=args.seed)
    index, overview = write_index(args.out, written, period=args.period)
    adapters = {line: a.version for line, a in serving.adapters.lines.items()} if serving.adapters else {}
    print(json.dumps({"reports": len(written), "out": str(args.out), "index": str(index), "global": str(overview),
                      "model_version": serving.version, "adapters": adapters, "level": args.level}))
    return 0


def cmd_rescore(args: argparse.Namespace) -> int:
    from inspection.store import ModelStore
    from services.rescore import rescore_local, write_run
    from services.scoring import load_serving_model, resolve_device

    store = ModelStore(args.store, create=False)
    device = resolve_device(args.device)
    adapters = {} if args.no_adapters else None  # None: each side's promoted line adapters
    expected = tuple(args.expected.split(",")) if args.expected else MODALITIES
    unknown = sorted(set(expected) - set(MODALITIES))
    if unknown:
        raise ConfigError(f"--expected names unknown modalities {unknown}; known: {list(MODALITIES)}")
    if args.compare and args.decisions:
        raise ConfigError("give --compare VERSION or --decisions PATH, not both")
    if args.compare:
        store.get(args.compare)  # an unknown version is an error before anything is scored
    if args.engine == "ray" and args.explain == 2:
        raise ConfigError("--explain 2 runs with the local engine only (reports are written by the scoring "
                          "process); re-score with --engine local, or explain the flipped units afterwards")
    reporter = None
    if args.engine == "ray":  # the actors load the model; this process only needs its version
        entry = store.get(args.model) if args.model else store.promoted()
        if entry is None:
            raise StoreError(f"no version of the model store {store.root} is promoted; name one with --model")
        model = entry.version
    else:
        model = load_serving_model(store, args.model, device, args.precision, adapters)
        if args.explain == 2:
            from explain.api import minimum_budget
            from services.reports import StreamReporter

            if args.budget < minimum_budget(model.model):
                raise ConfigError(f"--budget {args.budget} is below what level-2 explanations of model "
                                  f"{model.version} need: {minimum_budget(model.model)} model evaluations per unit")
            reporter = StreamReporter(args.out / "reports", units=args.explain_units, level=2, budget=args.budget,
                                      seed=0)

    def run(model, reports=None):
        """Re-score with ``model``: a loaded model (local engine) or a version id (Ray)."""
        if args.engine == "ray":
            from services.rescore import rescore_ray

            return rescore_ray(args.history, args.store, model, args.out, address=args.address,
                               workers=args.workers, device=device.type, precision=args.precision,
                               expected=expected, adapters=adapters)
        return rescore_local(args.history, model, args.out, batch_size=args.batch_size, expected=expected,
                             progress=not args.no_progress, reporter=reports)

    result = run(model, reporter)
    summary = result.to_dict()
    summary.pop("rejected")
    summary.pop("rejected_reading_list")
    if args.compare or args.decisions:
        from services.changes import compare, write_change_report
        from services.rescore import history_files, read_decisions, recorded_decisions

        if args.compare:
            other = run(args.compare if args.engine == "ray" else load_serving_model(store, args.compare, device,
                                                                                      args.precision, adapters))
            result.compare = other.side()  # which adapters the other side used, line by line
            write_run(result)  # run.json states this run, with the other side beside it
            summary["compare"] = result.compare
            old = read_decisions(args.out, model_version=args.compare)
        else:
            old = recorded_decisions(args.decisions)
        from inspection.data.history import history_labels

        labels: dict[str, bool] = {}
        for f in history_files(args.history):
            with contextlib.suppress(InspectionError):  # an unreadable file is already listed in run.json
                labels.update(history_labels(f))
        report = compare(read_decisions(args.out, model_version=result.model_version), old, labels=labels,
                         reports=args.reports or (args.out / "reports" if args.explain == 2 else None))
        json_path, html_path = write_change_report(report, args.out)
        summary["changes"] = {"flips": report["flips"], "units_compared": report["units_compared"],
                              "json": str(json_path), "html": str(html_path)}
    print(json.dumps(summary, sort_keys=True))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from services.rescore import audit

    result = audit(args.decision_id, args.history, args.store, args.decisions, device=args.device,
                   tolerance=args.tolerance)
    print(json.dumps(result.to_dict(), indent=1))
    return 0 if result.matches else 1


def cmd_report(args: argparse.Namespace) -> int:
    from explain.report import read_reports, report_files, write_index

    source = args.source
    if source.is_dir() and ((source / "decisions").is_dir() or any(source.glob("model_version=*"))):
        return _report_from_decisions(args)
    reports = read_reports(report_files(source))
    index, overview = write_index(args.out, reports, period=args.period)
    print(json.dumps({"reports": len(reports), "index": str(index), "global": str(overview)}))
    return 0


def _report_from_decisions(args: argparse.Namespace) -> int:
    """The index and the global view (level 3, modality level) over decision history (a rescore output)."""
    from explain.global_ import decision_entry, summarize
    from explain.report import render_index_html
    from services.rescore import read_decisions

    entries = [decision_entry(d) for d in read_decisions(args.source, model_version=args.model)
               if args.line is None or d.line_id == args.line]
    if not entries:
        raise ConfigError(f"{args.source} holds no decisions" + (f" of line {args.line}" if args.line else "")
                          + (f" of model {args.model}" if args.model else ""))
    overview = summarize(entries, period=args.period)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"report": e, "href": e["decision"].get("report_url") or ""} for e in entries]
    (out / "index.html").write_text(render_index_html(rows, overview), encoding="utf-8")
    (out / "global.json").write_text(json.dumps(overview, indent=1, sort_keys=True), encoding="utf-8")
    print(json.dumps({"decisions": len(entries), "index": str(out / "index.html"), "global": str(out / "global.json"),
                      "models": sorted({e["model_version"] for e in entries})}))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from inspection.store import ModelStore

    store = ModelStore(args.store)
    if args.action == "list":
        for v in store.versions():
            card = v.card
            print(json.dumps({"version": v.version, "promoted": v.promoted, "created": v.created,
                              "bench": card.get("bench"), "seed": card.get("seed"),
                              "threshold_version": card.get("threshold_version"), "sha256": v.sha256[:16]}))
        return 0
    if args.action == "promote" and not args.version:
        raise ConfigError("`inspection models promote` needs the version to promote (see `inspection models list`)")
    v = store.promote(args.version) if args.action == "promote" else store.rollback()
    print(json.dumps({"promoted": v.version}))
    return 0


# -------------------------------------------------------------------------------------------- adapters
def cmd_adapt(args: argparse.Namespace) -> int:
    """``inspection adapt``: one line's LoRA adapter on a frozen base version, trained on the line's own data,
    calibrated on its validation units and saved beside the base (docs/adapters.md)."""
    from inspection.adapters import AdapterConfig, adapt_data
    from inspection.data.own_data import DEFAULT_VAL_FRACTION, resolve_data
    from inspection.training import TrainConfig

    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    config = AdapterConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout, targets=targets,
                           backbone_stages=args.backbone_stages)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
                      amp=not args.no_amp, soft_targets=args.soft_targets)
    fraction = DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction
    spec = resolve_data(args.data, labels=args.labels, line=args.line, val_fraction=fraction,
                        allow_mixed_rates=args.allow_mixed_rates)
    version, result, data = adapt_data(args.store, args.base, spec, config, cfg, method=args.method,
                                       target_far=args.target_far, threshold=args.threshold,
                                       promote=not args.no_promote, keep=args.keep, progress=args.progress)
    cal = result.calibration
    print(json.dumps({"line": args.line, "base": version.card["base_version"], "version": version.version, "store": str(version.path),
                      "promoted": version.promoted, "rank": config.rank, "targets": list(config.targets),
                      "trainable_parameters": result.fit.trainable, "trainable_share": result.trainable_share,
                      "units": {"train": len(data.train), "val": len(data.val)}, "skipped": data.skips.to_dict(),
                      "threshold": cal.threshold, "threshold_version": cal.version, "val": cal.metrics,
                      "val_base": result.base_metrics, "train_seconds": round(result.fit.seconds, 1)},
                     default=_plain_json), flush=True)
    return 0


def cmd_adapters(args: argparse.Namespace) -> int:
    """``inspection adapters list|promote|rollback``: per-line adapter versions beside their base versions."""
    from inspection.adapters import adapter_store, list_adapters
    from inspection.store import ModelStore

    family = ModelStore(args.store)
    if args.action == "list":
        for e in list_adapters(family, args.base, args.line):
            card = e.version.card
            print(json.dumps({"base": e.base_version, "line": e.line, "version": e.version.version,
                              "promoted": e.version.promoted, "created": e.version.created,
                              "rank": card.get("adapter", {}).get("rank"),
                              "targets": card.get("adapter", {}).get("targets"),
                              "threshold_version": card.get("threshold_version"),
                              "val_f1": card.get("metrics", {}).get("val", {}).get("f1"),
                              "sha256": e.version.sha256[:16]}, default=_plain_json))
        return 0
    if not args.line:
        raise ConfigError(f"`inspection adapters {args.action}` needs --line (see `inspection adapters list`)")
    base = args.base
    if base is None:
        promoted = family.promoted()
        if promoted is None:
            raise ConfigError(f"no version of {family.root} is promoted: name the base version with --base")
        base = promoted.version
    store = adapter_store(family, base, args.line)
    if args.action == "promote":
        if not args.version:
            raise ConfigError("`inspection adapters promote` needs the adapter version (see `inspection adapters "
                              "list`)")
        v = store.promote(args.version)
    else:
        v = store.rollback()
    print(json.dumps({"base": base, "line": args.line, "promoted": v.version}))
    return 0


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inspection", description="Multimodal industrial inspection service.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("broker", help="run the embedded broker on 127.0.0.1 until Ctrl-C / SIGTERM")
    b.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    b.add_argument("--storage", default="memory://tansu/", help="Tansu storage URL (memory:// or s3://)")
    b.add_argument("--partitions", type=int, default=3, help="create the topics with this many partitions (0: none)")
    b.add_argument("--topic-prefix", default="")
    b.add_argument("--log", help="broker log file (default: a temporary file)")
    b.set_defaults(func=cmd_broker)

    t = sub.add_parser("topics", help="manage topics")
    tsub = t.add_subparsers(dest="topics_command", required=True, metavar="ACTION")
    tc = tsub.add_parser("create", help="create input topics (co-partitioned), decisions and dlq")
    _add_kafka_args(tc)
    tc.add_argument("--partitions", type=int, default=3)
    tc.set_defaults(func=cmd_topics_create)

    pr = sub.add_parser("produce", help="publish units to the three input topics")
    _add_kafka_args(pr)
    pr.add_argument("--dataset", choices=["composite"], default="composite")
    pr.add_argument("--history", type=Path, help="publish units from a Parquet history file instead")
    pr.add_argument("--split", choices=["train", "test"], default="test")
    pr.add_argument("--limit", type=int, default=100, help="number of units")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--rate", type=float, default=0.0, help="units per second (0: as fast as possible)")
    pr.add_argument("--drop", action="append", default=[], metavar="MODALITY=P",
                    help="drop a modality's readings with probability P (testing); repeatable")
    pr.add_argument("--delay", action="append", default=[], metavar="MODALITY=MS",
                    help="send a modality's readings MS milliseconds late (testing); repeatable")
    pr.add_argument("--temperature", choices=["auto", "skab", "synthetic"], default="auto",
                    help="temperature source of composite units")
    pr.add_argument("--archive", type=Path, help="also write the published units to this Parquet history file")
    pr.set_defaults(func=cmd_produce)

    co = sub.add_parser("consume", help="print decoded records of a topic as JSON lines")
    _add_kafka_args(co)
    co.add_argument("--topic", required=True)
    co.add_argument("--group", help="consumer group (default: a fresh one; offsets are never committed)")
    co.add_argument("--max", type=int, default=None, help="stop after this many records")
    co.add_argument("--idle-timeout", type=float, default=5.0, help="stop after this many seconds without records")
    co.add_argument("--from-beginning", action=argparse.BooleanOptionalAction, default=True)
    co.set_defaults(func=cmd_consume)

    d = sub.add_parser("data", help="data sets")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    di = dsub.add_parser("info", help="sizes, labels and licences of the data sets")
    di.add_argument("--seed", type=int, default=0)
    di.add_argument("--skab", help="SKAB folder (default: ../shared/data/skab or $INSPECTION_SKAB_DIR)")
    di.set_defaults(func=cmd_data_info)
    df = dsub.add_parser("fetch", help="download and verify the bearing recordings into the cache")
    df.set_defaults(func=cmd_data_fetch)
    dx = dsub.add_parser("export", help="write bundled data in the own-data formats (docs/own-data.md): composite "
                                        "units as Parquet history, or ELPV cells as an image folder (--images)")
    dx.add_argument("--out", type=Path, required=True,
                    help="the history file to write, or with --images the (new or empty) folder")
    dx.add_argument("--limit", type=int, default=300, help="units (or images) to write")
    dx.add_argument("--split", choices=["train", "test", "val"], default="train", help="composite split")
    dx.add_argument("--seed", type=int, default=0)
    dx.add_argument("--temperature", choices=["auto", "skab", "synthetic"], default="auto",
                    help="temperature source of composite units")
    dx.add_argument("--labels-out", type=Path, metavar="FILE",
                    help="write the units' labels to this labels file (.csv or .parquet) instead of the history's "
                         "label column")
    dx.add_argument("--images", action="store_true",
                    help="write ELPV cells as ok/ and defect/<class>/ PNG files (p = 0: ok; p = 2/3, 1: defect/p2_3, "
                         "defect/p1), modification times one minute apart in a seeded order")
    dx.set_defaults(func=cmd_data_export)

    se = sub.add_parser("serve", help="the stream service: consume readings, join, score, explain, decide")
    se.add_argument("--bootstrap", default=os.environ.get("INSPECTION_BOOTSTRAP"),
                    help="Kafka bootstrap servers host:port[,host:port] (default: $INSPECTION_BOOTSTRAP, then "
                         "kafka.bootstrap in the config)")
    se.add_argument("--config", required=True, type=Path, help="service config, YAML or JSON (docs/service.md)")
    se.add_argument("--group-id", help="consumer group (overrides kafka.group_id)")
    se.add_argument("--metrics-port", type=int, help="port of /metrics, /healthz, /readyz and the operator page "
                                                      "(overrides metrics.port)")
    se.add_argument("--instance-id", help="name of this instance in logs, client ids and archive files")
    se.add_argument("--workers", type=int, default=1,
                    help="run N service processes in one consumer group on this host, supervised (restarted when "
                         "they exit; SIGTERM stops all); worker i serves /metrics on metrics.port + i")
    se.set_defaults(func=cmd_serve)

    de = sub.add_parser("demo", help="embedded broker -> real composite units -> stream service -> explained "
                                     "decisions, dead letters, re-scoring and a summary",
                        description="Train the demo model and its single-modality baselines if the store has none, "
                                    "stream the composite test units (some missing a modality, a few malformed) "
                                    "through the stream service with explanation reports and the live operator "
                                    "page, re-score its archive, and summarise. Exit code 0: every check passed; "
                                    "1: a check failed (named); 2: invalid input.")
    de.add_argument("--units", type=int, default=200, help="composite test units to produce")
    de.add_argument("--seed", type=int, default=0)
    de.add_argument("--rate", type=float, default=4.0, help="units per second to publish (0: as fast as possible)")
    de.add_argument("--partitions", type=int, default=3)
    de.add_argument("--out", default="runs/demo", help="output folder (reports, archive, re-scoring, Parquet "
                                                        "decisions, summary, broker log)")
    de.add_argument("--preset", default="standard", choices=["standard", "fast"],
                    help="the model trained when the store has none: standard (the demo's, a few minutes on 2 "
                         "cores) or fast (seconds, a weak model for tests)")
    de.add_argument("--store", help="model store (default models/demo-<preset>); without a calibrated model there, "
                                    "one of the preset is trained on CPU first, its baselines beside it")
    de.add_argument("--missing", type=float, default=0.05,
                    help="share of units sent without one modality (seeded)")
    de.add_argument("--malformed", type=int, default=3,
                    help="units that each send one malformed reading (a truncated image, a bad ce_time header, a "
                         "NaN sample, in turn) which the service dead-letters")
    de.add_argument("--keep-running", "--serve-page", dest="keep_running", action="store_true",
                    help="keep the broker, the service and its live operator page up after the summary until "
                         "Ctrl-C (--serve-page is the older name)")
    de.add_argument("--page-port", type=int, default=0,
                    help="port of the operator page, /metrics and the probes on 127.0.0.1 (0: a free one, printed)")
    de.add_argument("--results", metavar="DIR",
                    help="also write the run's headline numbers (quality against the baselines, throughput, latency, "
                         "timings) to DIR/demo.json (DIR/demo_synthetic.json on synthetic temperature) with machine, "
                         "commit, command and date, as the benchmarks do")
    de.set_defaults(func=cmd_demo)
    bench_choices = ["elpv", "bearings", "composite", "skab"]
    tr = sub.add_parser("train", help="train a model on a benchmark split and save it to the model store")
    source = tr.add_mutually_exclusive_group(required=True)
    source.add_argument("--bench", choices=bench_choices)
    source.add_argument("--data", metavar="PATH_OR_GLOB",
                        help="a plant's own data (docs/own-data.md): Parquet history (a file, a folder or a glob) or "
                             "an image folder with ok/ and defect/<class>/")
    tr.add_argument("--labels", help="--data: labels file (CSV or Parquet: unit_id, label[, class][, culprits]); it "
                                     "overrides the history's label of every unit it names")
    tr.add_argument("--line", help="--data: keep only this line's units (history) or set their line id (folder)")
    tr.add_argument("--name", help="--data: model name, the store family <models-dir>/<name> (default line-<line>)")
    tr.add_argument("--mode", choices=["supervised", "normal-only"], default="supervised",
                    help="supervised trains on labels; normal-only fits a deviation detector on good units only "
                         "and saves it calibrated at --target-far (docs/own-data.md)")
    tr.add_argument("--target-far", type=float,
                    help="--mode normal-only: false-alarm rate the threshold allows on the held-out good units "
                         "(default 0.01)")
    tr.add_argument("--allow-mixed-rates", action="store_true",
                    help="--data: accept vibration at several sample rates when each is at least 40 kHz")
    tr.add_argument("--seed", type=int, default=0, help="split and training seed")
    tr.add_argument("--seeds", type=int, nargs="*", help="the split seeds: train one model per seed (overrides --seed)")
    tr.add_argument("--train-seed", type=int,
                    help="training seed, when it differs from the split seed (repeat runs on one split)")
    tr.add_argument("--fold", type=int, help="bearings: train this cross-validation fold only (default: every fold)")
    tr.add_argument("--modalities", help="comma-separated subset (composite single-modality baselines)")
    tr.add_argument("--epochs", type=int, default=20)
    tr.add_argument("--batch-size", type=int, default=32)
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--backbone-lr", type=float, default=3e-4)
    tr.add_argument("--dim", type=int, default=256)
    tr.add_argument("--image-size", type=int, default=224)
    tr.add_argument("--no-moe", action="store_true", help="dense feed-forward instead of the sparse MoE")
    tr.add_argument("--model-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a model config key, e.g. encoders.vibration.config.preprocess.env_relative=true")
    tr.add_argument("--no-amp", action="store_true")
    tr.add_argument("--photometric-jitter", type=float, default=1.0,
                    help="scale of the image brightness/contrast jitter (1: +-0.05 brightness, x0.9-1.1 contrast)")
    tr.add_argument("--affine-jitter", type=float, default=0.0,
                    help="strength a of a random affine warp of images: rotation <= 10a deg, scale 1 +- 0.1a, "
                         "shift <= 5a %% (0: off)")
    tr.add_argument("--encoder-grad", choices=["all", "own_head"], default="all",
                    help="own_head: each encoder learns only from its own per-modality head (culprit loss on every "
                         "modality a unit has), the fused path trains on top; against a strong modality drowning a "
                         "weak one (with --model-set modality_evidence=true the heads also feed the decision)")
    tr.add_argument("--ema-decay", type=float, default=0.0,
                    help="keep an exponential moving average of the weights with this decay and validate, select "
                         "and save it (0: off)")
    tr.add_argument("--val-fraction", type=float,
                    help="elpv: share of the training split held out for validation (default 0.15); 0 trains on all "
                         "of it, without epoch selection (calibrate with --method fixed). --data: share of the units, "
                         "the latest by event time, that validate (default 0.2)")
    tr.add_argument("--soft-targets", action="store_true",
                    help="train the defect score towards each label's graded severity (ELPV: the experts' defect "
                         "probability) instead of 0/1")
    tr.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    _add_models_dir(tr)
    tr.add_argument("--out", default="runs", help="run folder root (checkpoints, curves)")
    tr.add_argument("--resume", action="store_true",
                    help="continue from the run folder's last checkpoint (an error when it has none)")
    tr.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                    help="progress on stderr: a bar on a terminal, one line per epoch otherwise")
    tr.add_argument("--keep", type=int, help="versions the store keeps (default: one per seed and fold, at least 3)")
    tr.set_defaults(func=cmd_train)

    ca = sub.add_parser("calibrate", help="choose per-line thresholds on validation data; saves a new version")
    target = ca.add_mutually_exclusive_group(required=True)
    target.add_argument("--bench", choices=bench_choices)
    target.add_argument("--name", help="the store family <models-dir>/<name>, e.g. a model of `train --data`")
    ca.add_argument("--data", help="--name of a model trained on own data: where its data is now, if it moved")
    ca.add_argument("--labels", help="--name of a model trained on own data: where its labels file is now")
    ca.add_argument("--modalities")
    ca.add_argument("--all-baselines", action="store_true", help="composite: also the single-modality models")
    ca.add_argument("--version", help="the version to calibrate (default: newest uncalibrated per seed / promoted)")
    ca.add_argument("--seeds", type=int, nargs="*", help="the split seeds whose models to calibrate (default 0)")
    ca.add_argument("--method", choices=["max_f1", "far", "max_accuracy", "fixed"],
                    help="default max_f1; fixed: one given --threshold for every line, no validation data; a "
                         "normal-only version is always calibrated at --target-far")
    ca.add_argument("--threshold", type=float, help="the threshold of --method fixed (a defect probability)")
    ca.add_argument("--target-far", type=float, default=0.01)
    ca.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    _add_models_dir(ca)
    ca.add_argument("--keep", type=int, help="versions the store keeps (default: one per seed and fold, at least 3)")
    ca.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                    help="progress on stderr: bars on a terminal, one line when done otherwise")
    ca.set_defaults(func=cmd_calibrate)

    ev = sub.add_parser("evaluate", help="evaluate calibrated models on a benchmark's test split")
    ev.add_argument("--bench", choices=bench_choices, required=True)
    ev.add_argument("--mode", choices=["supervised", "normal-only"], default="supervised",
                    help="normal-only: the bench's stored normal-only versions (`train --mode normal-only`), written "
                         "to <results>/normal_only.json beside the supervised <results>/<bench>.json")
    ev.add_argument("--seeds", type=int, nargs="*", help="the split seeds whose models to evaluate (default 0)")
    ev.add_argument("--tta", action="store_true", help="average 8 views of each image (4 rotations, each also mirrored)")
    ev.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    _add_models_dir(ev)
    ev.add_argument("--results", default="runs/results",
                    help="folder of the result file <bench>.json (default runs/results; the benchmark record this "
                         "project publishes is bench/results, written only when named here)")
    ev.add_argument("--plots", default="runs/plots")
    ev.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                    help="progress on stderr: bars on a terminal, one line per model and stage otherwise")
    ev.add_argument("--note", help="a fact the result must state (recorded in its summary)")
    ev.add_argument("--detector", choices=["slope-t2", "drift"], default="slope-t2",
                    help="skab: slope-t2 (T² on levels + temperature differences, chosen leave-one-folder-out) "
                         "or drift (drift-tracking, calibrated on the anomaly-free run)")
    ev.add_argument("--target-far", type=float, default=0.10,
                    help="skab --detector drift: false-alarm rate the detector's limits are calibrated to on the "
                         "anomaly-free run")
    ev.set_defaults(func=cmd_evaluate)

    ex = sub.add_parser("explain", help="explain units of a Parquet history: a JSON and an HTML report each, an index",
                        description="Level 1: exact modality Shapley values and interactions; level 2: Owen values "
                                    "of image regions, vibration bands and temperature segments (token masking).")
    ex.add_argument("--history", type=Path, required=True, help="Parquet history (inspection produce --archive, "
                                                                 "the service's archive)")
    ex.add_argument("--unit", action="append", help="explain this unit id (repeatable; default every unit)")
    ex.add_argument("--store", required=True, help="the model store, e.g. models/composite")
    ex.add_argument("--model", help="the version to explain with (default: the promoted one)")
    ex.add_argument("--out", type=Path, required=True, help="report folder (created)")
    ex.add_argument("--level", type=int, choices=[1, 2], default=2)
    ex.add_argument("--budget", type=int, default=512, help="level 2: model evaluations per unit")
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--limit", type=int, help="explain at most this many units")
    ex.add_argument("--period", choices=["day", "hour"], default="day", help="time buckets of the global view")
    ex.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    ex.set_defaults(func=cmd_explain)

    rs = sub.add_parser("rescore", help="re-score Parquet history with a model version (decisions as Parquet "
                        "partitioned by line and day)",
                        description="Reads history written by the stream's archive sink or `produce --archive`, "
                                    "scores it with the stream's own scoring code, and writes "
                                    "OUT/decisions/model_version=V/line_id=L/day=D/ partitions and OUT/run.json. "
                                    "Partitions already written for the model version are skipped (resume).",
                        epilog="example: inspection rescore --history 'archive/*.parquet' --store models/composite "
                               "--out rescore/")
    rs.add_argument("--history", nargs="+", required=True, help="history files, folders or globs")
    rs.add_argument("--store", required=True, help="the model store, e.g. models/composite")
    rs.add_argument("--model", help="the version to score with (default: the promoted one)")
    rs.add_argument("--out", type=Path, required=True, help="output folder (created)")
    rs.add_argument("--batch-size", type=int, default=64, help="units per scoring forward (local engine)")
    rs.add_argument("--engine", choices=["local", "ray"], default="local",
                    help="local: one process, overlapped read/score/write; ray: Ray Data over an actor pool that "
                         "holds the model (pip install 'inspection[ray]')")
    rs.add_argument("--address", help="ray: join this cluster (host:port or ray://...); default: start a local one")
    rs.add_argument("--workers", type=int, default=2, help="ray: actors holding the model (one GPU each on CUDA)")
    rs.add_argument("--expected", help="comma-separated modalities a unit should have (default all three); the "
                                       "absent ones are listed as missing, as the stream's join.expected does")
    rs.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    rs.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="auto: bf16 autocast on CUDA, float32 on CPU (as the stream)")
    rs.add_argument("--compare", metavar="VERSION", help="also re-score with this version and write the change "
                    "report (changes.json, changes.html: flips per line and day, score shift, reliability)")
    rs.add_argument("--no-adapters", action="store_true",
                    help="score every line with the base model, without the lines' adapters (both sides with "
                         "--compare); default: each line with its promoted adapter, as the stream does")
    rs.add_argument("--decisions", type=Path, help="write the change report against these recorded decisions "
                    "instead (a rescore output folder, or decision CloudEvents one JSON per line)")
    rs.add_argument("--explain", type=int, choices=[1, 2], default=1,
                    help="1: every decision carries the modality Shapley values and interactions (as in the "
                         "stream); 2: also a level-2 report per selected decision in OUT/reports, linked from it")
    rs.add_argument("--explain-units", choices=["defects", "all"], default="defects",
                    help="which decisions get a level-2 report")
    rs.add_argument("--budget", type=int, default=256, help="level-2 model evaluations per unit")
    rs.add_argument("--reports", type=Path, help="explanation report folder the change report links flipped units to "
                                                 "(default with --explain 2: OUT/reports)")
    rs.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    rs.set_defaults(func=cmd_rescore)

    au = sub.add_parser("audit", help="reproduce one decision from history and the model store (exit 0: it "
                                      "matches, 1: it does not)",
                        epilog="example: inspection audit 3f2a... --history archive/ --store models/composite "
                               "--decisions rescore/")
    au.add_argument("decision_id")
    au.add_argument("--history", nargs="+", required=True, help="history files, folders or globs")
    au.add_argument("--store", required=True, help="the model store holding the decision's model version")
    au.add_argument("--decisions", type=Path, required=True,
                    help="where the recorded decision is: a rescore output folder, or a file of decision "
                         "CloudEvents, one JSON per line (e.g. the decisions topic read with `inspection consume`)")
    au.add_argument("--tolerance", type=float, default=1e-5, help="largest score difference that still matches")
    au.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    au.set_defaults(func=cmd_audit)

    rp = sub.add_parser("report", help="index page and global view (level 3) over report JSON files")
    rp.add_argument("--from", dest="source", type=Path, required=True,
                    help="a report folder, one report file, or decision history (an `inspection rescore` output)")
    rp.add_argument("--out", type=Path, required=True, help="where index.html and global.json go")
    rp.add_argument("--period", choices=["day", "hour"], default="day")
    rp.add_argument("--line", help="decision history: only this line")
    rp.add_argument("--model", help="decision history: only this model version (default: every version there)")
    rp.set_defaults(func=cmd_report)

    mo = sub.add_parser("models", help="list, promote or roll back stored model versions",
                        description="list works on a read-only store; promote verifies the version's weights "
                                    "(sha256) and refuses an uncalibrated one; rollback verifies its target")
    mo.add_argument("action", choices=["list", "promote", "rollback"])
    mo.add_argument("version", nargs="?")
    mo.add_argument("--store", required=True, help="a model family's store, e.g. models/elpv")
    mo.set_defaults(func=cmd_models)

    ad = sub.add_parser("adapt", help="train a line's LoRA adapter on a frozen base version (docs/adapters.md)",
                        description="Low-rank adapters of the bridge projections, heads and vision projection (and "
                                    "optionally the backbone's 1x1 convolutions) trained on one line's own data while "
                                    "the base stays frozen; the line's threshold is chosen on its validation units "
                                    "with the adapter in place. Saved as <store>/adapters/<base>/<line>/<version>.",
                        epilog="example: inspection adapt --store models/line-line-a --from m0002-3fa2c1d0 "
                               "--data cells-b/ --line line-b --rank 8")
    ad.add_argument("--store", required=True, help="the base model's store family, e.g. models/line-line-a")
    ad.add_argument("--from", dest="base", required=True, metavar="VERSION",
                    help="the base version (frozen), or 'promoted' for the store's promoted version")
    ad.add_argument("--data", required=True, metavar="PATH_OR_GLOB",
                    help="the line's data: Parquet history or an image folder (docs/own-data.md)")
    ad.add_argument("--labels", help="labels file overriding the history's labels")
    ad.add_argument("--line", required=True, help="the line id the adapter serves (the units' ce_lineid)")
    ad.add_argument("--rank", type=int, default=8, help="rank r of the low-rank updates")
    ad.add_argument("--alpha", type=float, help="LoRA alpha; updates are scaled by alpha / r (default 2 r)")
    ad.add_argument("--dropout", type=float, default=0.0, help="dropout on the adapters' inputs in training")
    ad.add_argument("--targets", default="bridge,heads,vision",
                    help="comma-separated target groups: bridge, heads, vision, backbone")
    ad.add_argument("--backbone-stages", type=int, default=2,
                    help="with target backbone: the last stages whose 1x1 convolutions are adapted")
    ad.add_argument("--epochs", type=int, default=20)
    ad.add_argument("--batch-size", type=int, default=32)
    ad.add_argument("--lr", type=float, default=2e-3, help="learning rate of the adapter")
    ad.add_argument("--seed", type=int, default=0)
    ad.add_argument("--val-fraction", type=float, help="share of the units, the latest by event time, that validate "
                                                       "(epoch selection and the line's threshold; default 0.2)")
    ad.add_argument("--allow-mixed-rates", action="store_true",
                    help="accept vibration at several sample rates when each is at least 40 kHz")
    ad.add_argument("--soft-targets", action="store_true", help="train the defect score towards graded severities")
    ad.add_argument("--method", choices=["max_f1", "far", "max_accuracy", "fixed"], default="max_f1",
                    help="how the line's threshold is chosen on its validation units")
    ad.add_argument("--threshold", type=float, help="the threshold of --method fixed")
    ad.add_argument("--target-far", type=float, default=0.01, help="--method far: false-alarm rate on good units")
    ad.add_argument("--no-amp", action="store_true")
    ad.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ad.add_argument("--no-promote", action="store_true", help="save without promoting (the service serves promoted "
                                                              "adapters)")
    ad.add_argument("--keep", type=int, default=3, help="adapter versions the line keeps")
    ad.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                    help="progress on stderr: a bar on a terminal, one line per epoch otherwise")
    ad.set_defaults(func=cmd_adapt)

    aa = sub.add_parser("adapters", help="list, promote or roll back per-line adapter versions",
                        description="list works on a read-only store; promote and rollback verify the adapter's "
                                    "weights (sha256); a service loads the promoted adapter of each line when it "
                                    "loads its base version")
    aa.add_argument("action", choices=["list", "promote", "rollback"])
    aa.add_argument("version", nargs="?", help="promote: the adapter version")
    aa.add_argument("--store", required=True, help="the base model's store family, e.g. models/line-line-a")
    aa.add_argument("--line", help="the line (list: only this line)")
    aa.add_argument("--base", help="the base version (default: the promoted one; list: every base version)")
    aa.set_defaults(func=cmd_adapters)
    _add_examples(p)
    return p


#: The example each subcommand's --help ends with, where its parser does not give one itself.
_EXAMPLES: dict[str, str] = {
    "broker": "inspection broker --port 9092 --partitions 3",
    "topics": "inspection topics create --bootstrap 127.0.0.1:9092 --partitions 3",
    "topics create": "inspection topics create --bootstrap 127.0.0.1:9092 --partitions 3",
    "produce": "inspection produce --bootstrap 127.0.0.1:9092 --limit 100 --archive sent.parquet",
    "consume": "inspection consume --bootstrap 127.0.0.1:9092 --topic inspection.decisions --max 10",
    "data": "inspection data info",
    "data info": "inspection data info",
    "data fetch": "inspection data fetch",
    "data export": "inspection data export --out units.parquet --limit 300",
    "serve": "inspection serve --bootstrap 127.0.0.1:9092 --config service.yaml",
    "demo": "inspection demo --units 50 --out runs/demo",
    "train": "inspection train --bench composite --epochs 20 --device auto",
    "calibrate": "inspection calibrate --bench composite",
    "evaluate": "inspection evaluate --bench elpv --tta",
    "explain": "inspection explain --history history.parquet --store models/composite --out reports/",
    "report": "inspection report --from reports/ --out reports/",
    "models": "inspection models list --store models/elpv",
    "adapters": "inspection adapters list --store models/line-line-a",
}


def _add_examples(parser: argparse.ArgumentParser, path: str = "") -> None:
    """Give every subcommand's ``--help`` an example epilog from :data:`_EXAMPLES` (kept as written; its
    description re-wrapped at 100 columns), recursively."""
    for action in parser._actions:  # noqa: SLF001 - argparse keeps subparsers only here
        if not isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            continue
        for name, sub in action.choices.items():
            command = f"{path} {name}".strip()
            if sub.epilog is None and command in _EXAMPLES:
                sub.epilog = f"example: {_EXAMPLES[command]}"
            sub.formatter_class = argparse.RawDescriptionHelpFormatter
            if sub.description:
                sub.description = textwrap.fill(" ".join(sub.description.split()), 100)
            _add_examples(sub, command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import inspection.evaluation as evaluation

    evaluation.COMMAND_LINE = " ".join(["inspection", *(sys.argv[1:] if argv is None else argv)])
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except InspectionError as exc:
        print(f"inspection: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

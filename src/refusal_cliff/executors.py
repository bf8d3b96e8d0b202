"""Where the forward-only stages run their forward passes: this process, or a Ray Data pipeline.

The stages (`trace`, `select`'s scoring, `heads`, `probe train`'s and `layers`' activation capture,
`layers`' traces, `evaluate`'s final scores) compute their results with one per-shard function that
takes a loaded model and a list of records: `trace.trace_records`, `selection.trace_scores`,
`attribution.attribute_records`, `activations.last_token_activations` and
`trace.trace_records_layerwise`, the very functions the local path calls. `--executor ray` only
changes where that function runs:

- the records are cut into shards (contiguous, in record order) and become a Ray Dataset, one row per
  shard; `map_batches` runs `_ShardWorker`, an actor that loads the model once and calls the stage's
  function on each shard;
- each worker writes its shard's results into the run folder (`shards/<stage>/shard-NNNNN.*`, written
  to a temporary name and renamed, so a file that exists is complete); a re-run skips complete shards;
- the driver then reads the shards back in record order and writes the stage's usual artifacts with
  the stage's usual writer, so they are the local executor's, in the same order; the shards are then
  deleted.

A multi-node cluster needs the run folder on a file system every node sees (NFS, Lustre...). Ray is an
optional extra (`pip install 'refusal-cliff[ray]'`), imported only here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from .config import ExecutorConfig, ModelConfig
from .errors import MissingExtraError, UserError
from .runs import atomic_write_text, read_json, read_jsonl, write_json

logger = logging.getLogger(__name__)

SHARDS = "shards"
ADDRESS_TIMEOUT_S = 5.0


# -- checks before any model is loaded -----------------------------------------------------------


def _require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise MissingExtraError("ray", "ray") from None
    return ray


def check_address(address: str, timeout: float = ADDRESS_TIMEOUT_S) -> None:
    """A `--ray-address` answers a TCP connection within `timeout` seconds, or a one-line UserError."""
    if address == "auto":
        return
    target = address.split("://", 1)[-1].rstrip("/")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray-address {address!r} is not host:port or ray://host:port")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise UserError(
            f"cannot reach the Ray cluster at {address} ({reason.lower()}); start it with "
            "`ray start --head` or leave out --ray-address to start a local one"
        ) from None


def check_executor(config: ExecutorConfig) -> None:
    """Fail early (before a model is loaded, before anything is written) on settings that cannot run."""
    config.validate()
    if config.executor != "ray":
        return
    _require_ray()
    if config.ray_address:
        check_address(config.ray_address)
    elif config.gpus_per_worker > 0:
        import torch

        if not torch.cuda.is_available():
            raise UserError(
                f"--gpus-per-worker {config.gpus_per_worker:g} but this machine has no CUDA GPU; "
                "use --gpus-per-worker 0 (CPU workers) or --ray-address of a cluster with GPUs"
            )
        if torch.cuda.device_count() < config.gpus_per_worker * config.workers:
            raise UserError(
                f"--workers {config.workers} × --gpus-per-worker {config.gpus_per_worker:g} "
                "needs "
                f"{config.gpus_per_worker * config.workers:g} GPUs; this machine has "
                f"{torch.cuda.device_count()}"
            )


# -- the stages' shard formats -----------------------------------------------------------------------


@dataclass
class ShardJob:
    """One stage's work as the executors see it.

    Attributes:
        name: the stage ("trace", "score"): the shard folder's name.
        compute: `compute(loaded, records) -> results`, the stage's own per-shard function.
        write: `write(path, results)` writes one shard file.
        read: `read(path) -> results` reads one back, in order.
        result_id: the id of a result.
        suffix: the shard files' extension.
        key: a digest of what the results depend on besides the record ids (model, prober, inputs);
            shards written under another key are not reused.
    """

    name: str
    compute: Callable[[Any, list[dict]], list]
    write: Callable[[Path, list], None]
    read: Callable[[Path], list]
    result_id: Callable[[Any], str]
    suffix: str
    key: str = ""


def shard_key(*parts) -> str:
    """A digest of `parts` (anything `json` or `str` can write; a list item by item) for `ShardJob.key`."""
    from .trace import fingerprint_ids

    def items():
        for part in parts:
            yield from (part if isinstance(part, list) else [part])
            yield "\x00"  # where a part ends

    return fingerprint_ids(json.dumps(item, sort_keys=True, default=str) for item in items())


def _trace_compute(loaded, records, prober, batch_size, direction):
    from .trace import trace_records

    return list(trace_records(loaded, prober, records, batch_size, direction=direction))


def _trace_write(path: Path, results, score_columns: dict[int, str]) -> None:
    """One parquet row per token; `score_columns`: prober layer -> its score column."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, list] = {"id": [], "position": [], "token_id": [], "region": []}
    scores: dict[int, list] = {layer: [] for layer in score_columns}
    direction_scores = []
    for result in results:
        n = len(result.token_ids)
        columns["id"] += [result.id] * n
        columns["position"] += list(range(n))
        columns["token_id"] += list(result.token_ids)
        columns["region"] += list(result.regions)
        for layer in score_columns:
            scores[layer].append(result.scores_by_layer[layer])
        if result.direction_scores is not None:
            direction_scores.append(result.direction_scores)
    table = {
        "id": pa.array(columns["id"], pa.string()),
        "position": pa.array(columns["position"], pa.int32()),
        "token_id": pa.array(columns["token_id"], pa.int32()),
        "region": pa.array(columns["region"], pa.string()),
    }
    for layer, name in score_columns.items():
        values = np.concatenate(scores[layer]).astype(np.float32) if scores[layer] else []
        table[name] = pa.array(values, pa.float32())
    if direction_scores:
        table["direction_score"] = pa.array(np.concatenate(direction_scores).astype(np.float32), pa.float32())
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.table(table), tmp)
    os.replace(tmp, path)


def _trace_read(path: Path, score_columns: dict[int, str]) -> list:
    import numpy as np
    import pyarrow.parquet as pq

    from .trace import TraceResult

    table = pq.read_table(path)
    ids = table.column("id").to_pylist()
    token_ids = table.column("token_id").to_pylist()
    regions = table.column("region").to_pylist()
    scores = {
        layer: table.column(name).to_numpy().astype(np.float32) for layer, name in score_columns.items()
    }
    direction = (
        table.column("direction_score").to_numpy() if "direction_score" in table.column_names else None
    )
    results, start = [], 0
    for stop in range(1, len(ids) + 1):
        if stop == len(ids) or ids[stop] != ids[start]:
            results.append(
                TraceResult(
                    ids[start],
                    token_ids[start:stop],
                    regions[start:stop],
                    {layer: values[start:stop] for layer, values in scores.items()},
                    None if direction is None else direction[start:stop].astype(np.float32),
                )
            )
            start = stop
    return results


def trace_job(prober, batch_size: int, direction=None, name: str = "trace", key: str = "") -> ShardJob:
    """`trace`'s shards: `trace.trace_records` per shard, parquet files of (id, position, token, score).
    `evaluate`'s final scores use it too (`name` "final_score")."""
    columns = {prober.layer: "score"}
    return ShardJob(
        name,
        partial(_trace_compute, prober=prober, batch_size=batch_size, direction=direction),
        partial(_trace_write, score_columns=columns),
        partial(_trace_read, score_columns=columns),
        lambda result: str(result.id),
        ".parquet",
        key,
    )


def _layerwise_compute(loaded, records, probers, batch_size):
    from .trace import trace_records_layerwise

    return list(trace_records_layerwise(loaded, probers, records, batch_size))


def layerwise_job(probers, batch_size: int, key: str = "") -> ShardJob:
    """`layers`' traces: `trace.trace_records_layerwise` per shard, parquet files with a `score_L`
    column per prober layer L."""
    columns = {prober.layer: f"score_{prober.layer}" for prober in probers}
    return ShardJob(
        "layerwise",
        partial(_layerwise_compute, probers=probers, batch_size=batch_size),
        partial(_trace_write, score_columns=columns),
        partial(_trace_read, score_columns=columns),
        lambda result: str(result.id),
        ".parquet",
        key,
    )


def _score_compute(loaded, records, prober, config):
    from .selection import trace_scores

    return list(trace_scores(loaded, prober, records, config))


def _rows_write(path: Path, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def score_job(prober, config) -> ShardJob:
    """`select`'s scoring shards: `selection.trace_scores` per shard, JSONL files of score rows."""
    return ShardJob(
        "score",
        partial(_score_compute, prober=prober, config=config),
        _rows_write,
        read_jsonl,
        lambda row: str(row["id"]),
        ".jsonl",
    )


def _tensors_write(path: Path, tensors: dict, ids: list[str], extra: dict | None = None) -> None:
    """A safetensors shard: `tensors` (first dimension: one row per id) and the ids in its metadata."""
    from safetensors.torch import save_file

    metadata = {"ids": json.dumps(ids), **{key: json.dumps(value) for key, value in (extra or {}).items()}}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _tensors_read(path: Path) -> tuple[dict, list[str], dict]:
    """(tensors, ids, the other metadata) of a shard written by `_tensors_write`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = {key: json.loads(value) for key, value in handle.metadata().items()}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    return tensors, metadata.pop("ids"), metadata


_HEAD_FIELDS = ("contribution", "exact", "o_proj_bias", "mlp", "embedding", "logit")


def _heads_compute(loaded, records, prober, batch_size):
    from .attribution import HeadAttribution, attribute_records

    attribution = attribute_records(
        loaded, records, prober.linear, prober.layer, prober.final_norm_applied, batch_size
    )
    return [
        (
            str(record["id"]),
            HeadAttribution(
                **{field: getattr(attribution, field)[i : i + 1] for field in _HEAD_FIELDS},
                prober_bias=attribution.prober_bias,
            ),
        )
        for i, record in enumerate(records)
    ]


def _heads_write(path: Path, results) -> None:
    from .attribution import HeadAttribution

    merged = HeadAttribution.concatenate([attribution for _, attribution in results])
    tensors = {field: getattr(merged, field) for field in _HEAD_FIELDS}
    _tensors_write(path, tensors, [id_ for id_, _ in results], {"prober_bias": merged.prober_bias})


def _heads_read(path: Path) -> list:
    from .attribution import HeadAttribution

    tensors, ids, metadata = _tensors_read(path)
    return [
        (
            id_,
            HeadAttribution(
                **{field: tensors[field][i : i + 1] for field in _HEAD_FIELDS},
                prober_bias=metadata["prober_bias"],
            ),
        )
        for i, id_ in enumerate(ids)
    ]


def heads_job(prober, batch_size: int, key: str = "") -> ShardJob:
    """`heads`' shards: `attribution.attribute_records` per shard, safetensors of every example's
    `HeadAttribution` rows; results are `(id, HeadAttribution of one example)`."""
    return ShardJob(
        "heads",
        partial(_heads_compute, prober=prober, batch_size=batch_size),
        _heads_write,
        _heads_read,
        lambda result: result[0],
        ".safetensors",
        key,
    )


def _capture_compute(loaded, records, layers, batch_size):
    from .activations import last_token_activations

    captured = last_token_activations(
        loaded.model,
        loaded.adapter,
        [record["tokens"] for record in records],
        layers,
        batch_size,
        loaded.tokenizer.pad_token_id or 0,
    )
    return [
        (str(record["id"]), {layer: values[i] for layer, values in captured.items()})
        for i, record in enumerate(records)
    ]


def _capture_write(path: Path, results) -> None:
    import torch

    layers = list(results[0][1])  # a shard is never empty
    tensors = {f"layer_{layer}": torch.stack([row[layer] for _, row in results]) for layer in layers}
    _tensors_write(path, tensors, [id_ for id_, _ in results])


def _capture_read(path: Path) -> list:
    tensors, ids, _ = _tensors_read(path)
    by_layer = {int(name.removeprefix("layer_")): values for name, values in tensors.items()}
    return [(id_, {layer: values[i] for layer, values in by_layer.items()}) for i, id_ in enumerate(ids)]


def capture_job(layers, batch_size: int, name: str = "capture", key: str = "") -> ShardJob:
    """Last-token activations (`probe train`, `layers`): `activations.last_token_activations` per shard
    on records `{id, tokens}`, safetensors of `layer_L` [n, d_model]; results are `(id, {layer: [d_model]})`."""
    return ShardJob(
        name,
        partial(_capture_compute, layers=list(layers), batch_size=batch_size),
        _capture_write,
        _capture_read,
        lambda result: result[0],
        ".safetensors",
        key,
    )


# -- executors --------------------------------------------------------------------------------------


class LocalExecutor:
    """This process: the stage's function on the whole list (the stages' default path)."""

    local = True

    def info(self) -> dict:
        return {"name": "local"}

    def for_model(self, source: str) -> LocalExecutor:
        return self

    def close(self) -> None:
        """Nothing to release."""


class _ShardWorker:
    """A Ray Data actor: loads the model once, then computes and writes one shard per call."""

    def __init__(self, job: ShardJob, shard_dir: str, model: ModelConfig | None, loaded, gpus: float):
        import torch

        if gpus == 0:
            torch.set_num_threads(1)  # one torch thread per CPU worker: the workers share the cores
        if model is not None:
            from .commands.options import load_model_from

            device = "cuda" if gpus > 0 else "cpu"
            loaded = load_model_from(ModelConfig(**{**model.to_dict(), "device": device}))
        self.loaded, self.job, self.shard_dir = loaded, job, Path(shard_dir)

    def __call__(self, batch: dict) -> dict:
        for shard, records in zip(batch["shard"], batch["records"]):
            path = self.shard_dir / f"shard-{int(shard):05d}{self.job.suffix}"
            if not path.exists():  # complete already (an earlier attempt of this task)
                self.job.write(path, self.job.compute(self.loaded, json.loads(records)))
        return {"shard": batch["shard"]}


class RayExecutor:
    """Ray Data over `config.workers` actors; see the module docstring.

    Args:
        config: workers, cluster address, GPUs per worker, shard size.
        model: how workers load the model (the CLI's `ModelConfig`); without it the driver's loaded
            model object is shipped to the workers (fine for small models and tests).
    """

    local = False

    def __init__(self, config: ExecutorConfig, model: ModelConfig | None = None):
        self.config = config
        self.model = model
        self._started_ray = False

    def info(self) -> dict:
        import importlib.metadata

        return {
            "name": "ray",
            "version": importlib.metadata.version("ray"),
            "workers": self.config.workers,
            "gpus_per_worker": self.config.gpus_per_worker,
            "address": self.config.ray_address or "local",
        }

    def for_model(self, source: str) -> RayExecutor:
        """This executor with workers that load the model `source` (`evaluate`'s models, one after
        the other), on the same cluster: this executor starts and shuts it down."""
        if self.model is None:  # workers get the driver's loaded model
            return self
        model = ModelConfig(**{**self.model.to_dict(), "model": source, "revision": None})
        other = RayExecutor(self.config, model)
        other._ray = self._ray  # type: ignore[method-assign]
        return other

    def shard_size_for(self, n_records: int, batch_size: int) -> int:
        """`--shard-size`, else whole batches, at most 32 a shard, and a shard for every worker."""
        if self.config.shard_size:
            return self.config.shard_size
        per_worker = -(-n_records // self.config.workers)
        return max(1, min(batch_size * 32, -(-per_worker // batch_size) * batch_size))

    def _ray(self):
        ray = _require_ray()
        if not ray.is_initialized():
            check_executor(self.config)
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,
                "logging_level": logging.WARNING,
            }
            if self.config.ray_address:
                try:
                    ray.init(address=self.config.ray_address, **kwargs)
                except (ConnectionError, RuntimeError) as exc:
                    raise UserError(
                        f"cannot join the Ray cluster at {self.config.ray_address} "
                        f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                    ) from None
            else:  # a local cluster on the loopback address only
                ray.init(num_cpus=max(self.config.workers, 1), _node_ip_address="127.0.0.1", **kwargs)
            self._started_ray = True
            if self.config.gpus_per_worker > 0:
                available = ray.cluster_resources().get("GPU", 0)
                if available < self.config.gpus_per_worker:
                    self.close()
                    raise UserError(
                        f"--gpus-per-worker {self.config.gpus_per_worker:g} but the Ray cluster has "
                        f"{available:g} GPUs"
                    )
        return ray

    def close(self) -> None:
        """Shut down the local cluster this executor started (a joined cluster is left running)."""
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False

    def run(
        self,
        loaded,
        job: ShardJob,
        records: Sequence[dict],
        out_dir: str | Path,
        shard_size: int,
        skip: set[str] = frozenset(),
        progress: bool = True,
    ) -> Iterator:
        """The results of `job` on every record not in `skip`, in record order, computed shard by shard.

        Complete shard files from an interrupted run are reused; the shard plan (size, ids) is kept in
        `shards/<stage>/manifest.json` so that a re-run with another batch size cuts the same shards.
        """
        from .trace import chunked, fingerprint_ids

        shard_dir = Path(out_dir) / SHARDS / job.name
        plan = {"ids": fingerprint_ids(str(r["id"]) for r in records), "shard_size": int(shard_size)}
        if job.key:
            plan["key"] = job.key
        manifest = shard_dir / "manifest.json"
        if manifest.is_file():
            previous = read_json(manifest)
            if previous.get("ids") == plan["ids"] and previous.get("key") == plan.get("key"):
                plan["shard_size"] = int(previous["shard_size"])
            else:  # shards of other records: not ours to reuse
                shutil.rmtree(shard_dir)
        shard_dir.mkdir(parents=True, exist_ok=True)
        for stale in shard_dir.glob(".*.tmp"):
            stale.unlink()
        write_json(manifest, plan)
        shards = list(chunked(records, plan["shard_size"]))
        path = lambda index: shard_dir / f"shard-{index:05d}{job.suffix}"
        needed = [i for i, shard in enumerate(shards) if any(str(r["id"]) not in skip for r in shard)]
        missing = [i for i in needed if not path(i).exists()]
        if missing:
            logger.info(
                "%s: %d of %d shards to compute on %d Ray workers",
                job.name,
                len(missing),
                len(needed),
                self.config.workers,
            )
            self._compute(loaded, job, [(i, shards[i]) for i in missing], shard_dir, progress)
        for index in needed:
            for result in job.read(path(index)):
                if job.result_id(result) not in skip:
                    yield result

    def _compute(
        self, loaded, job: ShardJob, shards: list[tuple[int, list[dict]]], shard_dir: Path, progress: bool
    ) -> None:
        from tqdm.auto import tqdm

        ray = self._ray()
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-dataset INFO lines on the console
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.execution_options.preserve_order = True  # shards start in record order
        items = [
            {"shard": index, "records": json.dumps(shard, ensure_ascii=False)} for index, shard in shards
        ]
        dataset = ray.data.from_items(items, override_num_blocks=len(items))
        gpus = self.config.gpus_per_worker
        mapped = dataset.map_batches(
            _ShardWorker,
            batch_size=1,
            concurrency=min(self.config.workers, len(items)),
            num_cpus=1 if gpus == 0 else 0,
            num_gpus=gpus or None,
            fn_constructor_kwargs={
                "job": job,
                "shard_dir": str(shard_dir),
                "model": self.model,
                "loaded": None if self.model is not None else loaded,
                "gpus": gpus,
            },
        )
        with tqdm(total=len(items), desc=f"{job.name} (ray)", unit="shard", disable=not progress) as bar:
            for _ in mapped.iter_batches(batch_size=1):
                bar.update(1)

    @staticmethod
    def remove_shards(out_dir: str | Path, name: str) -> None:
        """Delete a stage's shards once its artifacts hold everything (then the shards folder if empty)."""
        root = Path(out_dir) / SHARDS
        shutil.rmtree(root / name, ignore_errors=True)
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()


def make_executor(config: ExecutorConfig | None, model: ModelConfig | None = None):
    """The executor a config names (None or local: `LocalExecutor`)."""
    if config is None or config.executor == "local":
        return LocalExecutor()
    return RayExecutor(config, model)

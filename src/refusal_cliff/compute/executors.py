"""Where the forward-only stages run their forward passes: this process, or a Ray Data pipeline.

A stage hands `run_job` a `ShardJob`: its per-shard function (a loaded model and a list of records in,
results out, the very function the local path calls), a shard writer and reader, and a name. The job
builders live beside the function they wrap (`compute.tracing.trace_job`, `compute.attribution.heads_job`,
`compute.activations.capture_job`, `stages.select.score_job`); this module runs any job it is handed
and imports no stage. `--executor ray` only changes where that function runs:

- the records are cut into shards (contiguous, in record order) and become a Ray Dataset, one row per
  shard; `map_batches` runs `_ShardWorker`, an actor that loads the model once and calls the stage's
  function on each shard;
- each worker writes its shard's results into the run folder (`shards/<stage>/shard-NNNNN.*`, written
  to a temporary name and renamed, so a file that exists is complete); a re-run skips complete shards;
- the driver then reads the shards back in record order and writes the stage's usual artifacts with
  the stage's usual writer, so they are the local executor's, in the same order; the shards are then
  deleted.

Every stage dispatches through `run_job` (this process or Ray, shard size, clean-up). Workers load the
model the driver loaded: same source (a local path made absolute), same revision, the dtype the
driver's model actually has (not "auto", which would pick fp32 on a CPU worker under a bf16 GPU
driver). A shard folder is reused only under the same `shard_key` (the stage's inputs and settings,
the model id, revision and dtype); shards of anything else are deleted.

A multi-node cluster needs the run folder on a file system every node sees (NFS, Lustre...). Ray is an
optional extra (`pip install 'refusal-cliff[ray]'`), imported only here.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from refusal_cliff.core.config import ExecutorConfig, ModelConfig
from refusal_cliff.core.errors import MissingExtraError, UserError
from refusal_cliff.core.models import BUILTIN_MODELS, load_model_from
from refusal_cliff.core.runs import atomic_write_text, chunked, fingerprint_ids, read_json, write_json

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


# -- jobs and the shard formats they share -----------------------------------------------------------


@dataclass
class ShardJob:
    """One stage's work as the executors see it.

    Attributes:
        name: the stage ("trace", "score"): the shard folder's name.
        compute: `compute(loaded, records, progress=False) -> results` (an iterable, in record order),
            the stage's own function: on one shard in a worker, on every record in this process.
        write: `write(path, results)` writes one shard file.
        read: `read(path) -> results` reads one back, in order.
        result_id: the id of a result.
        suffix: the shard files' extension.
        key: `shard_key` of what the results depend on besides the record ids (`run_job` sets it);
            shards written under another key are deleted, never reused.
    """

    name: str
    compute: Callable[..., Iterable]
    write: Callable[[Path, list], None]
    read: Callable[[Path], list]
    result_id: Callable[[Any], str]
    suffix: str
    key: str = ""


def model_dtype(loaded) -> str:
    """The dtype the loaded model runs in, as `ModelConfig.dtype` names it ("float32", "bfloat16"...)."""
    return str(next(loaded.model.parameters()).dtype).removeprefix("torch.")


def shard_key(fingerprint, loaded) -> str:
    """`ShardJob.key`: a digest of `fingerprint` (the run's fingerprint, or the inputs and settings the
    results depend on: anything `json` or `str` can write) and the model the driver loaded (id,
    revision and actual dtype), so that shards of another run, model or precision are never reused."""
    parts = [fingerprint, loaded.model_id, loaded.revision, model_dtype(loaded)]
    return fingerprint_ids(json.dumps(part, sort_keys=True, default=str) for part in parts)


def write_rows_shard(path: Path, rows) -> None:
    """A JSONL shard: one row per line."""
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_tensor_shard(path: Path, tensors: dict, ids: list[str], extra: dict | None = None) -> None:
    """A safetensors shard: `tensors` (first dimension: one row per id) and the ids in its metadata."""
    metadata = {"ids": json.dumps(ids), **{key: json.dumps(value) for key, value in (extra or {}).items()}}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_tensor_shard(path: Path) -> tuple[dict, list[str], dict]:
    """(tensors, ids, the other metadata) of a shard written by `write_tensor_shard`."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = {key: json.loads(value) for key, value in handle.metadata().items()}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    return tensors, metadata.pop("ids"), metadata


# -- executors --------------------------------------------------------------------------------------


class _Executor:
    """What both executors share: a context manager whose exit releases what the executor holds."""

    local: bool

    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class LocalExecutor(_Executor):
    """This process: the stage's function on the whole list (the stages' default path)."""

    local = True

    def info(self) -> dict:
        return {"name": "local"}

    def for_model(self, source: str) -> LocalExecutor:
        return self


def _shard_path(shard_dir: Path, index: int, job: ShardJob) -> Path:
    return shard_dir / f"shard-{index:05d}{job.suffix}"


class _ShardWorker:
    """A Ray Data actor: loads the model once, then computes and writes one shard per call."""

    def __init__(self, job: ShardJob, shard_dir: str, model: ModelConfig | None, loaded, gpus: float):
        import torch

        if gpus == 0:
            torch.set_num_threads(1)  # one torch thread per CPU worker: the workers share the cores
        if model is not None:  # the driver's source and dtype (see `worker_model`), this worker's device
            loaded = load_model_from(replace(model, device="cuda" if gpus > 0 else "cpu"))
        self.loaded, self.job, self.shard_dir = loaded, job, Path(shard_dir)

    def __call__(self, batch: dict) -> dict:
        for shard, records in zip(batch["shard"], batch["records"]):
            path = _shard_path(self.shard_dir, int(shard), self.job)
            if not path.exists():  # complete already (an earlier attempt of this task)
                self.job.write(path, list(self.job.compute(self.loaded, json.loads(records))))
        return {"shard": batch["shard"]}


def worker_model(model: ModelConfig, loaded) -> ModelConfig:
    """The `ModelConfig` Ray workers load: `model` with the dtype the driver's `loaded` model actually has
    (not "auto": a CPU worker would pick fp32 under a bf16 GPU driver) and a local path made absolute
    (a worker's working directory is not the driver's)."""
    source = model.model
    if source in BUILTIN_MODELS:  # made by the driver already; a worker need not know the stage that made it
        source = str(BUILTIN_MODELS[source].folder())
    elif source and source != "default" and Path(source).expanduser().exists():
        source = str(Path(source).expanduser().resolve())
    dtype = model_dtype(loaded)
    return replace(
        model, model=source, dtype=dtype if dtype in ("float32", "bfloat16", "float16") else model.dtype
    )


class _Cluster:
    """The Ray cluster of an executor and of those `for_model` derives from it: joined (`--ray-address`)
    or started on first use; `close` shuts down a cluster started here."""

    def __init__(self, config: ExecutorConfig):
        self.config = config
        self.started = False

    def connect(self):
        ray = _require_ray()
        if ray.is_initialized():
            return ray
        config = self.config
        check_executor(config)
        kwargs: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": logging.WARNING,
        }
        if config.ray_address:
            try:
                ray.init(address=config.ray_address, **kwargs)
            except (ConnectionError, RuntimeError) as exc:
                raise UserError(
                    f"cannot join the Ray cluster at {config.ray_address} "
                    f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                ) from None
        else:  # a local cluster on the loopback address only
            ray.init(num_cpus=max(config.workers, 1), _node_ip_address="127.0.0.1", **kwargs)
        self.started = True
        if config.gpus_per_worker > 0:
            available = ray.cluster_resources().get("GPU", 0)
            if available < config.gpus_per_worker:
                self.close()
                raise UserError(
                    f"--gpus-per-worker {config.gpus_per_worker:g} but the Ray cluster has {available:g} GPUs"
                )
        return ray

    def close(self) -> None:
        if self.started:
            import ray

            ray.shutdown()
            self.started = False


class RayExecutor(_Executor):
    """Ray Data over `config.workers` actors; see the module docstring.

    Args:
        config: workers, cluster address, GPUs per worker, shard size.
        model: how workers load the model (the CLI's `ModelConfig`; they use the driver's dtype, see
            `worker_model`); without it the driver's loaded model object is shipped to the workers
            (fine for small models and tests).
    """

    local = False

    def __init__(
        self, config: ExecutorConfig, model: ModelConfig | None = None, cluster: _Cluster | None = None
    ):
        self.config = config
        self.model = model
        self._cluster = cluster or _Cluster(config)

    def info(self) -> dict:
        return {
            "name": "ray",
            "version": importlib.metadata.version("ray"),
            "workers": self.config.workers,
            "gpus_per_worker": self.config.gpus_per_worker,
            "address": self.config.ray_address or "local",
        }

    def for_model(self, source: str) -> RayExecutor:
        """This executor with workers that load the model `source` (`evaluate`'s models, one after
        the other), on the same cluster (closing either executor shuts down a cluster started here)."""
        if self.model is None:  # workers get the driver's loaded model
            return self
        return RayExecutor(self.config, replace(self.model, model=source, revision=None), self._cluster)

    def shard_size_for(self, n_records: int, batch_size: int, unit: int | None = None) -> int:
        """`--shard-size`; else `unit`, the chunk a stage's local path batches on its own (`trace`'s sort
        window, `select`'s --chunk-size: the same batches, so the same scores to the bit); else whole
        batches, at most 32 a shard, and a shard for every worker."""
        if self.config.shard_size:
            return self.config.shard_size
        if unit:
            return unit
        per_worker = -(-n_records // self.config.workers)
        return max(1, min(batch_size * 32, -(-per_worker // batch_size) * batch_size))

    def close(self) -> None:
        """Shut down the local cluster this executor started (a joined cluster is left running)."""
        self._cluster.close()

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

        Complete shard files from an interrupted run are reused; the shard plan (size, ids, key) is kept in
        `shards/<stage>/manifest.json` so that a re-run with another batch size cuts the same shards.
        """
        shard_dir = Path(out_dir).resolve() / SHARDS / job.name
        plan = {"ids": fingerprint_ids(str(r["id"]) for r in records), "shard_size": int(shard_size)}
        if job.key:
            plan["key"] = job.key
        manifest = shard_dir / "manifest.json"
        if manifest.is_file():
            previous = read_json(manifest)
            if previous.get("ids") == plan["ids"] and previous.get("key") == plan.get("key"):
                plan["shard_size"] = int(previous["shard_size"])
            else:  # shards of other records, inputs, model or dtype: not ours to reuse
                shutil.rmtree(shard_dir)
        shard_dir.mkdir(parents=True, exist_ok=True)
        for stale in shard_dir.glob(".*.tmp"):
            stale.unlink()
        write_json(manifest, plan)
        shards = list(chunked(records, plan["shard_size"]))
        needed = [i for i, shard in enumerate(shards) if any(str(r["id"]) not in skip for r in shard)]
        missing = [i for i in needed if not _shard_path(shard_dir, i, job).exists()]
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
            for result in job.read(_shard_path(shard_dir, index, job)):
                if job.result_id(result) not in skip:
                    yield result

    def _worker_kwargs(self, loaded, job: ShardJob, shard_dir: Path) -> dict:
        """`_ShardWorker`'s arguments: the model as the workers load it (`worker_model`) or, without a
        `ModelConfig`, the driver's model object; the shard folder as an absolute path."""
        return {
            "job": job,
            "shard_dir": str(Path(shard_dir).resolve()),
            "model": None if self.model is None else worker_model(self.model, loaded),
            "loaded": None if self.model is not None else loaded,
            "gpus": self.config.gpus_per_worker,
        }

    def _compute(
        self, loaded, job: ShardJob, shards: list[tuple[int, list[dict]]], shard_dir: Path, progress: bool
    ) -> None:
        ray = self._cluster.connect()
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
            compute=ray.data.ActorPoolStrategy(size=min(self.config.workers, len(items))),
            num_cpus=1 if gpus == 0 else 0,
            num_gpus=gpus or None,
            fn_constructor_kwargs=self._worker_kwargs(loaded, job, shard_dir),
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


def run_job(
    executor,
    loaded,
    job: ShardJob,
    records: Sequence[dict],
    out_dir: str | Path | None,
    batch_size: int,
    *,
    fingerprint,
    skip: Iterable[str] = frozenset(),
    progress: bool = True,
    unit: int | None = None,
) -> Iterable:
    """The results of `job` on the records whose id is not in `skip`, in record order: every stage's one
    dispatch path.

    No executor or a local one: `job.compute` on those records, in this process. A Ray executor: shard
    by shard on its workers (`RayExecutor.run`, `shard_size_for(len(records), batch_size, unit)` the
    size), under
    `out_dir/shards/<job.name>/` keyed by `shard_key(fingerprint, loaded)` (`fingerprint`: the run's
    fingerprint, or what the results depend on besides the model), deleted once the last result has been
    read back (an interrupted stage keeps them for its re-run).
    """
    skip = set(skip)
    if executor is None or executor.local:
        return job.compute(loaded, [r for r in records if str(r["id"]) not in skip], progress=progress)
    if out_dir is None:
        raise ValueError("a Ray executor writes its shards into out_dir: give one")
    job = replace(job, key=shard_key(fingerprint, loaded))
    shard_size = executor.shard_size_for(len(records), batch_size, unit)
    return _run_sharded(executor, loaded, job, records, out_dir, shard_size, skip, progress)


def _run_sharded(executor, loaded, job, records, out_dir, shard_size, skip, progress) -> Iterator:
    yield from executor.run(loaded, job, records, out_dir, shard_size, skip=skip, progress=progress)
    RayExecutor.remove_shards(out_dir, job.name)

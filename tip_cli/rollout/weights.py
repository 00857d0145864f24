"""The trainer's student, pushed into running `vllm serve` replicas after each update (rollout.engine=vllm_server).

`WeightPusher(cfg, run_dir)` holds the replicas' URLs; `connect(model)` sets up each replica's
weight-transfer engine once, `push(model, version)` sends the student's parameters (checkpoint names, as
`weights_for_sync` yields them) and returns the replicas still serving, `version(url)` reads what a replica serves
(its /weight_info; None before the first push). The replicas run vLLM's weight-transfer routes
(`python -m tip_cli.rollout.serve`, or `vllm serve` with VLLM_SERVER_DEV_MODE=1 and the transfer engine named).

filesystem (backend `tip_file`, tip_cli.rollout.vllm_plugin): the student is written once to
`<weight_dir>/v<version>.safetensors` (streamed one gathered tensor at a time into a hidden file, then renamed into
place; the version also goes into the file's metadata), then each replica, in parallel, gets /start_weight_update,
/update_weights {path, size, version}, /finish_weight_update {weight_version} and a prefix-cache reset (no KV
computed with the old weights is reused). Older version files are deleted. This path imports no vLLM.

nccl (vLLM's `nccl` backend, GPU only): vLLM's trainer engine broadcasts from this process (NCCL rank 0, rendezvous
at this host's address towards the replicas and rollout.nccl_port) to every replica's workers, which take the ranks
after it in URL order (world size 1 + the sum of the replicas' /get_world_size). The replicas form one group: a
failed broadcast leaves it unusable, so it is not retried and cannot drop a replica (on_push_failure=drop is
refused for nccl).

A push counts only when the replica's /weight_info reports the new version afterwards; a replica never silently
serves old weights. A failed push is retried `retries` times, `backoff_s` doubling; still failing, `stop` raises
`WeightPushError` naming the replica, the version and the run's last checkpoint, `drop` prints one line and goes on
without the replica (raising when none is left). Under FSDP every rank calls `push` (the parameters are gathered
collectively); rank 0 writes and talks to the replicas and tells the others the outcome.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import PreTrainedModel

from tip_cli.config.schema import ConfigError, RolloutConfig
from tip_cli.errors import UserError
from tip_cli.rollout.vllm_plugin import BACKEND, VERSION_KEY
from tip_cli.servers import request, resume_hint, with_retries

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
SERVE_HINT = ("start it with `python -m tip_cli.rollout.serve --model STUDENT` (vllm serve with the weight-transfer "
              "routes and the tip_file engine)")


class WeightPushError(UserError, ConnectionError):
    """A replica that did not take the student's new weights; the message names it and the checkpoint to resume."""


def weights_for_sync(model: PreTrainedModel, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """The student's parameters under their checkpoint names, in `dtype` (None: each its own), made one at a time as
    the consumer takes them: a sharded (FSDP2) one is cast on its shard and then gathered, so the gather moves the
    target dtype and one full tensor is alive at a time, not the whole model in the master dtype."""
    for name, param in model.named_parameters():
        tensor = param.detach().to(dtype or param.dtype)
        if hasattr(tensor, "full_tensor"):  # a DTensor shard (FSDP2)
            tensor = tensor.full_tensor()
        yield name, tensor


def write_weights(model: PreTrainedModel, path: Path, version: int, dtype: torch.dtype | None = None,
                  write: bool = True) -> int:
    """Write the student as a safetensors file at `path` with `version` in its metadata, atomically (a hidden file
    renamed into place), streaming one tensor at a time; its size in bytes. With `write` False the tensors are only
    gathered (an FSDP rank other than 0 joins the collectives)."""
    header: dict = {"__metadata__": {VERSION_KEY: str(version)}}
    offset = 0
    for name, param in model.named_parameters():  # a DTensor's shape and numel are the full tensor's
        dt = dtype or param.dtype
        if dt not in SAFETENSORS_DTYPES:
            raise ConfigError(f"cannot push {name} in {dt}: the weight file takes {list(SAFETENSORS_DTYPES)}")
        size = param.numel() * dt.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dt], "shape": list(param.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    if not write:
        for _ in weights_for_sync(model, dtype):
            pass
        return 8 + len(blob) + offset
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for _, tensor in weights_for_sync(model, dtype):
                f.write(tensor.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_size


def _request(url: str, body: dict | None = None, timeout: float = 60.0, get: bool = False) -> dict:
    """POST `body` as JSON (GET when `get`) and decode the JSON answer; an HTTP error status raises a
    ConnectionError with the server's detail (tip_cli.servers.request)."""
    return request(url, None if get else (body or {}), timeout)


def local_address(url: str) -> str:
    """This host's address on the route to `url`'s host: where the replicas reach the trainer's NCCL rendezvous."""
    parsed = urlparse(url)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((parsed.hostname, parsed.port or 80))  # UDP: picks the route, sends nothing
        return s.getsockname()[0]


class _Replicas:
    """vLLM's weight-sync client (`VLLMWeightSyncClient`) over several replicas, each call sent to all of them at
    once: for NCCL every replica's workers must enter the rendezvous and the broadcast together. Replica i's
    workers take NCCL ranks after the trainer's and those of the replicas before it."""

    def __init__(self, urls: list[str], world_sizes: list[int], timeout: float):
        self.urls, self.world_sizes, self.timeout = urls, world_sizes, timeout
        self.version: str | None = None  # what finish_weight_update labels the weights with

    def _all(self, path: str, bodies: list[dict]) -> None:
        with ThreadPoolExecutor(len(self.urls)) as pool:
            for f in [pool.submit(_request, u + path, b, self.timeout) for u, b in zip(self.urls, bodies, strict=True)]:
                f.result()

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        offsets = [1 + sum(self.world_sizes[:i]) for i in range(len(self.urls))]
        self._all("/init_weight_transfer_engine", [{"init_info": {**init_info, "rank_offset": o}} for o in offsets])

    def start_weight_update(self) -> None:
        self._all("/start_weight_update", [{}] * len(self.urls))

    def update_weights(self, update_info: dict) -> None:
        self._all("/update_weights", [{"update_info": update_info}] * len(self.urls))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        body = {"weight_version": weight_version or self.version}
        self._all("/finish_weight_update", [body] * len(self.urls))


class WeightPusher:
    """Pushes the student to the replicas at `cfg.url` by `cfg.weight_transfer`, in `dtype` (None: each parameter's
    own), with `cfg`'s retries, backoff, timeout and on_push_failure; weight files go to cfg.weight_dir (default
    `run_dir`/weights), and a failure names `run_dir`'s last checkpoint."""

    def __init__(self, cfg: RolloutConfig, run_dir: Path, dtype: torch.dtype | None = None):
        if cfg.weight_transfer == "nccl" and cfg.on_push_failure == "drop":
            raise ConfigError("rollout.on_push_failure=drop needs rollout.weight_transfer=filesystem: the nccl "
                              "replicas share one broadcast group, which a failed replica leaves unusable for all")
        self.cfg, self.urls = cfg, list(cfg.url)
        self.run_dir, self.dtype = Path(run_dir), dtype
        self.weight_dir = Path(cfg.weight_dir) if cfg.weight_dir else self.run_dir / "weights"
        self._nccl = None  # vLLM's trainer engine, once connected
        self._replicas: _Replicas | None = None

    @property
    def _rank(self) -> int:
        return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    def version(self, url: str) -> int | None:
        """The weight version the replica at `url` serves (None before the first push)."""
        got = _request(url + "/weight_info", timeout=self.cfg.timeout_s, get=True)["weight_version"]
        return int(got) if str(got).isdigit() else None

    def connect(self, model: PreTrainedModel) -> None:
        """Set up every replica's weight-transfer engine; a replica without the routes or the engine fails here."""
        if self.cfg.weight_transfer == "nccl":
            self._connect_nccl(model)
            return
        if self._rank == 0:
            for url in self.urls:
                try:
                    _request(url + "/init_weight_transfer_engine", {"init_info": {}}, self.cfg.timeout_s)
                except OSError as err:
                    raise ConfigError(f"student server {url} refused the weight-transfer set-up ({err}); it needs "
                                      f"the weight-transfer routes and --weight-transfer-config "
                                      f"'{{\"backend\": \"{BACKEND}\"}}': {SERVE_HINT}") from err

    def push(self, model: PreTrainedModel, version: int) -> list[str]:
        """Send `model`'s weights as `version` to every live replica; the replicas that now serve it."""
        outcome: list = [None, None]  # rank 0's: the live URLs, or the failure's message
        try:
            if self.cfg.weight_transfer == "nccl":
                self._push_nccl(version)
                outcome[0] = list(self.urls)
            else:
                outcome[0] = self._push_file(model, version)
        except WeightPushError as err:
            outcome[1] = str(err)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.broadcast_object_list(outcome, src=0)
        if outcome[1] is not None:
            raise WeightPushError(outcome[1])
        self.urls = outcome[0]
        return list(self.urls)

    def _push_file(self, model: PreTrainedModel, version: int) -> list[str] | None:
        """Write the file (rank 0; the others only join the gathers) and push it to every replica at once."""
        path = self.weight_dir / f"v{version}.safetensors"
        if self._rank != 0:
            write_weights(model, path, version, self.dtype, write=False)
            return None
        info = {"path": str(path.resolve()), "size": write_weights(model, path, version, self.dtype),
                "version": str(version)}
        for old in self.weight_dir.glob("v*.safetensors"):
            if old != path:
                old.unlink(missing_ok=True)
        with ThreadPoolExecutor(len(self.urls)) as pool:
            errors = list(pool.map(lambda url: self._push_with_retries(url, info, version), self.urls))
        failed = [(url, err) for url, err in zip(self.urls, errors, strict=True) if err is not None]
        if not failed:
            return list(self.urls)
        if self.cfg.on_push_failure == "stop":
            raise WeightPushError(self._failure(*failed[0], version))
        live = [url for url, err in zip(self.urls, errors, strict=True) if err is None]
        for url, err in failed:
            print(f"student server {url} dropped: the push of weights version {version} failed "
                  f"{self.cfg.retries + 1} times ({err}); {len(live)} left", flush=True)
        if not live:
            raise WeightPushError(self._failure(*failed[-1], version) + "; no replica is left")
        return live

    def _push_with_retries(self, url: str, info: dict, version: int) -> Exception | None:
        """None once the replica serves `version`; the last error after 1 + retries tries."""
        def push(_: int) -> None:
            t = self.cfg.timeout_s
            _request(url + "/start_weight_update", {}, t)
            _request(url + "/update_weights", {"update_info": info}, t)
            _request(url + "/finish_weight_update", {"weight_version": str(version)}, t)
            self._confirm(url, version)

        try:  # every failure is retried, a refusal (4xx) included
            with_retries(push, self.cfg.retries, self.cfg.backoff_s, fatal=())
        except (OSError, ValueError, KeyError) as failure:  # down, timed out, refused, or a garbled answer
            return failure
        return None

    def _confirm(self, url: str, version: int) -> None:
        """After a push: drop the replica's prefix cache (no KV computed with the old weights is reused) and check
        that it serves `version`; ConnectionError naming the replica when it does not."""
        # running requests are preempted and recomputed, so the reset cannot be refused while they hold blocks
        _request(url + "/reset_prefix_cache?reset_running_requests=true", {}, self.cfg.timeout_s)
        if (served := self.version(url)) != version:
            raise ConnectionError(f"{url} reports weights version {served} after the push")

    def _failure(self, url: str, err: Exception, version: int) -> str:
        resume = resume_hint(self.run_dir, "once the replica is back")
        return (f"student server {url} did not take weights version {version} after {self.cfg.retries + 1} "
                f"attempts (last error: {err}); training stopped: {resume}")

    def _connect_nccl(self, model: PreTrainedModel) -> None:
        """Rendezvous vLLM's NCCL trainer engine with every replica's workers (rank 0 here, the replicas after)."""
        from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        dtype = self.dtype

        class Source(WeightSource):
            def metadata(self) -> list[ParamMeta]:
                return [ParamMeta(n, dtype or p.dtype, tuple(p.shape)) for n, p in model.named_parameters()]

            def __iter__(self):
                return weights_for_sync(model, dtype)

        sizes = [] if self._rank else [
            int(_request(u + "/get_world_size", timeout=self.cfg.timeout_s, get=True)["world_size"]) for u in self.urls]
        self._replicas = _Replicas(self.urls, sizes, self.cfg.timeout_s)
        info = NCCLTrainerInitInfo(master_address=local_address(self.urls[0]), master_port=self.cfg.nccl_port,
                                   world_size=1 + sum(sizes), rank=self._rank)
        self._nccl = WeightTransferTrainerFactory.trainer_init(info, client=self._replicas, source=Source())

    def _push_nccl(self, version: int) -> None:
        if self._nccl is None:
            raise RuntimeError("WeightPusher.connect(model) must run before the first push")
        self._replicas.version = str(version)
        try:
            self._nccl.send_weights()
            if self._rank == 0:
                for url in self.urls:
                    self._confirm(url, version)
        except (OSError, ValueError, RuntimeError) as err:
            raise WeightPushError(self._failure(", ".join(self.urls), err, version)) from err

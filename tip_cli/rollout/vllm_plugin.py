"""The `tip_file` weight-transfer engine: inside a `vllm serve` replica, loads the trainer's student from a
safetensors file (rollout.weight_transfer=filesystem; the trainer's side is tip_cli.rollout.weights).

vLLM's weight-transfer routes (/init_weight_transfer_engine, /start_weight_update, /update_weights,
/finish_weight_update, mounted with VLLM_SERVER_DEV_MODE=1) drive the engine named by `--weight-transfer-config
'{"backend": "tip_file"}'`. An update names a file the replica can read, its byte size and the version written into
its safetensors metadata; a file that is short (half written, half copied) or holds another version is refused
before any weight is touched. The tensors load through vLLM's layerwise reload, as ipc_engine's do: checkpoint names
(separate q/k/v, gate/up) are stacked and processed like a load from disk.

`register()` is the `vllm.general_plugins` entry point (pyproject.toml), so a plain `vllm serve` of an installed tip
knows the backend; it registers by module path and imports no vLLM engine code until a server creates the engine.
`python -m tip_cli.rollout.serve` is the launcher that needs no entry point (tests, scripts).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

BACKEND = "tip_file"
VERSION_KEY = "tip_weight_version"  # the safetensors metadata entry holding the version a file was written for


def register() -> None:
    """Make `tip_file` a vLLM weight-transfer backend (idempotent; imports only vLLM's registry)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, __name__, "FileWeightTransferEngine")


def file_version(path: Path) -> str | None:
    """The version a tip weight file was written for, read from its safetensors header alone."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return header.get("__metadata__", {}).get(VERSION_KEY)


def check_file(path: str, size: int, version: str) -> Path:
    """`path` as a Path when it is the whole file of `version`; else a ValueError saying what is wrong."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"weight file {file} does not exist on this replica; rollout.weight_dir must be a "
                         "directory the trainer and every replica see at the same path")
    if (found := file.stat().st_size) != size:
        raise ValueError(f"weight file {file} holds {found} bytes, the trainer wrote {size}: it is partial or "
                         "another file; refusing to load it")
    if (written := file_version(file)) != version:
        raise ValueError(f"weight file {file} holds version {written}, the update is for version {version}: a "
                         "stale file; refusing to load it")
    return file


def refresh_packed_lm_head(model) -> None:
    """CPU backend: the lm_head keeps a packed copy of its (possibly tied) weight, which a reload leaves stale."""
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)


def _engine_classes():
    """The engine and its info types, defined on first use inside the server (they subclass vLLM's)."""
    from vllm.distributed.weight_transfer.base import (
        WeightTransferEngine,
        WeightTransferInitInfo,
        WeightTransferUpdateInfo,
    )

    @dataclass
    class FileInitInfo(WeightTransferInitInfo):
        """Nothing to set up: the file system is the channel."""

    @dataclass
    class FileUpdateInfo(WeightTransferUpdateInfo):
        path: str  # a safetensors file the replica can read
        size: int  # its byte size, as the trainer wrote it
        version: str  # the version in its metadata

    class FileWeightTransferEngine(WeightTransferEngine[FileInitInfo, FileUpdateInfo]):
        """Loads a safetensors file of checkpoint-format tensors through vLLM's layerwise reload."""

        init_info_cls = FileInitInfo
        update_info_cls = FileUpdateInfo
        supports_draft_weight_update = False

        def init_transfer_engine(self, init_info: FileInitInfo) -> None:
            pass

        def start_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            initialize_layerwise_reload(self.model)

        def receive_weights(self, update_info: FileUpdateInfo) -> None:
            from safetensors import safe_open

            try:
                file = check_file(update_info.path, update_info.size, update_info.version)
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    self.model.load_weights((name, f.get_tensor(name)) for name in f.keys())
            except BaseException:
                # the worker ends a failed update without finish_weight_update, which would leave the layers on
                # the meta device: put them back (a layer that loaded nothing gets its old weights) so the replica
                # keeps serving, under its old version, and the next update starts clean
                self.finish_weight_update()
                raise

        def update_weights(self, update_info: dict) -> None:
            # the base class synchronizes torch.accelerator, which a CPU-only build does not have
            self.receive_weights(self.parse_update_info(update_info))

        def finish_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            finalize_layerwise_reload(self.model, self.model_config)
            if self.device.type == "cpu":
                refresh_packed_lm_head(self.model)

        def shutdown(self) -> None:
            pass

    return FileWeightTransferEngine


def __getattr__(name: str):
    if name == "FileWeightTransferEngine":  # what the factory's lazy loader asks for
        cls = _engine_classes()
        globals()[name] = cls
        return cls
    raise AttributeError(name)

"""Checkpoints that plain torch can read: safetensors files plus a small JSON manifest.

One checkpoint is a directory ``<root>/step-<outer step, 8 digits>/`` holding

* ``model.safetensors``: the module's ``state_dict()`` (parameters in the model's own dtype,
  buffers included), so ``model.load_state_dict(safetensors.torch.load_file(path))`` restores
  the weights with nothing of ours installed;
* ``optimizer.safetensors``: the rest of :meth:`DiLoCo.export_state(local=True)
  <p2pcompute.training.diloco.DiLoCo.export_state>`: the (fp32 master) anchor ``param/*``, the
  outer momentum ``outer/*``, averaged buffers ``buffer/*`` and the inner optimizer's tensors
  ``inner/<index>/<name>``;
* ``manifest.json``: format and version, outer step, counters, the state's scalar ``meta``,
  the inner optimizer's ``param_groups`` hyper-parameters (lr after a scheduler, betas...), an
  optional JSON ``extra`` (a scheduler's ``state_dict()``), the SHA-256 and size of both files and
  the digest of the whole training state.

Every file is written with :func:`~p2pcompute._fsutil.atomic_write`, the manifest last: a
directory without a manifest is an interrupted write and is never loaded (and is removed by the
next save). Only the newest ``keep`` checkpoints stay. Loading checks both files' hashes, parses
them with ``safetensors`` (never pickle) and compares the assembled state's digest.

Imports torch, safetensors, :mod:`p2pcompute._fsutil`, :mod:`.state` and errors; the DiLoCo
type only for annotations.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from p2pcompute._fsutil import atomic_write
from p2pcompute.training.state import CheckpointError, MetaValue, TrainingState

if TYPE_CHECKING:
    from p2pcompute.training.diloco import DiLoCo

FORMAT = "p2pcompute-checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
MANIFEST_FILE = "manifest.json"
MAX_MANIFEST = 4 << 20
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


@dataclass(frozen=True)
class Prepared:
    """A checkpoint serialized in memory, ready to be written (see :func:`prepare`)."""

    step: int
    files: dict[str, bytes]


def _cpu(t: torch.Tensor) -> torch.Tensor:
    # a private contiguous copy: safetensors refuses shared or strided storage (tied weights)
    return t.detach().to("cpu").contiguous().clone()


def _json_value(v: Any) -> Any:
    if isinstance(v, bool | int | float | str) or v is None:
        return v
    if isinstance(v, list | tuple):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    return repr(v)


def prepare(opt: DiLoCo) -> Prepared:
    """Serialize ``opt`` (and its module) now; cheap enough for the trio thread, no disk I/O.

    Example::

        files = prepare(opt); await trio.to_thread.run_sync(write, "ckpt", files, 3)
    """
    state = opt.export_state(local=True)
    if opt.module is not None:
        model = {k: _cpu(v) for k, v in opt.module.state_dict().items()}
    else:
        model = {name: _cpu(p) for name, p in opt.named}
    rest = {k: _cpu(v) for k, v in state.tensors.items() if not k.startswith("local/")}
    files = {MODEL_FILE: st_save(model), OPTIMIZER_FILE: st_save(rest)}
    groups = [{k: _json_value(v) for k, v in g.items() if k != "params"} for g in opt.inner.param_groups]
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "outer_step": state.step,
        "meta": dict(state.meta),
        "param_groups": groups,
        "extra": _json_value(opt.checkpoint_extra()) if opt.checkpoint_extra is not None else {},
        "state_digest": state.digest().hex(),
        "files": {n: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)} for n, b in files.items()},
    }
    files[MANIFEST_FILE] = json.dumps(manifest, indent=1, sort_keys=True).encode()
    return Prepared(state.step, files)


def write(root: str | os.PathLike[str], prepared: Prepared, keep: int = 3) -> Path:
    """Write ``prepared`` under ``root`` (atomically, manifest last) and keep the newest ``keep``.

    Example::

        path = write("ckpt", prepare(opt), keep=3)     # ckpt/step-00000012
    """
    base = Path(root)
    target = base / f"step-{prepared.step:08d}"
    target.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILE, OPTIMIZER_FILE, MANIFEST_FILE):
        atomic_write(target / name, prepared.files[name])
    complete = [p for p in _step_dirs(base) if (p / MANIFEST_FILE).exists()]
    doomed = set(complete[:-keep])
    newest = complete[-1] if complete else target
    doomed |= {p for p in _step_dirs(base) if not (p / MANIFEST_FILE).exists() and p != newest}
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return target


def save(root: str | os.PathLike[str], opt: DiLoCo, keep: int = 3) -> Path:
    """:func:`prepare` then :func:`write`, in one blocking call.

    Example::

        save("ckpt", opt, keep=5)
    """
    return write(root, prepare(opt), keep)


def _step_dirs(base: Path) -> list[Path]:
    if not base.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in base.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest(root: str | os.PathLike[str]) -> Path | None:
    """The newest checkpoint directory under ``root`` that has a manifest, or None.

    Example::

        path = latest("ckpt")          # ckpt/step-00000012, or None before the first save
    """
    done = [p for p in _step_dirs(Path(root)) if (p / MANIFEST_FILE).exists()]
    return done[-1] if done else None


@dataclass(frozen=True)
class Checkpoint:
    """A loaded, verified checkpoint: the model's state_dict, the training state and the manifest."""

    path: Path
    model: dict[str, torch.Tensor]
    state: TrainingState
    manifest: dict[str, Any]

    @property
    def extra(self) -> dict[str, Any]:
        extra = self.manifest.get("extra", {})
        return extra if isinstance(extra, dict) else {}


def load(path: str | os.PathLike[str]) -> Checkpoint:
    """Read and verify one checkpoint directory; :class:`CheckpointError` when it is unusable.

    Example::

        ck = load(latest("ckpt")); model.load_state_dict(ck.model)
    """
    p = Path(path)
    try:
        raw = (p / MANIFEST_FILE).read_bytes()
        if len(raw) > MAX_MANIFEST:
            raise CheckpointError(f"{p / MANIFEST_FILE} is too large")
        manifest = json.loads(raw)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise CheckpointError(f"{p} is not a {FORMAT}")
        if manifest.get("version") != VERSION:
            raise CheckpointError(f"{p} has version {manifest.get('version')!r}, this code reads {VERSION}")
        blobs: dict[str, bytes] = {}
        for name in (MODEL_FILE, OPTIMIZER_FILE):
            data = (p / name).read_bytes()
            want = manifest["files"][name]
            if len(data) != want["bytes"] or hashlib.sha256(data).hexdigest() != want["sha256"]:
                raise CheckpointError(f"{p / name} does not match the manifest (truncated or modified)")
            blobs[name] = data
        model = st_load(blobs[MODEL_FILE])
        tensors = dict(st_load(blobs[OPTIMIZER_FILE]))
        meta: dict[str, MetaValue] = manifest["meta"]
        step = manifest["outer_step"]
        if not isinstance(step, int) or not isinstance(meta, dict):
            raise CheckpointError(f"{p / MANIFEST_FILE}: bad outer_step or meta")
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {p} is unusable: {type(exc).__name__}: {exc}") from None
    return Checkpoint(p, model, TrainingState(step, tensors, meta), manifest)


def resume(opt: DiLoCo, root: str | os.PathLike[str]) -> Checkpoint | None:
    """Load the newest checkpoint under ``root`` into ``opt`` and its module; None when there is none.

    Restores the module's whole ``state_dict`` (frozen parameters and integer buffers
    included), the anchor, the outer and inner optimizers (with the saved ``param_groups``
    hyper-parameters) and the step counters; checks the state digest of the manifest.

    Example::

        ck = resume(opt, "ckpt")
        if ck is not None: scheduler.load_state_dict(ck.extra["scheduler"])
    """
    path = latest(root)
    if path is None:
        return None
    ck = load(path)
    local = {}
    for name, _ in opt.named:
        t = ck.model.get(name)
        if t is None:
            raise CheckpointError(f"{path / MODEL_FILE} has no tensor {name!r}")
        local[f"local/{name}"] = t
    state = TrainingState(ck.state.step, {**ck.state.tensors, **local}, dict(ck.state.meta))
    if state.digest().hex() != ck.manifest.get("state_digest"):
        raise CheckpointError(f"checkpoint {path} does not match its state digest")
    if opt.module is not None:
        try:
            opt.module.load_state_dict(ck.model)
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {path} does not fit the model: {exc}") from None
    opt.load_state(state)
    groups = ck.manifest.get("param_groups")
    if isinstance(groups, list) and len(groups) == len(opt.inner.param_groups):
        for group, saved in zip(opt.inner.param_groups, groups, strict=True):
            for k, v in saved.items():
                if k in group and isinstance(v, int | float) and not isinstance(v, bool):
                    group[k] = v
    return ck

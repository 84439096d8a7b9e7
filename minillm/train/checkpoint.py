"""Checkpoints: a training run's complete state, on disk, without pickle.

A run directory holds (among other things) the latest checkpoint:

    runs/my-run/
      checkpoint.json                 <- the commit record: metadata + the name of the arrays file
      checkpoints/step-000500.npz     <- every array: "model/<param name>", "optim/<index>/<name>"

``checkpoint.json`` is human-readable: the format version, the step, the model
and training configs, the random-number state (``backend.get_rng_state``), the
data position, the tokenizer (a spec and the name of its file, copied into the
run directory), the optimizer's hyper-parameters and scalar state (Adam's step
count), and the arrays file it belongs to. Arrays go to ``np.savez`` and come
back through ``np.load(allow_pickle=False)``: loading a checkpoint never runs
code.

Writing is atomic, in the order that keeps the previous checkpoint valid at
every instant:

    1. arrays  -> checkpoints/step-000500.npz.tmp, fsync, rename to .npz
    2. metadata -> checkpoint.json.tmp, fsync, rename over checkpoint.json   (the commit)
    3. delete arrays files that no metadata names any more

``os.replace`` is atomic on POSIX and Windows, so a crash (or Ctrl-C, or a full
disk) at any point leaves ``checkpoint.json`` naming a complete arrays file:
the old one before step 2, the new one after it.

Loading checks everything it can and fails with one clear sentence:
missing files, a corrupt or truncated file, a format version this code does
not read, metadata entries of the wrong type, arrays that are not floating
point or that the metadata lists (``array_names``) but the file lacks, a
model config that differs (naming the fields), arrays that are missing or
mis-shaped (the model's and optimizer's own ``load_state_dict`` errors, which
name the keys), a random-number state that cannot be restored (checked first,
before the model is touched).
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import backend
from ..checks import is_integer

FORMAT_NAME = "minillm-checkpoint"
FORMAT_VERSION = 1
METADATA_FILE = "checkpoint.json"
ARRAYS_DIR = "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit what it is loaded into."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the metadata (plain JSON values) and the arrays (NumPy)."""

    metadata: dict[str, Any]
    model_state: dict[str, np.ndarray]
    optimizer_state: dict[str, Any] | None = None
    path: Path = field(default_factory=Path)

    @property
    def step(self) -> int:
        return int(self.metadata["step"])


# ================================================================ writing


def save_checkpoint(
    run_dir: str | os.PathLike,
    *,
    model,
    step: int,
    optimizer=None,
    model_config: dict[str, Any] | None = None,
    train_config: dict[str, Any] | None = None,
    data_state: dict[str, Any] | None = None,
    tokenizer: dict[str, Any] | None = None,
    rng_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (and ``optimizer``) at ``step`` into ``run_dir``, atomically.

    ``rng_state`` defaults to ``backend.get_rng_state()`` taken now. Everything
    in the keyword dicts must be JSON-serialisable (NumPy scalars are fine).
    Returns the path of the metadata file.
    """
    run_dir = Path(run_dir)
    (run_dir / ARRAYS_DIR).mkdir(parents=True, exist_ok=True)
    arrays_name = f"{ARRAYS_DIR}/step-{int(step):06d}.npz"

    arrays = {f"model/{name}": backend.to_numpy(value) for name, value in model.state_dict().items()}
    optimizer_meta = None
    if optimizer is not None:
        optimizer_meta, optimizer_arrays = _split_optimizer_state(optimizer.state_dict())
        arrays.update(optimizer_arrays)

    metadata = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "step": int(step),
        "arrays": arrays_name,
        "model_config": model_config or {},
        "train_config": train_config or {},
        "data_state": data_state,
        "tokenizer": tokenizer,
        "rng_state": rng_state if rng_state is not None else backend.get_rng_state(),
        "optimizer": optimizer_meta,
        "extra": extra or {},
        "array_names": sorted(arrays),       # what the arrays file must hold (checked on loading)
    }
    metadata_text = json.dumps(metadata, indent=1, default=_json_default)  # fail before writing anything

    _atomic_write(run_dir / arrays_name, lambda f: np.savez(f, **arrays))           # 1. the arrays
    _atomic_write(run_dir / METADATA_FILE, lambda f: f.write(metadata_text.encode()))  # 2. the commit
    for stale in (run_dir / ARRAYS_DIR).glob("step-*.npz"):                            # 3. old arrays
        if stale.name != Path(arrays_name).name:
            stale.unlink(missing_ok=True)
    return run_dir / METADATA_FILE


def _atomic_write(path: Path, write) -> None:
    """Write ``path`` through ``path.tmp`` + fsync + ``os.replace``; no partial file is ever visible."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); silently skipped where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Optimizer.state_dict() -> (JSON part, arrays part "optim/<index>/<name>")."""
    arrays: dict[str, np.ndarray] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state_dict["state"].items():
        scalars[str(index)] = {}
        for name, value in values.items():
            if hasattr(value, "shape") and value.ndim > 0:
                arrays[f"optim/{index}/{name}"] = backend.to_numpy(value)
            else:
                scalars[str(index)][name] = value
    return {"param_groups": state_dict["param_groups"], "scalars": scalars}, arrays


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"checkpoint metadata: {type(value).__name__} is not JSON-serialisable ({value!r})")


# ================================================================ reading


def has_checkpoint(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / METADATA_FILE).is_file()


def read_metadata(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's metadata (checked: present, valid JSON, a format version this code reads)."""
    path = Path(run_dir) / METADATA_FILE
    if not path.is_file():
        if Path(run_dir).is_file():
            raise CheckpointError(f"{run_dir} is a file: give the run directory that holds it "
                                  f"(here {Path(run_dir).parent})")
        if not Path(run_dir).is_dir():
            raise CheckpointError(f"no run directory {str(run_dir)!r}")
        hint = ""
        if (Path(run_dir) / "config.json").is_file():
            hint = "; it holds a Hugging Face model (config.json): read it with minillm.weights.load_hf"
        raise CheckpointError(f"no checkpoint in {str(run_dir)!r} ({METADATA_FILE} not found){hint}")
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is corrupt (not valid JSON: {error})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a minillm checkpoint (no format {FORMAT_NAME!r})")
    if metadata.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {metadata.get('version')!r}; "
                              f"this minillm reads version {FORMAT_VERSION}")
    for key in ("step", "arrays", "model_config", "rng_state"):
        if key not in metadata:
            raise CheckpointError(f"{path} is corrupt: no {key!r} entry")
    for key, (fits, expected) in _ENTRY_TYPES.items():
        if key in metadata and not fits(metadata[key]):
            raise CheckpointError(f"{path} is corrupt: {key!r} is {metadata[key]!r}, expected {expected}")
    return metadata


def _is_list_of_str(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# metadata entry -> (test of its value, what it should be): checked on reading, so that a damaged
# checkpoint.json is one sentence rather than a TypeError from wherever the entry is first used
_ENTRY_TYPES = {
    "step": (is_integer, "an integer"),
    "arrays": (lambda v: isinstance(v, str) and bool(v), "a file name"),
    "model_config": (lambda v: isinstance(v, dict), "an object"),
    "train_config": (lambda v: isinstance(v, dict), "an object"),
    "rng_state": (lambda v: isinstance(v, dict), "an object"),
    "data_state": (lambda v: v is None or isinstance(v, dict), "an object or null"),
    "tokenizer": (lambda v: v is None or isinstance(v, dict), "an object or null"),
    "extra": (lambda v: isinstance(v, dict), "an object"),
    "optimizer": (lambda v: v is None or (isinstance(v, dict) and isinstance(v.get("param_groups"), list)
                                          and isinstance(v.get("scalars"), dict)),
                  "an object with 'param_groups' (a list) and 'scalars' (an object), or null"),
    "array_names": (_is_list_of_str, "a list of names"),
}


def load_checkpoint(run_dir: str | os.PathLike) -> Checkpoint:
    """Read the latest checkpoint of ``run_dir`` into NumPy arrays (touches no model)."""
    run_dir = Path(run_dir)
    metadata = read_metadata(run_dir)
    arrays_path = run_dir / metadata["arrays"]
    if not arrays_path.is_file():
        raise CheckpointError(f"checkpoint arrays file {arrays_path} is missing")
    try:
        with np.load(arrays_path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except ValueError:
        # NumPy's own words here advise loading the file with pickle: not advice to give about a file
        # this code did not write, so the message says what is wrong instead
        raise CheckpointError(f"checkpoint arrays file {arrays_path} is not a minillm checkpoint (not an .npz "
                              f"archive of plain arrays): corrupt, or replaced by another file") from None
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as error:
        raise CheckpointError(f"checkpoint arrays file {arrays_path} is corrupt or truncated "
                              f"({type(error).__name__}: {error})") from None
    # every array minillm saves is floating point: anything else (cast silently, or a complex one losing its
    # imaginary part) means a damaged or foreign file; and the file must hold what the metadata lists
    # (checkpoints written before "array_names" existed are not checked for it)
    for name, array in arrays.items():
        if array.dtype.kind != "f":
            raise CheckpointError(f"checkpoint arrays file {arrays_path}: {name} has dtype {array.dtype}, not "
                                  f"floating point (corrupt, or replaced by another file)")
    absent = [name for name in metadata.get("array_names", ()) if name not in arrays]
    if absent:
        raise CheckpointError(f"checkpoint arrays file {arrays_path} lacks array(s) that {METADATA_FILE} lists: "
                              f"{', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''} (corrupt, or replaced "
                              f"by another file)")
    model_state = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    optimizer_state = None
    if metadata.get("optimizer") is not None:
        optimizer_state = _join_optimizer_state(metadata["optimizer"], arrays)
    return Checkpoint(metadata, model_state, optimizer_state, run_dir / METADATA_FILE)


def _join_optimizer_state(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(values) for i, values in meta["scalars"].items()}
    for key, value in arrays.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    # JSON has no tuples: give hyper-parameters like betas back their tuple form
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
              for group in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable ``field: saved X, given Y`` for every field that differs.

    A field the checkpoint does not have is one added to the config after it was
    written: its run used that field's default, so it is not compared.
    """
    out = []
    for key in sorted(set(saved) | set(current)):
        if key not in saved and key in current:
            continue
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if _normalise(a) != _normalise(b):
            out.append(f"{key}: checkpoint has {a!r}, given {b!r}")
    return out


def _normalise(value):
    # JSON turns tuples into lists; compare through the same lens
    return json.loads(json.dumps(value, default=_json_default))


def restore_checkpoint(
    checkpoint: Checkpoint,
    model,
    optimizer=None,
    model_config: dict[str, Any] | None = None,
    restore_rng: bool = True,
) -> None:
    """Copy a loaded checkpoint into ``model`` / ``optimizer`` and the random streams.

    With ``model_config`` given, it must equal the saved one; otherwise a
    CheckpointError names each differing field. Shape and key mismatches raise
    from ``load_state_dict`` (wrapped in a CheckpointError with the path).
    """
    where = checkpoint.path
    if model_config is not None:
        differences = config_differences(checkpoint.metadata.get("model_config", {}), model_config)
        if differences:
            raise CheckpointError(f"{where}: the checkpoint's model config differs from this model's: "
                                  + "; ".join(differences))
    if optimizer is not None and checkpoint.optimizer_state is None:
        raise CheckpointError(f"{where} holds no optimizer state")
    if restore_rng:        # first, so that a damaged state is refused before the model is touched
        previous = backend.get_rng_state()
        try:
            backend.set_rng_state(checkpoint.metadata["rng_state"])
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            backend.set_rng_state(previous)
            raise CheckpointError(f"{where}: the saved random-number state is corrupt "
                                  f"({type(error).__name__}: {error})") from None
    try:
        try:
            model.load_state_dict(checkpoint.model_state)
        except (RuntimeError, ValueError) as error:
            raise CheckpointError(f"{where}: the saved model does not fit: {error}") from None
        if optimizer is not None:
            try:
                optimizer.load_state_dict(checkpoint.optimizer_state)
            except (RuntimeError, ValueError, KeyError) as error:
                raise CheckpointError(f"{where}: the saved optimizer state does not fit: {error}") from None
    except CheckpointError:
        if restore_rng:
            backend.set_rng_state(previous)          # a failed restore leaves the random streams as they were
        raise

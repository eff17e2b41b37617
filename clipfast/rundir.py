"""Run directories: files written atomically, and the settings a run's results depend on.

Every long clipfast job (a scan's shards, a training run, the defence pipeline, a cached world
model) writes into a directory and resumes from what it finds there. Resuming is only correct when
the settings that change results are the same, so each config dataclass marks the fields that do
not (speed, progress, logging) with `untied()` where it declares them; `tied_settings(config)` is
then the one definition of "the same run", used for scan-shard fingerprints, run-directory
settings, training resumes and cache keys alike.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path
from typing import IO, Any, Callable

from clipfast.errors import RunMismatchError

_TIED = "clipfast_tied"


def untied(default: Any = dataclasses.MISSING, **kwargs) -> Any:
    """A config field that never changes results (speed, progress, logging, op backend): runs that
    differ only in such fields resume from each other and share caches."""
    return dataclasses.field(default=default, metadata={_TIED: False}, **kwargs)


def tied_settings(config: Any) -> Any:
    """The fields of a (nested) config dataclass that change results, as JSON values."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: tied_settings(getattr(config, f.name)) for f in dataclasses.fields(config)
                if f.metadata.get(_TIED, True)}
    return json.loads(json.dumps(config, default=str))  # tuples as lists, like a file read back


def untied_fields(config_class: type) -> tuple[str, ...]:
    """Names of the fields of a config class that never change results."""
    return tuple(f.name for f in dataclasses.fields(config_class) if not f.metadata.get(_TIED, True))


def differences(recorded: dict, current: dict, prefix: str = "") -> list[str]:
    """'name: recorded -> current' for every setting where two tied_settings() dicts differ
    (dotted names inside nested configs)."""
    changed = []
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}: {_short(a)} -> {_short(b)}")
    return changed


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_same_run(recorded: dict, current: dict, where: str) -> None:
    """RunMismatchError naming the differing settings unless the two tied_settings() agree."""
    changed = differences(recorded, current)
    if changed:
        raise RunMismatchError(f"{where} holds a run with different settings (differences in: {'; '.join(changed)}); "
                               "use a new output directory")


def write_atomically(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file via a temporary sibling + fsync + os.replace: readers (and a resumed run after a
    crash) see the old file or the new one, never part of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # open(..., "xb") rather than mkstemp: the file gets the umask's permissions, not 0600
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp_path, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def save_json(obj: Any, path: str | os.PathLike) -> None:
    write_atomically(path, lambda file: file.write((json.dumps(obj, indent=2) + "\n").encode()))


def remove_leftovers(directory: Path) -> None:
    """Delete the temporary files of writes a killed run left behind in `directory`."""
    for leftover in Path(directory).rglob(".*.tmp"):
        leftover.unlink(missing_ok=True)

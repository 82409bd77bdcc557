"""Released definition versions, fingerprinted in committed lock files.

A saga advances on the version it started with, so a released version must never change: its
steps' fingerprint is recorded in a lock file (JSON: ``{name: {version: fingerprint}}``), and a
process whose registry holds a version whose steps differ from the lock refuses to start. A new
version is added to its lock file by ``sagactl definitions --lock``, which never rewrites one that
is there already.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.registry import Registered, Registry


class DefinitionChanged(RuntimeError):
    """A released definition version's steps differ from its lock file, or it is not locked."""


def read_lock(path: Path) -> dict[str, dict[str, str]]:
    if not path.exists():
        return {}
    data: dict[str, dict[str, str]] = json.loads(path.read_text())
    return data


def problems(registry: Registry) -> list[str]:
    """Every registered version that is not in its lock file, or differs from it."""
    found = []
    for reg in sorted(registry.definitions.values(), key=lambda r: r.definition.key):
        locked = read_lock(reg.lock_file).get(reg.name, {}).get(str(reg.version))
        actual = reg.definition.fingerprint()
        if locked is None:
            found.append(
                f"definition {reg.name} v{reg.version} is not in {reg.lock_file.name}: "
                "run `sagactl definitions --lock` and commit the file"
            )
        elif locked != actual:
            found.append(
                f"definition {reg.name} v{reg.version} changed (fingerprint {actual[:12]}, "
                f"{reg.lock_file.name} says {locked[:12]}): a released version must not "
                f"change; register the new steps as {reg.name} v{reg.version + 1}"
            )
    return found


def check(registry: Registry) -> None:
    found = problems(registry)
    if found:
        raise DefinitionChanged("; ".join(found))


def lock_new(registered: Iterable[Registered]) -> list[str]:
    """Add the versions missing from their lock files; never touch a recorded one."""
    added = []
    by_file: dict[Path, list[Registered]] = {}
    for reg in registered:
        by_file.setdefault(reg.lock_file, []).append(reg)
    for path, regs in by_file.items():
        data = read_lock(path)
        for reg in regs:
            versions = data.setdefault(reg.name, {})
            if str(reg.version) not in versions:
                versions[str(reg.version)] = reg.definition.fingerprint()
                added.append(f"{reg.name} v{reg.version}")
        ordered = {
            n: dict(sorted(v.items(), key=lambda kv: int(kv[0]))) for n, v in sorted(data.items())
        }
        path.write_text(json.dumps(ordered, indent=2) + "\n")
    return added

"""Run identity: what decides whether a stored checkpoint, state file or store belongs to the run asked for.

Both sides go through the same JSON form (tuples become lists, keys become strings) before they are compared,
so that what is in memory equals what was stored. One function for every stage and the sweep.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import ConfigError


def as_stored(obj: Any) -> Any:
    """`obj` as it reads back from JSON."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def optional(**fields: Any) -> dict[str, Any]:
    """The fields that are set (not None), as stored. Fields added to an identity after runs were made enter it
    only when set, so that those runs keep their identity."""
    return as_stored({k: v for k, v in fields.items() if v is not None})


def run_differences(stored: Any, wanted: Any, prefix: str = "") -> list[str]:
    """The (dotted) fields that differ between two run identities, after JSON normalisation; [] if the same."""
    a, b = as_stored(stored), as_stored(wanted)
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [prefix.rstrip(".") or "identity"]
    out: list[str] = []
    for key in sorted(set(a) | set(b)):
        out += run_differences(a.get(key), b.get(key), f"{prefix}{key}.")
    return out


def check_same_run(what: str, stored: Any, wanted: Any, hint: str) -> None:
    """ConfigError naming the differing fields when `stored` is not the run `wanted`; `hint` says what to do."""
    changed = run_differences(stored, wanted)
    if changed:
        raise ConfigError(f"{what} was made with other settings ({', '.join(changed)}); {hint}")

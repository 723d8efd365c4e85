"""Test hook: SIGKILL an engine in the middle of a chosen weight sync (the chaos test's "one kill during a sync").

A sync of a small model lasts milliseconds, too short to hit from outside the trainer, so the kill is placed inside
it: with ``OAPL_FAULT_KILL_DURING_SYNC="<version>:<engine id>"`` in the trainer's environment, the sync to policy
version ``<version>`` SIGKILLs local engine ``<engine id>`` (or another member of that sync if it is down; its whole
process group) after every engine was sent
the metadata and started receiving, before the broadcast (the same point as tests/test_engine.py's kill). Once per
process. Unset in production: :func:`sync_hooks` then returns None.
"""

from __future__ import annotations

import os
import signal
import sys

from oapl_megatron.weight_sync.sync import SyncHooks

ENV = "OAPL_FAULT_KILL_DURING_SYNC"
_fired = False


def sync_hooks(version: int) -> SyncHooks | None:
    spec = os.environ.get(ENV)
    if not spec or _fired:
        return None
    try:
        at_version, engine_id = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"{ENV}={spec!r}: expected '<version>:<engine id>'") from None
    if version != at_version:
        return None

    def kill(targets) -> None:
        global _fired
        if _fired:
            return
        _fired = True
        local = [t for t in targets if getattr(t, "proc", None) is not None]
        if not local:
            return
        # the chosen engine, or another one if it is down right now (the kill must land in this sync)
        t = next((t for t in local if t.engine_id == engine_id), local[0])
        print(f"[fault injection] SIGKILL {t.describe()} during the weight sync to version {version}",
              file=sys.stderr, flush=True)
        os.killpg(t.proc.pid, signal.SIGKILL)
        t.proc.wait(10)

    return SyncHooks(after_meta=kill)

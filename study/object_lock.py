"""One sweep at a time in a results folder on an object store, which has no file locks: a lease
object that names its holder and is refreshed while the sweep runs.

A lock refreshed within ``STALE_S`` seconds is a live sweep's, and another sweep refuses to
start; an older one, or one whose process on this host is gone, was left by a sweep that died
and is taken over. Two sweeps that start within the same second may both write the object; the
one that reads back another's name refuses. This is a guard against the usual mistake (a second
command in the same folder), not a consensus protocol.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator

from common.cli import UsageError
from study import storage
from study.storage import Location

#: Seconds between refreshes of a held lock.
REFRESH_S = 20
#: A lock not refreshed for this long is a dead sweep's (three missed refreshes and some).
STALE_S = 90


def _alive_here(holder: dict) -> bool:
    """Whether the holder's process runs (only knowable for a holder on this host)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError):
        return True
    return True


def _read(where: Location) -> dict | None:
    try:
        return json.loads(storage.read_bytes(where))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: treated as stale


@contextlib.contextmanager
def object_lock(where: Location) -> Iterator[None]:
    """Hold the lease object ``where`` while the block runs; UsageError if a live sweep holds it."""
    me = dict(host=socket.gethostname(), pid=os.getpid(), since=time.time())
    folder = str(where).rsplit("/", 1)[0]
    held = _read(where)
    if held:
        age = time.time() - float(held.get("beat", 0))
        if age < STALE_S and _alive_here(held):
            raise UsageError(
                f"another sweep (pid {held.get('pid')} on {held.get('host')}) is running in "
                f"{folder}: its lock {where} was refreshed {max(age, 0):.0f} s ago. Let it finish, "
                f"or stop it and continue with --resume (a lock not refreshed for {STALE_S} s is "
                "taken over)")
        print(f"note: taking over the lock {where} of a sweep that is gone (pid "
              f"{held.get('pid')} on {held.get('host')})", file=sys.stderr)

    def write() -> None:
        storage.write_bytes(where, json.dumps(me | dict(beat=time.time())).encode())

    write()
    now = _read(where) or {}
    if (now.get("host"), now.get("pid")) != (me["host"], me["pid"]):
        raise UsageError(f"another sweep (pid {now.get('pid')} on {now.get('host')}) took the lock "
                         f"{where} at the same moment; let it run, or stop it and continue with "
                         "--resume")
    stop = threading.Event()

    def refresh() -> None:
        while not stop.wait(REFRESH_S):
            with contextlib.suppress(OSError):  # a missed refresh is retried; three make it stale
                write()

    beat = threading.Thread(target=refresh, name="sweep-lock", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        with contextlib.suppress(OSError):
            if (_read(where) or {}).get("pid") == me["pid"]:
                storage.delete(where)

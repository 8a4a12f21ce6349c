"""Leader election on an etcd lease (issue 12, docs/cluster.md).

The leader key ``{prefix}/leader`` is put only while absent (txn: create_revision == 0),
attached to this replica's lease. Whoever puts it leads; its ``create_revision`` is the
leadership **term**, strictly increasing over leaders, and the log writes of the leader are
fenced on it (:meth:`Election.fence`), so a deposed leader's write can never land.

* The lease is kept alive every ``lease_ttl / 3``. A follower watches the leader key and
  campaigns as soon as it is deleted (lease expired or revoked, e.g. by a clean ``stop()``).
* A leader stops leading by its OWN clock when no keepalive succeeded for ``lease_ttl``
  (counted from when the last successful keepalive was sent, which is before etcd
  refreshed the lease, so this is never later than etcd's expiry), even when etcd cannot be
  reached: ``role`` becomes follower and :attr:`Election.lost` is set. It also steps down
  when it sees its key deleted or replaced, or a keepalive report the lease expired.
* After stepping down the replica is an ordinary follower again: new lease, and no campaign
  for ``lease_ttl`` (the one that lost it is likely the unhealthy one). The server re-execs
  itself on ``lost`` to reload its core from the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Final, Literal

import orjson

from nexus_fast.cluster.etcd import (
    EtcdClient,
    EtcdError,
    KeyValue,
    cmp_create_revision,
    op_put,
    op_range,
)
from nexus_fast.logs import get_logger
from nexus_fast.store.base import StoreError

log = get_logger("cluster.election")

Role = Literal["leader", "follower", "candidate"]

_BACKOFF_MIN = 0.05


class NotLeader(StoreError):
    """This replica does not lead (or no longer does); the message names the leader.

    A :class:`~nexus_fast.store.base.StoreError` (so an ``Unavailable``): the replicated
    store refuses a write with it, and every caller that handles a refused write handles
    this one the same way."""

    def __init__(
        self,
        leader_name: str | None = None,
        leader_advertise: str | None = None,
        *,
        message: str = "",
    ) -> None:
        if message:
            msg = message
        elif leader_name:
            msg = f"not the leader; the leader is {leader_name} at {leader_advertise or '?'}"
        else:
            msg = "not the leader; no leader is elected yet"
        super().__init__(msg)
        self.leader_name = leader_name
        self.leader_advertise = leader_advertise


def leader_key(prefix: bytes) -> bytes:
    """The election key under the cluster prefix."""
    return prefix + b"/leader"


async def cancel_and_wait(task: asyncio.Future[Any], poll: float = 0.1) -> None:
    """Cancel ``task`` and wait for its end, cancelling again while it runs on.

    One ``cancel()`` is not always enough: on Python 3.11 ``asyncio.wait_for`` (used inside
    the etcd watch) swallows a cancellation that races with the inner future's completion.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=poll)
    if not task.cancelled():
        task.exception()  # retrieved: no "exception was never retrieved" warning


async def _aclose(it: AsyncIterator[Any]) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


_KEEPALIVE_SLOW: Final = 0.5
"""Seconds a lease keepalive may wait before etcd is named as slow (one takes milliseconds
on a healthy cluster; without quorum it waits the client's whole timeout)."""


class Election:
    """One replica's part in the election; see the module docstring.

    ``info`` adds fields to the leader key's JSON value (``name``, ``advertise``, ``pid``
    are always there). ``on_change`` is called on the loop after any change of ``role``,
    ``term`` or the known leader.
    """

    def __init__(
        self,
        client: EtcdClient,
        prefix: bytes,
        name: str,
        advertise: str,
        lease_ttl: float,
        *,
        info: Callable[[], dict[str, object]] | None = None,
    ) -> None:
        if lease_ttl <= 0:
            raise ValueError("lease_ttl must be > 0")
        self.client = client
        self.prefix = prefix
        self.key = leader_key(prefix)
        self.name = name
        self.advertise = advertise
        self.lease_ttl = lease_ttl
        self._info = info

        self.role: Role = "candidate"
        self.term = 0
        self.leader_name: str | None = None
        self.leader_advertise: str | None = None
        self.leader_term = 0
        self.on_change: Callable[[], None] | None = None
        self.can_lead: Callable[[], bool] | None = None
        """Asked before each campaign (None: always); the replicated store sets it so a
        replica whose store cannot follow the log (needs a snapshot) never runs."""
        self.lost = asyncio.Event()
        self.lease_id = 0
        """The lease this replica holds now (0: none yet); the replica status key uses it."""

        self._lease_deadline = 0.0  # monotonic: the lease surely lives until then
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._demoted = asyncio.Event()  # wakes the leader's watch on any step-down
        self._changed = asyncio.Event()  # pulses on every change (wait_leader)
        self._last_seen: tuple[object, ...] = ()
        self._run_task: asyncio.Task[None] | None = None
        self._keepalive_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._cooldown_until = 0.0  # no campaign before then (set on stepping down)
        self.transitions = 0  # times this replica became leader (stat, tests)
        self.last_error: str | None = None
        """Why this replica's last talk with etcd (campaign, watch, lease keepalive) failed;
        None once one succeeds again. Lets a replica without a leader say it is etcd."""
        self._asking_since: float | None = None  # monotonic: a campaign awaits etcd since
        self._keepalive_since: float | None = None  # monotonic: a keepalive awaits etcd since

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start campaigning and keeping the lease alive (returns at once)."""
        if self._run_task is not None:
            return
        self._stopping = False
        self._run_task = asyncio.create_task(self._run(), name=f"election:{self.name}")
        self._keepalive_task = asyncio.create_task(
            self._keepalive_loop(), name=f"election-keepalive:{self.name}"
        )

    async def stop(self) -> None:
        """Stop; a leader steps down and the lease is revoked so another takes over at once."""
        self._stopping = True
        tasks = [t for t in (self._run_task, self._keepalive_task) if t is not None]
        self._run_task = self._keepalive_task = None
        for task in tasks:
            await cancel_and_wait(task)
        lease = self.lease_id
        self._step_down("stopping", revoke=False)
        self.lease_id = 0
        if lease:
            try:
                await self.client.lease_revoke(lease)
            except EtcdError as exc:
                log.warning(
                    "could not revoke lease %x on stop (it expires by itself): %s", lease, exc
                )

    # ------------------------------------------------------------------ queries

    def fence(self) -> Any:
        """The txn compare that only succeeds while this replica's term leads."""
        return cmp_create_revision(self.key, "==", self.term)

    def leading(self) -> bool:
        """Leader now, and the lease cannot have expired by this replica's own clock."""
        if self.role != "leader":
            return False
        if time.monotonic() >= self._lease_deadline:
            self._step_down("lease expired by this replica's clock (no keepalive for lease_ttl)")
            return False
        return True

    def not_leader(self) -> NotLeader:
        """The error for a write refused here, naming the leader when one is known."""
        if self.role == "leader":
            return NotLeader(
                self.name,
                self.advertise,
                message="this replica was just elected and is still catching up with the log",
            )
        if self.leader_name == self.name or not self.leader_name:
            # No leader really (or its own old key, not yet expired): say why when etcd is.
            cause = self.etcd_cause()
            return (
                NotLeader(message=f"not the leader; no leader elected: {cause}")
                if cause
                else NotLeader()
            )
        return NotLeader(self.leader_name, self.leader_advertise)

    def resign(self, reason: str) -> None:
        """Stop leading now (no await) and revoke the lease so another replica takes over;
        the store calls it when the fence refuses a write or a committed entry cannot be
        applied locally."""
        self._step_down(reason)

    async def wait_leader(self, timeout: float) -> str:
        """The leader's advertise address, waiting up to ``timeout`` s for an election."""
        deadline = time.monotonic() + timeout
        while self.leader_advertise is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NotLeader()
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):  # not wait_for: it can swallow a cancel()
                    await self._changed.wait()
        return self.leader_advertise

    def etcd_cause(self) -> str | None:
        """Why no leader may be known or reached, when etcd is why: its last failure, the
        campaign still awaiting its answer, or a lease keepalive unanswered for longer than
        etcd takes when it has quorum; None when etcd answers."""
        if self.last_error is not None:
            return self.last_error
        now = time.monotonic()
        since = self._asking_since
        if since is not None:
            return f"waiting for etcd to answer the campaign ({now - since:.1f}s)"
        since = self._keepalive_since
        if since is not None and now - since > _KEEPALIVE_SLOW:
            return f"etcd has not answered the lease keepalive for {now - since:.1f}s"
        return None

    def stat(self) -> dict[str, Any]:
        """Figures for ``/health/detailed``."""
        return {
            "name": self.name,
            "role": self.role,
            "term": self.term,
            "leader_name": self.leader_name,
            "leader_advertise": self.leader_advertise,
            "leader_term": self.leader_term,
            "lease_ttl": self.lease_ttl,
            "lease_id": self.lease_id,
            "transitions": self.transitions,
        }

    # ------------------------------------------------------------------ state changes

    def _notify(self) -> None:
        seen = (self.role, self.term, self.leader_name, self.leader_advertise, self.leader_term)
        if seen == self._last_seen:
            return
        self._last_seen = seen
        self._changed.set()
        hook = self.on_change
        if hook is not None:
            try:
                hook()
            except Exception:
                log.exception("election on_change hook failed")

    def _set_leader_info(self, kv: KeyValue | None) -> None:
        if kv is None:
            self.leader_name = self.leader_advertise = None
            self.leader_term = 0
        else:
            try:
                value = orjson.loads(kv.value)
                name, advertise = str(value["name"]), str(value["advertise"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                name, advertise = "?", "?"
            self.leader_name, self.leader_advertise = name, advertise
            self.leader_term = kv.create_revision

    def _become_leader(self, kv: KeyValue) -> None:
        self.role = "leader"
        self.term = kv.create_revision
        self.transitions += 1
        self._demoted.clear()
        self.lost.clear()
        self._set_leader_info(kv)
        log.info("%s leads (term %d)", self.name, self.term)
        self._extend_deadline(self._lease_deadline)  # arms the clock's step-down
        self._notify()

    def _step_down(self, reason: str, *, revoke: bool = True) -> None:
        """Stop leading at once (no await): role follower, ``lost`` set, lease dropped."""
        if self.role != "leader":
            return
        log.warning("%s stops leading (term %d): %s", self.name, self.term, reason)
        self.role = "candidate"
        self.term = 0
        if self.leader_name == self.name:
            self._set_leader_info(None)
        lease, self.lease_id = self.lease_id, 0  # the next campaign takes a fresh lease
        self._cooldown_until = time.monotonic() + self.lease_ttl
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        self._demoted.set()
        self.lost.set()
        if revoke and lease and not self._stopping:
            # Best effort: if etcd still holds the lease, its key goes at once.
            asyncio.get_running_loop().create_task(self._revoke_quietly(lease))
        self._notify()

    async def _revoke_quietly(self, lease: int) -> None:
        try:
            await self.client.lease_revoke(lease)
        except EtcdError:
            pass  # unreachable etcd: the lease expires by itself

    def _extend_deadline(self, deadline: float) -> None:
        self._lease_deadline = deadline
        if self.role != "leader":
            return
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        loop = asyncio.get_running_loop()
        delay = deadline - time.monotonic()
        self._deadline_timer = loop.call_later(max(delay, 0.0), self._on_deadline)

    def _on_deadline(self) -> None:
        self._deadline_timer = None
        if self.role == "leader" and time.monotonic() >= self._lease_deadline:
            self._step_down("no keepalive succeeded for lease_ttl (by this replica's clock)")

    # ------------------------------------------------------------------ tasks

    async def _grant(self) -> None:
        sent = time.monotonic()
        self.lease_id = await self.client.lease_grant(self.lease_ttl)
        self._lease_deadline = sent + self.lease_ttl

    async def _keepalive_loop(self) -> None:
        interval = self.lease_ttl / 3
        while True:
            lease = self.lease_id
            started = time.monotonic()
            if lease:
                self._keepalive_since = started
                try:
                    remaining = await self.client.lease_keepalive(lease)
                except EtcdError as exc:
                    log.debug("lease keepalive failed: %s", exc)
                    self._keepalive_since = None
                    self.last_error = str(exc)
                except Exception:  # the clock steps a leader down if this persists
                    self._keepalive_since = None
                    log.exception("lease keepalive failed")
                else:
                    self._keepalive_since = None
                    self.last_error = None
                    if lease == self.lease_id:
                        if remaining > 0:
                            self._extend_deadline(started + min(self.lease_ttl, remaining))
                        else:
                            self._step_down("etcd reports the lease expired")
                            if lease == self.lease_id:
                                self.lease_id = 0  # follower: campaign grants a new one
            await asyncio.sleep(max(interval - (time.monotonic() - started), 0.0))

    def _leader_value(self) -> bytes:
        value: dict[str, object] = {}
        if self._info is not None:
            value.update(self._info())
        value.update(name=self.name, advertise=self.advertise, pid=os.getpid())
        return orjson.dumps(value)

    async def _campaign(self) -> tuple[bool, KeyValue | None, int]:
        """One attempt: ``(won, the leader key, header revision)``."""
        if not self.lease_id:
            await self._grant()
        lease = self.lease_id
        res = await self.client.txn(
            [cmp_create_revision(self.key, "==", 0)],
            [op_put(self.key, self._leader_value(), lease=lease), op_range(self.key)],
            [op_range(self.key)],
        )
        kvs = res.ranges[-1] if res.ranges else []
        kv = kvs[0] if kvs else None
        # A retried campaign whose first attempt landed finds its own lease on the key.
        won = kv is not None and (res.succeeded or kv.lease == lease)
        return won, kv, res.revision

    async def _run(self) -> None:
        backoff = _BACKOFF_MIN
        while not self._stopping:
            try:
                eligible = self.can_lead is None or self.can_lead()
                self._asking_since = time.monotonic()
                if not eligible or time.monotonic() < self._cooldown_until:
                    # Just stepped down (likely the unhealthy one), or unable to lead (a
                    # store that needs a snapshot): follow, let the others run.
                    kvs, rev = await self.client.range(self.key)
                    self._asking_since = None
                    won, kv = False, (kvs[0] if kvs else None)
                    if kv is None:
                        wait = self._cooldown_until - time.monotonic()
                        await asyncio.sleep(wait if eligible else self.lease_ttl)
                        continue
                else:
                    won, kv, rev = await self._campaign()
                self._asking_since = None
                self.last_error = None
                if won and kv is not None:
                    self._become_leader(kv)
                    if self.leading():  # a campaign slower than the lease steps down here
                        await self._hold(rev)
                else:
                    self.role = "follower" if kv is not None else "candidate"
                    self._set_leader_info(kv)
                    self._notify()
                    await self._watch_until_free(rev)
                backoff = _BACKOFF_MIN
            except EtcdError as exc:
                log.warning("election: %s", exc)
                self._asking_since = None
                self.last_error = str(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.lease_ttl / 2)
            except Exception:  # a bug must not end the campaign silently
                self._asking_since = None
                log.exception("election loop failed; retrying")
                await asyncio.sleep(self.lease_ttl / 2)

    async def _watch_until_free(self, rev: int) -> None:
        """Follower: follow the leader key from ``rev + 1`` until it is deleted."""
        it = self.client.watch(self.key, start_revision=rev + 1)
        try:
            async for _, events in it:
                for ev in events:
                    if ev.kind == "delete":
                        self._set_leader_info(None)
                        self.role = "candidate"
                        self._notify()
                        return
                    self._set_leader_info(ev.kv)
                    self.role = "follower"
                    self._notify()
        finally:
            await _aclose(it)

    async def _hold(self, rev: int) -> None:
        """Leader: return once it stepped down (clock, keepalive, or its key gone/replaced)."""
        demoted = asyncio.ensure_future(self._demoted.wait())
        try:
            while self.role == "leader":
                watch = asyncio.ensure_future(self._watch_own_key(rev))
                try:
                    await asyncio.wait({watch, demoted}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    await cancel_and_wait(watch)
                if self.role != "leader":
                    return
                exc = watch.exception() if watch.done() and not watch.cancelled() else None
                if exc is not None:
                    log.warning("election: watching the leader key: %s", exc)
                await asyncio.sleep(_BACKOFF_MIN)
                # Watch broke (etcd trouble): look again, keep leading while the key is ours.
                try:
                    kvs, rev = await self.client.range(self.key)
                except EtcdError as exc_range:
                    self.last_error = str(exc_range)
                    continue  # the clock steps down if this lasts lease_ttl
                if not kvs or kvs[0].create_revision != self.term:
                    self._step_down("the leader key is gone or replaced")
        finally:
            demoted.cancel()

    async def _watch_own_key(self, rev: int) -> None:
        it = self.client.watch(self.key, start_revision=rev + 1)
        try:
            async for _, events in it:
                for ev in events:
                    if ev.kind == "delete" or ev.kv.create_revision != self.term:
                        self._step_down("the leader key was deleted or replaced")
                        return
        finally:
            await _aclose(it)

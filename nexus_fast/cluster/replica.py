"""One replica of a cluster-mode server: etcd client, election, replicated store, routing.

The server (``nexus_fast/server.py``) builds a :class:`ClusterReplica` when
``[cluster] enabled = true`` and hands it the LmdbStore; everything cluster-specific that
the server does goes through this class, so the embedded default has none of it:

* start: connect to etcd, open the :class:`ReplicatedStore` (local LMDB + the log tailer),
  load the EventBus (subscribers work on every replica), serve, then campaign;
* promotion: when this replica wins the election, ``ReplicatedStore.become_leader`` catches
  up with the log, then the server loads its core from LMDB exactly as after a restart
  (``promote`` callback) and this replica answers everything itself;
* demotion: on ``election.lost`` (lease gone, keepalive failed for lease_ttl, a fenced
  commit refused) one log line, the store is closed and the process re-execs itself, so it
  comes back as a clean follower (the core's memory cannot be trusted any more);
* status: every replica publishes ``{prefix}/replicas/{name}`` with its lease and answers
  ``GetClusterStatus`` and ``/health/detailed``'s ``cluster`` section.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, Final

from nexus_fast import errors
from nexus_fast.cluster.election import Election
from nexus_fast.cluster.etcd import EndpointStatus, EtcdClient, EtcdError
from nexus_fast.cluster.forward import LeaderChannel, LeaderRouter
from nexus_fast.cluster.snapshot import SnapshotBootstrap, SnapshotServicer, add_snapshot_service
from nexus_fast.config import Config
from nexus_fast.logs import get_logger
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.store.lmdb_store import LmdbStore
from nexus_fast.store.replicated import ReplicatedStore

__all__ = ["ClusterReplica"]

log = get_logger("cluster")

# How often a replica republishes its status key (its lease keeps it alive in between).
STATUS_INTERVAL: Final = 1.0
_STATUS_TIMEOUT: Final = 1.0
PROMOTION_TIMEOUT: Final = 60.0  # catching up with the log when elected, at most
# The leader deletes log entries every live replica applied, keeping this many more so a
# replica that restarts (and is briefly not live) finds its next entry still there. A
# replica behind by more bootstraps from a snapshot (nexus_fast/cluster/snapshot.py).
COMPACT_KEEP: Final = 10_000
COMPACT_INTERVAL: Final = 60.0  # etcd status / range for GetClusterStatus


class ClusterReplica:
    """Everything cluster mode adds to one server process (see the module docstring)."""

    def __init__(self, config: Config, local: LmdbStore) -> None:
        cl = config.cluster
        self.config = config
        self.name = cl.resolved_name()
        self.advertise = cl.resolved_advertise(config.server.host, config.server.grpc_port)
        self.prefix = cl.prefix
        self.client = EtcdClient(
            list(cl.etcd_endpoints),
            timeout=cl.etcd_timeout,
            ca_file=cl.etcd_ca_file or None,
            cert_file=cl.etcd_cert_file or None,
            key_file=cl.etcd_key_file or None,
        )
        self.election = Election(self.client, self.prefix, self.name, self.advertise, cl.lease_ttl)
        self.store = ReplicatedStore(
            local, self.client, self.election, self.prefix, max_entry_bytes=cl.max_entry_bytes
        )
        self.channel = LeaderChannel(config, self._leader_target, self.election.etcd_cause)
        self.router = LeaderRouter(
            self.channel, self.serving_core, auth_on=config.security.auth_required
        )
        # Snapshot bootstrap (nexus_fast/cluster/snapshot.py): serve copies of this store;
        # install one when the log cannot bring this replica up to date.
        data_dir = Path(config.database.path)
        self.snapshots = SnapshotServicer(self.store, data_dir, config.server.max_message_size)
        self.bootstrap = SnapshotBootstrap(config, self.store, data_dir, self._reexec)
        self.core_loaded = False  # set by the server once its core is loaded (leader only)
        self.listen: dict[str, str] = {}  # grpc / http / ws addresses, for the status key
        self.on_change: Callable[[], None] | None = None  # the server's readiness refresh
        self._promote: Callable[[], Awaitable[None]] | None = None
        self._demote: Callable[[], Awaitable[None]] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._led_term = 0  # the term this replica led, for the demotion's log line
        self._replicas: list[dict[str, Any]] = []
        self._etcd: list[EndpointStatus] = []

    def add_services(self, server: Any) -> None:
        """Register what only cluster mode serves on the gRPC server (FetchSnapshot)."""
        add_snapshot_service(self.snapshots, server)

    # ------------------------------------------------------------ lifecycle

    async def connect(self) -> None:
        """Reach etcd (raises EtcdError naming it when no endpoint answers)."""
        await self.client.connect()

    async def start(
        self,
        promote: Callable[[], Awaitable[None]],
        demote: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Campaign (after the listeners are up); ``promote`` loads the core once leading,
        ``demote`` stops its timers and writes when the leadership is lost (before the
        store closes, so nothing writes into a closing store)."""
        self._promote = promote
        self._demote = demote
        self.election.on_change = self._changed
        await self.election.start()
        self._spawn(self._publish_status(), "cluster-status")
        self._spawn(self._watch_lost(), "cluster-demotion")
        self._spawn(self.bootstrap.run(), "cluster-bootstrap")

    def quiesce(self) -> None:
        """The server is stopping: losing the lease from now on re-execs nothing."""
        self._stopping = True

    async def stop(self) -> None:
        """Stop campaigning and revoke the lease: a leader hands over at once."""
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self.client.delete(self.prefix + b"/replicas/" + self.name.encode())
        await self.election.stop()
        await self.channel.close()
        await self.client.close()

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------ roles

    def serving_core(self) -> bool:
        """This replica leads and its core is loaded: it answers every call itself."""
        return self.core_loaded and self.election.role == "leader"

    def ready(self) -> bool:
        """Leader with its core loaded, or a follower that knows the leader and follows
        the log (not stuck: ``needs_snapshot`` or ``broken`` is not ready)."""
        if self.election.role == "leader":
            return self.core_loaded
        return bool(self.election.leader_advertise) and self.store.state == "follower"

    def require_core(self) -> None:
        """Raise LeaderElsewhere (503 / UNAVAILABLE naming the leader) unless serving_core."""
        if self.serving_core():
            return
        target, leading = self._leader_target()
        if leading:
            raise errors.LeaderElsewhere("this replica is the leader and still catching up")
        if not target:
            raise errors.LeaderElsewhere("no leader elected yet")
        raise errors.LeaderElsewhere(
            f"not the leader; the leader is {self.election.leader_name} at {target}", target
        )

    def _leader_target(self) -> tuple[str | None, bool]:
        return self.election.leader_advertise, self.election.role == "leader"

    def _changed(self) -> None:
        election = self.election
        log.info(
            "cluster role",
            extra={
                "role": election.role,
                "leader": election.leader_name,
                "term": election.leader_term,
            },
        )
        if election.role == "leader":
            self._led_term = election.term
        if election.role == "leader" and not self.core_loaded and self._promote is not None:
            promote, self._promote = self._promote, None  # at most once per process
            self._spawn(self._take_over(promote), "cluster-promotion")
        if self.on_change is not None:
            self.on_change()

    async def _take_over(self, promote: Callable[[], Awaitable[None]]) -> None:
        started = time.monotonic()
        try:
            # Catch up with the log, then accept commits; bounded, so a stuck catch-up
            # ends in a re-exec instead of a leader that never serves.
            await asyncio.wait_for(self.store.become_leader(), PROMOTION_TIMEOUT)
            await promote()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # lost the lease meanwhile, or the core did not load
            if self._stopping:
                return
            log.error("promotion failed; restarting as a follower: %r", exc)
            await self._reexec()
            return
        self.core_loaded = True
        log.info(
            "leading",
            extra={
                "term": self.election.term,
                "applied_seq": self.store.applied_seq,
                "seconds": round(time.monotonic() - started, 3),
            },
        )
        if self.on_change is not None:
            self.on_change()

    async def _watch_lost(self) -> None:
        await self.election.lost.wait()
        if self._stopping:
            return
        # The election logged why (one WARNING); this says what happens next.
        log.info("lost the leadership; restarting as a follower", extra={"term": self._led_term})
        self._stopping = True
        if self.core_loaded and self._demote is not None:
            try:
                # In this task (not wait_for's): the demote callback's synchronous start
                # halts the core's writes before the store's own watcher fails its queue.
                async with asyncio.timeout(5.0):
                    await self._demote()
            except Exception as exc:  # re-exec whatever happened: memory is not trusted
                log.info("stopping the core before the restart failed: %r", exc)
        await self._reexec()

    async def _reexec(self) -> None:
        """Close the store and exec this same command line: back as a clean follower.

        Python opens every fd close-on-exec, LMDB opens its files with O_CLOEXEC, and gRPC
        and libuv create their sockets with SOCK_CLOEXEC: nothing leaks into the new
        image, and the data-dir lock is released with its fd.
        """
        self._stopping = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.store.close(), 5.0)
        logging.shutdown()  # flush the log file before the image is replaced
        argv = [sys.executable, *sys.orig_argv[1:]]
        os.execv(sys.executable, argv)

    # ------------------------------------------------------------ status

    def _own_status(self) -> dict[str, Any]:
        return {
            **self.listen,
            "name": self.name,
            "advertise": self.advertise,
            "role": self.election.role,
            "applied_seq": self.store.applied_seq,
            "state": self.store.state,
        }

    async def _publish_status(self) -> None:
        """Keep ``{prefix}/replicas/{name}`` current (on this replica's lease); the leader
        also compacts the log entries every live replica has applied (minus a margin)."""
        last_compaction = time.monotonic()
        while True:
            try:
                await self.store.publish_status(dict(self.listen))
                await self._refresh()
                if self.serving_core() and time.monotonic() - last_compaction >= COMPACT_INTERVAL:
                    last_compaction = time.monotonic()
                    await self._compact()
            except (EtcdError, TimeoutError) as exc:
                log.debug("status publish failed: %s", exc)
            await asyncio.sleep(STATUS_INTERVAL)

    async def _compact(self) -> None:
        # A replica that needs a snapshot installs one from a live replica: it holds back
        # no compaction (its applied_seq, 0 when empty, would stop it for good).
        applied = [
            r.get("applied_seq") for r in self._replicas if r.get("state") != "needs_snapshot"
        ]
        if not applied or not all(isinstance(a, int) for a in applied):
            return
        keep_after = min(a for a in applied if isinstance(a, int)) - COMPACT_KEEP
        if keep_after > 0:
            deleted = await self.store.compact(keep_after)
            if deleted:
                log.info("log compacted", extra={"entries": deleted, "up_to_seq": keep_after})

    async def _refresh(self) -> None:
        """Read every replica's status key and etcd's endpoints (for status answers)."""
        replicas = await asyncio.wait_for(self.store.replicas(), _STATUS_TIMEOUT * 2)
        self._replicas = sorted(replicas, key=lambda r: str(r.get("name", "")))
        self._etcd = await asyncio.wait_for(self.client.status(), _STATUS_TIMEOUT * 2)

    async def status(self) -> pb.ClusterStatus:
        """GetClusterStatus: this replica's view, refreshed from etcd when it answers."""
        with contextlib.suppress(EtcdError, TimeoutError):
            await asyncio.wait_for(self._refresh(), _STATUS_TIMEOUT * 2)
        detail = self.detail()
        answer = pb.ClusterStatus(
            enabled=True,
            name=self.name,
            role=self.election.role,
            leader_name=self.election.leader_name or "",
            leader_advertise=self.election.leader_advertise or "",
            term=self.election.leader_term,
            applied_seq=self.store.applied_seq,
            ready=self.ready(),
            state=self.store.state,
        )
        for endpoint in detail["etcd"]:
            answer.etcd.add(**endpoint)
        for replica in detail["replicas"]:
            answer.replicas.add(
                **{
                    k: v
                    for k, v in replica.items()
                    if k in pb.ReplicaStatus.DESCRIPTOR.fields_by_name
                }
            )
        return answer

    def detail(self) -> dict[str, Any]:
        """``/health/detailed``'s ``cluster`` section (last refresh; no etcd call)."""
        replicas = [r for r in self._replicas if r.get("name") != self.name]
        replicas.append(self._own_status())
        return {
            "enabled": True,
            "name": self.name,
            "role": self.election.role,
            "leader_name": self.election.leader_name or "",
            "leader_advertise": self.election.leader_advertise or "",
            "term": self.election.leader_term,
            "applied_seq": self.store.applied_seq,
            "ready": self.ready(),
            "state": self.store.state,
            "etcd": [
                {
                    "endpoint": e.endpoint,
                    "ok": e.ok,
                    "leader": e.leader,
                    "raft_term": e.raft_term,
                    "revision": e.revision,
                    "error": e.error,
                }
                for e in self._etcd
            ],
            "replicas": sorted(replicas, key=lambda r: str(r.get("name", ""))),
            "snapshot": {  # bootstrap attempts of this process, copies it served
                "attempts": self.bootstrap.attempts,
                "last_error": self.bootstrap.last_error,
                "served": self.snapshots.served,
            },
        }

"""``nexus-fast check``: read a whole store and name every problem it finds.

Opens the store read-only (a server may be running on it: no ``nexus.lock``, short read
transactions) and checks, in order:

* the data file's header (:func:`~nexus_fast.store.datafile.inspect`: magic, meta pages,
  truncation) and that every named database is there;
* structure: every table can be walked to its end and holds as many records as LMDB's
  own count says (a damaged page stops the walk: the problem names the last good key);
* ``meta``: the event counter and the schema version (not newer than this code's);
* that every record decodes: ``events`` as ``Event`` with a known topic and a payload of
  that topic's type, ``nodes`` as ``Node``, ``commands`` as ``CommandRecord`` (``c/<id>``)
  and the finished-command index (``x/<finished_ms>/<id>``), ``agents`` as ``Agent`` or a
  stored spec (``spec/<name>/<created>``), each record naming its own key;
* event index continuity: no gap from the oldest kept event to the newest, which is the
  counter in ``meta``;
* that each command's (node's, agent's) stored state agrees with its last event still in
  the log, and that no command whose last event is not final lost its record;
* the audit hash chain (:class:`~nexus_fast.store.audit_chain.ChainVerifier`, as
  ``nexus-fast audit verify``).

Each problem is one :class:`Problem` (table, key, what is wrong). The record layouts named
here are the current schema's (:data:`~nexus_fast.store.migrations.SCHEMA_VERSION`); a unit
test keeps them equal to the prefixes the core writes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final, NamedTuple

import lmdb
import orjson
from google.protobuf.message import DecodeError, Message

from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.store.audit_chain import AUDIT_DB, ChainVerifier
from nexus_fast.store.datafile import DataFileError, iter_records, open_db, open_read_only
from nexus_fast.store.migrations import SCHEMA_KEY, SCHEMA_VERSION, UNVERSIONED

DATABASES: Final = ("nodes", "commands", "agents", "events", "audit", "meta")
LAST_EVENT_KEY: Final = b"last_event_index"
COMMAND_RECORD: Final = b"c/"
COMMAND_EXPIRY: Final = b"x/"
AGENT_SPEC: Final = b"spec/"
MAX_PROBLEMS: Final = 1000
"""Problems reported at most (a wrecked file would otherwise print one per record)."""

_U64 = struct.Struct(">Q")
_FINAL_COMMAND: Final = frozenset(
    {
        pb.COMMAND_STATE_SUCCEEDED,
        pb.COMMAND_STATE_FAILED,
        pb.COMMAND_STATE_TIMED_OUT,
        pb.COMMAND_STATE_CANCELLED,
    }
)
_NODE_GONE: Final = frozenset({"node.removed", "node.deregistered", "node.expired"})
_PAYLOAD_TYPES: Final[dict[str, type[Message]]] = {
    "node": pb.Node,
    "command": pb.CommandRecord,
    "agent": pb.Agent,
}


class Problem(NamedTuple):
    """One thing wrong with the store: where (table, key) and what."""

    table: str
    key: str
    what: str

    def __str__(self) -> str:
        return f"{self.table} {self.key}: {self.what}" if self.key else f"{self.table}: {self.what}"


class _LastEvent(NamedTuple):
    at: int  # its index
    type: str
    state: int  # command state, node status or agent state carried by the event


def _show(key: bytes) -> str:
    """A key as text when it is printable, else hex."""
    try:
        text = key.decode()
    except UnicodeDecodeError:
        return "0x" + key.hex()
    return text if text.isprintable() else "0x" + key.hex()


class StoreCheck:
    """One run over one store; :meth:`run` returns the problems (empty: all good)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems: list[Problem] = []
        self.counts: dict[str, int] = {}
        self.last_events: dict[tuple[str, str], _LastEvent] = {}
        self.audit_head = ""
        self.schema_version = SCHEMA_VERSION
        self.reading: tuple[str, bytes] = ("data.mdb", b"")  # where the walk is

    def crash_report(self) -> str:
        """The problem line for a read that crashed (see :func:`crash_guard`)."""
        table, key = self.reading
        where = f"after key {_show(key)}" if key else "at its first record"
        return str(Problem(table, "", f"reading {where} crashed (SIGBUS/SIGSEGV): damaged pages"))

    def add(self, table: str, key: str, what: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(Problem(table, key, what))

    def run(self) -> list[Problem]:
        try:
            env, _ = open_read_only(self.path)
        except DataFileError as exc:
            self.add("data.mdb", "", str(exc))
            return self.problems
        try:
            self._check(env)
        except lmdb.Error as exc:  # a page so damaged LMDB gives up outside a table walk
            self.add("data.mdb", "", f"unreadable: {exc}")
        finally:
            env.close()
        if len(self.problems) >= MAX_PROBLEMS:
            self.add("check", "", f"stopped after {MAX_PROBLEMS} problems")
        return self.problems

    # ------------------------------------------------------------------ the walk

    def _check(self, env: lmdb.Environment) -> None:
        handles: dict[str, lmdb._Database] = {}
        for name in DATABASES:
            h = open_db(env, name)
            if h is None:
                self.add(name, "", "named database missing")
            else:
                handles[name] = h
        if "meta" in handles:
            self._check_meta(env, handles["meta"])
        checkers: dict[str, Callable[[bytes, bytes], None]] = {
            "events": self._event,
            "nodes": self._node,
            "commands": self._command,
            "agents": self._agent,
        }
        # Events first: the records are compared with their last event.
        for name in ("events", "nodes", "commands", "agents"):
            if name in handles:
                self._walk(env, name, handles[name], checkers[name])
        if "events" in handles:
            self._check_continuity(env, handles["events"], handles.get("meta"))
        if "commands" in handles:
            self._check_lost_commands(env, handles["commands"])
        if AUDIT_DB in handles:
            self._check_audit(env, handles[AUDIT_DB])

    def _walk(
        self,
        env: lmdb.Environment,
        name: str,
        h: lmdb._Database,
        check: Callable[[bytes, bytes], None],
    ) -> None:
        """Visit every record of table ``name``; a read error ends the walk, named."""
        count = 0
        last = b""
        records: Iterator[tuple[bytes, bytes]] = iter_records(env, h)
        self.reading = (name, b"")
        try:
            for key, value in records:
                count += 1
                last = key
                self.reading = (name, key)
                check(key, value)
        except lmdb.Error as exc:
            after = f"after key {_show(last)}" if count else "at its first record"
            self.add(name, "", f"unreadable {after} ({count} records read): {exc}")
            return
        self.counts[name] = count
        with env.begin() as txn:
            entries = int(txn.stat(h)["entries"])
        if entries != count:
            self.add(name, "", f"LMDB counts {entries} records but a walk finds {count}")

    def _check_meta(self, env: lmdb.Environment, meta: lmdb._Database) -> None:
        with env.begin(db=meta) as txn:
            last = txn.get(LAST_EVENT_KEY)
            version = txn.get(SCHEMA_KEY)
        if last is not None and len(last) != 8:
            self.add("meta", LAST_EVENT_KEY.decode(), f"{len(last)} bytes, expected 8")
        if version is None:
            self.schema_version = UNVERSIONED  # not damage: migrated at the next start
        elif len(version) != 8:
            self.add("meta", SCHEMA_KEY.decode(), f"{len(version)} bytes, expected 8")
        else:
            self.schema_version = _U64.unpack(version)[0]
        if self.schema_version > SCHEMA_VERSION:
            self.add(
                "meta",
                SCHEMA_KEY.decode(),
                f"version {self.schema_version} is newer than this tool's "
                f"{SCHEMA_VERSION}: check it with the newer nexus-fast",
            )

    # ------------------------------------------------------------------ records

    def _decode(self, table: str, key: bytes, value: bytes, kind: type[Message]) -> Message | None:
        try:
            return kind.FromString(value)
        except DecodeError as exc:
            self.add(table, _show(key), f"does not decode as {kind.__name__} ({exc})")
            return None

    def _event(self, key: bytes, value: bytes) -> None:
        if len(key) != 8:
            self.add("events", _show(key), "key is not an 8-byte index")
            return
        index = _U64.unpack(key)[0]
        where = str(index)
        try:
            event = pb.Event.FromString(value)
        except DecodeError as exc:
            self.add("events", where, f"does not decode as Event ({exc})")
            return
        if event.index not in (0, index):
            self.add("events", where, f"carries index {event.index}")
        kind = _PAYLOAD_TYPES.get(event.topic)
        if kind is None:
            if event.topic != "system":
                self.add("events", where, f"unknown topic {event.topic!r}")
            elif event.payload:
                try:
                    orjson.loads(event.payload)
                except orjson.JSONDecodeError:
                    self.add("events", where, "system payload is not JSON")
            return
        try:
            entity = kind.FromString(event.payload)
        except DecodeError as exc:
            self.add("events", where, f"{event.type} payload does not decode ({exc})")
            return
        entity_id = getattr(entity, "id", "")
        if entity_id != event.key:
            self.add("events", where, f"key {event.key!r} but its payload is {entity_id!r}")
        state = int(getattr(entity, "status" if event.topic == "node" else "state"))
        self.last_events[(event.topic, event.key)] = _LastEvent(index, event.type, state)

    def _agrees(self, topic: str, table: str, key: bytes, entity_id: str, state: int) -> None:
        last = self.last_events.get((topic, entity_id))
        if last is None:
            return  # its events were pruned by retention: nothing to compare with
        if topic == "node" and last.type in _NODE_GONE:
            self.add(
                table, _show(key), f"still stored, but its last event {last.at} is {last.type}"
            )
        elif last.state != state:
            enum = {"node": pb.NodeStatus, "command": pb.CommandState, "agent": pb.AgentState}
            names = enum[topic]
            self.add(
                table,
                _show(key),
                f"stored state {names.Name(state)} but its last event {last.at} "
                f"({last.type}) says {names.Name(last.state)}",
            )

    def _node(self, key: bytes, value: bytes) -> None:
        node = self._decode("nodes", key, value, pb.Node)
        if not isinstance(node, pb.Node):
            return
        if node.id.encode() != key:
            self.add("nodes", _show(key), f"record names node {node.id!r}")
            return
        self._agrees("node", "nodes", key, node.id, node.status)

    def _command(self, key: bytes, value: bytes) -> None:
        if key.startswith(COMMAND_EXPIRY):
            self._expiry(key, value)
            return
        if not key.startswith(COMMAND_RECORD):
            self.add("commands", _show(key), "key is neither c/<id> nor x/<finished>/<id>")
            return
        record = self._decode("commands", key, value, pb.CommandRecord)
        if not isinstance(record, pb.CommandRecord):
            return
        if COMMAND_RECORD + record.id.encode() != key:
            self.add("commands", _show(key), f"record names command {record.id!r}")
            return
        self._agrees("command", "commands", key, record.id, record.state)

    def _expiry(self, key: bytes, value: bytes) -> None:
        if len(key) < 12 or key[10:11] != b"/" or value:
            self.add("commands", _show(key), "malformed finished-command index entry")

    def _agent(self, key: bytes, value: bytes) -> None:
        if key.startswith(AGENT_SPEC):
            name, _, created = key[len(AGENT_SPEC) :].partition(b"/")
            if not name or len(created) != 16:
                self.add("agents", _show(key), "malformed spec key")
            return
        agent = self._decode("agents", key, value, pb.Agent)
        if not isinstance(agent, pb.Agent):
            return
        if agent.id.encode() != key:
            self.add("agents", _show(key), f"record names agent {agent.id!r}")
            return
        self._agrees("agent", "agents", key, agent.id, agent.state)

    # ------------------------------------------------------------------ across tables

    def _check_continuity(
        self, env: lmdb.Environment, events: lmdb._Database, meta: lmdb._Database | None
    ) -> None:
        previous = 0
        try:
            for key, _ in iter_records(env, events):
                if len(key) != 8:
                    continue
                index = _U64.unpack(key)[0]
                if previous and index != previous + 1:
                    self.add(
                        "events",
                        str(previous + 1),
                        f"missing: the log jumps from {previous} to {index}",
                    )
                previous = index
        except lmdb.Error:
            return  # the walk already named it
        if meta is None:
            return
        with env.begin(db=meta) as txn:
            raw = txn.get(LAST_EVENT_KEY)
        counter = _U64.unpack(raw)[0] if raw is not None and len(raw) == 8 else 0
        if previous and counter != previous:  # (no event kept at all: nothing to compare)
            self.add(
                "meta",
                LAST_EVENT_KEY.decode(),
                f"is {counter} but the newest event stored is {previous}",
            )

    def _check_lost_commands(self, env: lmdb.Environment, commands: lmdb._Database) -> None:
        with env.begin(db=commands) as txn:
            for (topic, command_id), last in self.last_events.items():
                if topic != "command" or last.state in _FINAL_COMMAND:
                    continue
                if txn.get(COMMAND_RECORD + command_id.encode()) is None:
                    self.add(
                        "commands",
                        (COMMAND_RECORD + command_id.encode()).decode(errors="replace"),
                        f"missing, but its last event {last.at} ({last.type}) is not final",
                    )

    def _check_audit(self, env: lmdb.Environment, audit: lmdb._Database) -> None:
        verifier = ChainVerifier()
        try:
            for key, value in iter_records(env, audit):
                broken = verifier.feed(key, value)
                if broken is not None:
                    self.add(
                        "audit",
                        str(broken.seq),
                        f"chain broken: {broken.reason} ({verifier.count} entries before it "
                        "are intact)",
                    )
                    return
        except lmdb.Error as exc:
            self.add("audit", "", f"unreadable: {exc}")
            return
        if verifier.count:
            self.audit_head = f"{verifier.head.seq}:{verifier.head.hash.hex()}"


def check_store(path: Path) -> list[Problem]:
    """Every problem of the store at ``path`` (a data dir or a backup file); [] when sound."""
    return StoreCheck(path).run()

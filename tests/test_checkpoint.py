import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading

import pytest

from pyagent.errors import ConfigError, PyAgentError
from pyagent.resilience.checkpoint import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointStore,
    CorruptCheckpointError,
    open_store,
)
from pyagent.resilience.memory_store import MemoryCheckpointStore
from pyagent.resilience.sqlite_store import SQLiteCheckpointStore


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    opened = MemoryCheckpointStore() if request.param == "memory" else SQLiteCheckpointStore(
        tmp_path / "runs.db")
    yield opened
    opened.close()


def test_put_then_get_round_trips_the_state(store):
    state = {"position": 2, "outputs": {"plan": "ünïcode ✓"}, "transcript": [{"role": "user"}],
             "loops": {"retries": 1.5, "done": False, "note": None}}
    stored = store.put("run-1", 0, state)
    assert isinstance(store, CheckpointStore)
    assert (stored.run_id, stored.seq, stored.state) == ("run-1", 0, state)
    canonical = json.dumps(state, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert stored.checksum == hashlib.sha256(canonical.encode()).hexdigest()
    assert store.get("run-1", 0) == stored
    assert store.get("run-1") == stored


def test_get_latest_list_and_missing(store):
    for seq in (1, 0, 2):
        store.put("a", seq, {"step": seq})
    assert store.get("a").seq == 2
    assert store.get("a", 1).state == {"step": 1}
    assert [c.seq for c in store.list("a")] == [0, 1, 2]
    assert store.get("a", 7) is None
    assert store.get("nobody") is None
    assert store.list("nobody") == []


def test_a_seq_is_stored_once(store):
    store.put("a", 0, {"v": "first"})
    with pytest.raises(CheckpointExistsError, match=r"'a'.*checkpoint 0") as info:
        store.put("a", 0, {"v": "second"})
    assert isinstance(info.value, PyAgentError)
    assert store.get("a", 0).state == {"v": "first"}
    assert len(store.list("a")) == 1


def test_runs_and_delete_run(store):
    for run_id in ("b", "a", "c"):
        store.put(run_id, 0, {})
    store.put("a", 1, {})
    assert store.runs() == ["a", "b", "c"]
    store.delete_run("a")
    store.delete_run("never-existed")
    assert store.runs() == ["b", "c"]
    assert store.get("a") is None
    store.put("a", 0, {"again": True})
    assert store.get("a").state == {"again": True}


def test_states_are_copied_in_and_out(store):
    state = {"transcript": ["hello"]}
    returned = store.put("a", 0, state)
    state["transcript"].append("changed after put")
    returned.state["transcript"].append("changed the returned copy")
    store.get("a").state["transcript"].append("changed a read copy")
    assert store.get("a").state == {"transcript": ["hello"]}


@pytest.mark.parametrize(("state", "path"), [
    ({"outputs": {"step": [1, 2, object()]}}, "state['outputs']['step'][2]"),
    ({"a": {"when": float("nan")}}, "state['a']['when']"),
    ({"a": [{1: "int key"}]}, "state['a'][0]"),
    ({"a": {"b": {1, 2}}}, "state['a']['b']"),
])
def test_unserializable_state_names_the_key_path(store, state, path):
    with pytest.raises(CheckpointError) as info:
        store.put("a", 0, state)
    assert path in str(info.value)
    assert store.get("a") is None
    assert store.runs() == []


def test_refuses_self_containing_state_and_non_dicts(store):
    loop: dict = {}
    loop["self"] = loop
    with pytest.raises(CheckpointError, match=r"state\['self'\] contains itself"):
        store.put("a", 0, loop)
    with pytest.raises(CheckpointError, match="must be a dict"):
        store.put("a", 0, ["not", "a", "dict"])


@pytest.mark.parametrize(("run_id", "seq"), [("", 0), ("a", -1), ("a", True), ("a", "1")])
def test_bad_keys_are_refused(store, run_id, seq):
    with pytest.raises(CheckpointError):
        store.put(run_id, seq, {})


def test_concurrent_puts_store_each_seq_exactly_once(store):
    conflicts: list[int] = []

    def writer() -> None:
        for seq in range(40):
            try:
                store.put("race", seq, {"seq": seq})
            except CheckpointExistsError:
                conflicts.append(seq)

    threads = [threading.Thread(target=writer) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [c.seq for c in store.list("race")] == list(range(40))
    assert len(conflicts) == 5 * 40


def test_a_closed_store_refuses_calls(store):
    store.put("a", 0, {})
    store.close()
    store.close()
    with pytest.raises(CheckpointError, match="closed"):
        store.get("a")
    with pytest.raises(CheckpointError, match="closed"):
        store.put("a", 1, {})


def test_open_store_picks_the_store(tmp_path):
    assert isinstance(open_store("memory:"), MemoryCheckpointStore)
    for target in (tmp_path / "a.db", str(tmp_path / "b.sqlite"), f"sqlite:///{tmp_path}/c.db"):
        opened = open_store(target)
        assert isinstance(opened, SQLiteCheckpointStore)
        opened.put("r", 0, {})
        opened.close()
    for name in ("a.db", "b.sqlite", "c.db"):
        reopened = SQLiteCheckpointStore(tmp_path / name)
        assert reopened.runs() == ["r"]
        reopened.close()
    for bad, message in (("redis://host/0", "unknown checkpoint store 'redis'"),
                         ("runs.txt", "cannot tell"), ("sqlite:runs.db", "sqlite:///PATH"),
                         ("memory:x", "'memory:'")):
        with pytest.raises(ConfigError, match=message):
            open_store(bad)


def test_sqlite_reopens_and_reads_back(tmp_path):
    path = tmp_path / "nested" / "runs.db"
    first = SQLiteCheckpointStore(path)
    written = [first.put("r", seq, {"seq": seq}) for seq in range(3)]
    first.close()
    again = SQLiteCheckpointStore(path)
    assert again.list("r") == written
    assert again.runs() == ["r"]
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again.close()


WRITER = """
import sys
from pyagent.resilience.sqlite_store import SQLiteCheckpointStore
store = SQLiteCheckpointStore(sys.argv[1])
latest = store.get("run")
seq = 0 if latest is None else latest.seq + 1
while True:
    store.put("run", seq, {"seq": seq, "transcript": ["step %d " % seq * 50] * (seq % 40)})
    print(seq, flush=True)
    seq += 1
"""


def test_sqlite_survives_sigkill_mid_run(tmp_path):
    path = tmp_path / "runs.db"
    latest = -1
    for kill_after in (5, 40, 17, 1, 29, 8):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)],
                                  stdout=subprocess.PIPE, text=True)
        seqs = []
        for _ in range(kill_after):
            line = writer.stdout.readline()
            assert line, f"the writer stopped early with exit code {writer.poll()}"
            seqs.append(int(line))
        assert seqs == list(range(latest + 1, latest + 1 + kill_after))  # resumed from latest
        acked = seqs[-1]
        os.kill(writer.pid, signal.SIGKILL)
        assert writer.wait(timeout=30) == -signal.SIGKILL
        writer.stdout.close()

        store = SQLiteCheckpointStore(path)
        listed = store.list("run")
        assert [c.seq for c in listed] == list(range(len(listed)))
        assert listed[-1].seq >= acked
        assert all(c.state["seq"] == c.seq for c in listed)
        latest = store.get("run").seq
        store.close()

    store = SQLiteCheckpointStore(path)
    store.put("run", latest + 1, {"seq": latest + 1})
    assert store.get("run").seq == latest + 1
    store.close()


def test_sqlite_refuses_a_newer_schema(tmp_path):
    path = tmp_path / "runs.db"
    SQLiteCheckpointStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE schema_version SET version = version + 1")
    with pytest.raises(CheckpointError, match=f"{path}.*newer"):
        SQLiteCheckpointStore(path)


@pytest.mark.parametrize("content", [b"not a database at all" * 100, b""])
def test_sqlite_refuses_a_corrupt_or_foreign_file(tmp_path, content):
    path = tmp_path / "runs.db"
    if content:
        path.write_bytes(content)
    else:
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE other (x)")
    with pytest.raises(CheckpointError, match=str(path)):
        SQLiteCheckpointStore(path)


def test_sqlite_reports_a_tampered_state(tmp_path):
    path = tmp_path / "runs.db"
    store = SQLiteCheckpointStore(path)
    store.put("r", 0, {"approved": False})
    store.put("r", 1, {"approved": False})
    with sqlite3.connect(path) as db:
        changed = db.execute("UPDATE checkpoints SET state = replace(state, 'false', 'true') "
                             "WHERE run_id = 'r' AND seq = 1").rowcount
    assert changed == 1
    assert store.get("r", 0).state == {"approved": False}
    for read in (lambda: store.get("r"), lambda: store.get("r", 1), lambda: store.list("r")):
        with pytest.raises(CorruptCheckpointError, match=r"checkpoint 1 of run 'r'"):
            read()
    store.close()


def test_memory_reports_a_tampered_state():
    store = MemoryCheckpointStore()
    store.put("r", 0, {"approved": False})
    text, created, checksum = store._runs["r"][0]
    store._runs["r"][0] = (text.replace("false", "true"), created, checksum)
    with pytest.raises(CorruptCheckpointError, match=r"checkpoint 0 of run 'r'"):
        store.get("r")


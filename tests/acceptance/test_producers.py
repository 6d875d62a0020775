"""Producers nobody here wrote: plain SQL (with and without pgmq headers), Supabase's
``pgmq_public.send``, the PyPI ``pgmq`` client and npm's ``pgmq-js``, each sending an integer
``entity_id``; a real worker runs each job exactly once. A dead letter keeps its headers and
a replay re-sends them."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest

from backend.db.embedded import PROJECT_ROOT
from scripts.harness.process import WorkerProcess
from tests.helpers import one, run_inspector, wait_until

pytestmark = pytest.mark.slow
Spawn = Callable[..., WorkerProcess]
Conn = psycopg.Connection[Any]
NPM_CACHE = PROJECT_ROOT / ".data" / "test" / "npm-pgmq-js"
SENDS_HEADERS = "SELECT to_regprocedure('pgmq.send(text,jsonb,jsonb,integer)') IS NOT NULL"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
# Supabase's wrapper (its pgmq_public schema, exposed to the API), as Supabase defines it.
PGMQ_PUBLIC = """
CREATE SCHEMA IF NOT EXISTS pgmq_public;
CREATE OR REPLACE FUNCTION pgmq_public.send(queue_name text, message jsonb, sleep_seconds integer DEFAULT 0)
RETURNS SETOF bigint LANGUAGE plpgsql SET search_path = '' AS $$
BEGIN
    RETURN QUERY SELECT * FROM pgmq.send(queue_name := queue_name, msg := message, delay := sleep_seconds);
END;
$$;
"""
JS_PRODUCER = """
const { Pgmq } = require('pgmq-js');
(async () => {
  const [host, port, key] = process.argv.slice(2);
  const pgmq = await Pgmq.new(
    { host, port: Number(port), database: 'postgres', user: 'postgres', password: '', ssl: false },
    { skipExtensionCreation: true },
  );
  const id = await pgmq.msg.send('q_probe', {
    idempotency_key: key, entity_type: 'probe', entity_id: 5, org_id: 9, payload: {},
    created_at: Math.floor(Date.now() / 1000),
  });
  console.log(JSON.stringify({ msg_id: id }));
  await pgmq.close();
})().catch((err) => { console.error(err); process.exit(1); });
"""


def tcp_address(url: str) -> tuple[str, int]:
    """The test server's TCP address (its URL may name a socket folder and a port)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    port = int(query["port"][0]) if "port" in query else parts.port or 5432
    host = parts.hostname or "127.0.0.1"
    return ("127.0.0.1" if host.startswith("/") or "host" in query else host), port


def envelope(key: str, **extra: Any) -> dict[str, Any]:
    return {
        "idempotency_key": key,
        "entity_type": "probe",
        "entity_id": 42,
        "org_id": "org-1",
        "payload": {},
        **extra,
    }


@pytest.fixture
def pgmq_public(db: Conn) -> Iterator[None]:
    db.execute(PGMQ_PUBLIC)
    yield
    db.execute("DROP SCHEMA pgmq_public CASCADE")


def node_producer() -> str:
    """pgmq-js installed once into a folder of the test data (npm's registry)."""
    if not (NPM_CACHE / "node_modules" / "pgmq-js").is_dir():
        NPM_CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "install", "--no-save", "--silent", "--prefix", str(NPM_CACHE), "pgmq-js@1"],
            check=True,
            timeout=300,
        )
    script = NPM_CACHE / "producer.js"
    script.write_text(JS_PRODUCER)
    return str(script)


def test_every_producer_s_job_runs_exactly_once(
    spawn: Spawn, db: Conn, clean_db: str, pgmq_public: None
) -> None:
    assert shutil.which("node") and shutil.which("npm"), "node and npm are part of the test setup"
    host, port = tcp_address(clean_db)
    headers_supported = bool(one(db, SENDS_HEADERS))
    db.execute("SELECT pgmq.send('q_probe', %s::jsonb)", (json.dumps(envelope("sql-plain")),))
    if headers_supported:
        db.execute(
            "SELECT pgmq.send('q_probe', %s::jsonb, %s::jsonb, 0)",
            (
                json.dumps(envelope("sql-headers", created_at=1764410400)),
                json.dumps({"traceparent": TRACEPARENT}),
            ),
        )
    db.execute("SELECT pgmq_public.send('q_probe', %s::jsonb)", (json.dumps(envelope("pgmq-public")),))

    from pgmq import PGMQueue  # the PyPI client, over TCP as any producer connects

    client = PGMQueue(host=host, port=str(port), username="postgres", password="", database="postgres")
    try:
        client.send("q_probe", envelope("pypi-client"), headers={"x-trace-id": "py-1"})
    finally:
        if client.pool is not None:
            client.pool.close()
    done = subprocess.run(
        ["node", node_producer(), host, str(port), "pgmq-js"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr

    keys = ["sql-plain", "pgmq-public", "pypi-client", "pgmq-js"] + (
        ["sql-headers"] if headers_supported else []
    )
    worker = spawn("tests.workers.probe")
    worker.wait_boot()
    wait_until(lambda: one(db, "SELECT count(*) FROM pgmq.q_q_probe") == 0)
    effects = {
        r["job_key"]: r["n"]
        for r in db.execute("SELECT job_key, count(*) AS n FROM probe.effects GROUP BY job_key").fetchall()
    }
    assert effects == dict.fromkeys(keys, 1)
    assert one(db, "SELECT count(*) FROM workers.dead_letters") == 0


def test_a_dead_letter_keeps_its_headers_and_a_replay_re_sends_them(
    spawn: Spawn, db: Conn, clean_db: str
) -> None:
    if not one(db, SENDS_HEADERS):
        pytest.fail("the test server's pgmq has no headers (1.5 and later have them)")
    headers = {"traceparent": TRACEPARENT, "x-tenant": "org-1", "n": [1, 2.5, {"deep": None}]}
    body = envelope("dead-with-headers", payload={"permanent": True})
    db.execute(
        "SELECT pgmq.send('q_probe', %s::jsonb, %s::jsonb, 0)", (json.dumps(body), json.dumps(headers))
    )
    db.execute(
        "SELECT pgmq.send('q_probe', %s::jsonb)",
        (json.dumps(envelope("dead-bare", payload={"permanent": True})),),
    )
    worker = spawn("tests.workers.probe")
    worker.wait_boot()
    letters = wait_until(
        lambda: (
            (
                rows := db.execute(
                    "SELECT id, job_key, headers FROM workers.dead_letters ORDER BY job_key"
                ).fetchall()
            )
            and len(rows) == 2
            and rows
        )
    )
    assert [(r["job_key"], r["headers"]) for r in letters] == [
        ("dead-bare", None),
        ("dead-with-headers", headers),
    ]
    worker.send(signal.SIGTERM)
    assert worker.wait_exit() == 0
    listed = run_inspector(clean_db, "dead-letters", "list", "--json")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    shown = {d["job_key"]: d["headers"] for d in json.loads(listed.stdout)["items"]}
    assert shown == {"dead-bare": None, "dead-with-headers": headers}

    for letter in letters:
        replay = run_inspector(clean_db, "dead-letters", "replay", "--id", str(letter["id"]))
        assert replay.returncode == 0, replay.stdout + replay.stderr
    sent = db.execute(
        "SELECT message ->> 'idempotency_key' AS k, message::text AS body, headers::text AS headers"
        " FROM pgmq.q_q_probe ORDER BY 1"
    ).fetchall()
    originals = db.execute(
        "SELECT job_key AS k, message::text AS body, headers::text AS headers"
        " FROM workers.dead_letters ORDER BY 1"
    ).fetchall()
    assert sent == originals and sent[1]["headers"] is not None

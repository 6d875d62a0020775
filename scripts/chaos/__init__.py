"""Chaos run: SIGTERM/SIGKILL storms and a PostgreSQL restart under a mixed workload, then
proof that nothing was lost or done twice.

Starts ``--workers-per-kind`` replicas of each Dragonfly worker (``python -m
backend.workers.<name>``) against one database, a local HTTP receiver for the outbox, and
enqueues a seeded workload in waves over the first 70% of the run: collectability jobs for
seeded judgments, escalation jobs for seeded cases (each enqueues its own notification),
direct notifications (some answered slowly, so that kills land inside the external handler,
some refused once with 503), re-enqueued copies of some keys, and a few poison messages. For
``--duration`` seconds it sends SIGTERM or SIGKILL to a random replica every
``--kill-interval`` seconds or so, restarts whatever exits (as Railway's restart policy
would) and restarts PostgreSQL once. Then it lets the queues drain, stops every replica with
SIGTERM and checks:

- every job's effect exactly once: one score row per judgment, with its job key; one
  recommendation event per case and one outbox message for it; the ledger completes each
  key once; the receiver accepts every notification key, and never after its key was
  completed (a redelivery after a kill legitimately calls twice with the same key, so raw
  calls are reported apart). Committed effects are counted by audit triggers (schema
  ``chaos``), so an effect written twice is seen even when the second write overwrote it;
- nothing lost, dead letters only for the poison messages, no claim left stuck;
- every SIGTERM'd replica exited 0 or 143 after a WORKER_SHUTDOWN line; every SIGKILL'd
  replica's heartbeat row stopped advancing and reads as dead; a chaos worker replica ended
  by one of its killer jobs exited 137 right after saying so;
- liveness: transactional replicas are also frozen (SIGSTOP, then SIGCONT) for longer than
  the visibility timeout, never the last unfrozen one of its kind (the stall is measured
  while a worker of the queue is free), a chaos worker (``scripts/chaos/worker.py``) gets jobs that
  end its process, and the queues get undecodable and oversized bodies; the longest stall (how long
  a job took from its enqueue to its completion, less the retry delays it was given and the
  time PostgreSQL was down) must stay within the visibility timeout + 10 s;
- hung handlers: every worker runs with a short deadline (``--job-timeout``), and both chaos
  workers, the transactional one and its external twin, get jobs whose handler never
  returns, a Python loop (interrupted) and a socket read (blocked in C: the worker exits 1).
  Each is dead-lettered ``JobTimedOut`` (``AttemptsExhausted`` when its last attempt ended
  unrecorded, its worker killed or frozen meanwhile), never committed (transactional) or
  sent with its own key only (external); a replica's exit 1 is expected when its
  ``WORKER_CRASH`` names a hung job; the jobs of those two queues may wait deadline +
  visibility timeout + 10 s.

    python -m scripts.chaos [--duration 60] [--jobs 2000] [--workers-per-kind 2]
        [--kill-interval 4] [--job-timeout 2] [--max-attempts N] [--hung-jobs N]
        [--seed N] [--no-db-restart] [--report PATH]
    python -m scripts.chaos --url postgresql://... [--pgdata DIR] [--reset]

Without ``--url`` it runs its own embedded PostgreSQL in ``.data/chaos-pg`` (emptied first,
stopped at the end). With ``--url`` the database must be empty (or pass ``--reset``), and the
restart needs ``--pgdata``: the folder of the embedded server behind that URL, which is left
running. The receiver check compares this machine's clock with the database's, so the
database runs on this machine. The seed is printed: the same seed replays the same workload,
kill schedule and victims. The JSON report goes to ``--report`` (default
``chaos-results/chaos-<seed>.json``). Exit 0 when every invariant holds, 1 when one does
not, 2 when the run could not be made.

The modules, by role: ``__main__`` (the command line, one run and its checks), ``options``
(the settings and the options), ``database`` (the server, emptied and made ready),
``duties`` (the producer and the database restart), ``replicas`` (the processes and their
supervisor), ``storm`` (the run itself: boot, kills, drain, stop), ``report`` (the JSON
report); the workload: ``workload`` (the plan of messages), ``schedule`` (the kills),
``receiver`` (the outbox's receiver), ``worker`` (the chaos workers); the checks: ``audit``
(the triggers that count effects), ``effects``, ``liveness`` (hung jobs and stalls),
``processes``, and ``table`` (the terminal table). The worker processes and the receiver
are the harness's (``scripts/harness/``).
"""

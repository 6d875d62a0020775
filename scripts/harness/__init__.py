"""The harness shared by the tests and the scripts: worker processes and local receivers.

- ``process``: ``WorkerProcess``, one ``python -m <module>`` worker, its JSON log lines
  parsed as they arrive, waits on its events, signals, exit, CPU and memory;
- ``receivers``: ``HttpRecorder``, a local HTTP endpoint that records every request and
  answers as told (also a process: ``python -m scripts.harness.receivers``);
- ``smtp``: ``SmtpRecorder``, the same for mail (needs ``aiosmtpd``, a dev dependency).

Nothing here imports ``tests``.
"""

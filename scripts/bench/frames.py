"""The frame names the profile (``python -m scripts.bench --profile``) looks for in py-spy's
stacks, as py-spy writes them (``Class.method (file.py:line)``), matched by prefix.

The runtime's own frames follow its code: when the boot, the run loop or the batch methods
move or are renamed, update the first block here and nowhere else. A stale loop frame
makes the profile count no sample; a stale batch class puts every sample "(outside a
batch)".
"""

from __future__ import annotations

# --- the runtime's frames: update these when the runtime's code moves --------------------

# From the entry point down to the run loop: the boot and the worker's run method.
RUNTIME_ENTRY_FRAMES = ("run_worker", "Runtime.run")
# The run loop: only the main thread's samples inside it are the worker's.
RUN_LOOP_FRAME = "Consumer.run"
# The methods that run one batch: the call the innermost of them makes is the step of the
# batch a sample is in.
BATCH_FRAMES = ("Processor.process", "TransactionalProcessor._deliver", "TransactionalProcessor._batch")

RUNTIME_FRAMES = (*RUNTIME_ENTRY_FRAMES, RUN_LOOP_FRAME, *BATCH_FRAMES)

# --- Python's and psycopg's frames ---------------------------------------------------------

# python -m: the interpreter's frames above the entry point.
PYTHON_ENTRY_FRAMES = ("_run_module_as_main", "_run_code", "<module>")
# psycopg waiting for a result.
WAIT_FRAME = "Connection.wait "
# psycopg's frames that write a query to the socket (py-spy --native shows send() below them)
SEND_FRAMES = (
    "BaseCursor._send_query_prepared ",
    "BaseCursor._send_prepare ",
    "BaseCursor._execute_send ",
    "BaseConnection._exec_command ",
)
# Steps of a batch with a clearer name than their frame's.
STEP_NAMES = {
    "_GeneratorContextManager.__enter__ (contextlib.py)": "transaction enter (BEGIN)",
    "_GeneratorContextManager.__exit__ (contextlib.py)": "transaction exit (COMMIT)",
}

# Left out of the list of Python functions: every sample is inside them.
GENERIC_FRAMES = (*PYTHON_ENTRY_FRAMES, *RUNTIME_FRAMES, WAIT_FRAME)

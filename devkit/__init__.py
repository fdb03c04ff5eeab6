"""What the demo, the tests and the benchmark share to run the service on this machine.

`postgres`: a PostgreSQL server (the local one or an embedded one) and databases on it; `gunicorn`: the
service as a child process; `net`: a free port, and waiting until something answers. None of it is part of
the service: the image leaves this folder out (.dockerignore).
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

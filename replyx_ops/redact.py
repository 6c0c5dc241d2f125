"""``python -m replyx_ops.redact PROGRAM ARG…``: a program, with query values cut from its output.

nginx's error lines quote the client's request line and the upstream URL
(``request: "GET /ws/dialogs/5?token=… HTTP/1.1"``), tokens included, and nginx
has no setting to change that. supervisord runs nginx under this wrapper, so
``log/nginx.log`` never holds a token: every line of the program's stdout and
stderr passes through :func:`replyx.logs.redact_query_values`.

Stop and reload signals go to the program; the wrapper exits with its exit code.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Sequence

from replyx.logs import redact_query_values

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
             signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m replyx_ops.redact PROGRAM [ARG…]", file=sys.stderr)
        return 2
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for sig in FORWARDED:
        signal.signal(sig, lambda signum, frame: child.send_signal(signum))
    assert child.stdout is not None
    out = sys.stdout.buffer
    for line in iter(child.stdout.readline, b""):
        text = line.decode("utf-8", "surrogateescape")
        out.write(redact_query_values(text).encode("utf-8", "surrogateescape"))
        out.flush()
    return child.wait()


if __name__ == "__main__":
    sys.exit(main())

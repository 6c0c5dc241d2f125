"""``replyx chaos``: the seeded fault soak (issue 15).

* :mod:`.schedule` — the seeded schedule of faults; :mod:`.faults` — one class per fault kind;
* :mod:`.stack` — the stack under test (``replyx run``) and its database; :mod:`.proxy` — the
  TCP proxy between the gateway and Postgres;
* :mod:`.clients` — the dialog socket population; :mod:`.inbox` — inbox sockets and their
  check; :mod:`.writers` — HTTP (messages, typing, read marks) and SQL writers;
* :mod:`.checker` — every socket against the database; :mod:`.report` — the JSON report,
  :mod:`.plot` — its PNG timeline (a process of its own: matplotlib is slow to import);
* :mod:`.soak` — one run from start to verdict; :mod:`.run` — the command.
"""

from replyx_ops.chaos.run import add_arguments, main

__all__ = ["add_arguments", "main"]

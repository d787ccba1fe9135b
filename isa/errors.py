"""The one base class of every error a user can meet: a refused input, config, cache, checkpoint or cluster.

The ``isa`` command catches it once and prints ``isa STAGE: error: MESSAGE`` with exit status 2, so each
message names the problem and, where there is one, the way on. Apart from errors of the environment (a file,
the network, credentials: ``pipelines.cli.refusal``), errors that are not :class:`IsaError` are bugs and keep
their traceback.
"""

from __future__ import annotations


class IsaError(ValueError):
    """A problem with what the user gave (named in the message), found before or during a stage's work."""

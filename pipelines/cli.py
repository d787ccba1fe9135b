"""The ``isa`` command: ``isa STAGE [--config FILE.yaml] [key=value ...]``.

Each stage lives in its own module with a ``parser()`` and a ``main(argv)``; this file only dispatches, so
``isa --help`` stays fast and imports nothing heavy. It sits above the packages (``isa`` <- ``pipelines`` <-
``tune``): it names the stage modules as strings and imports only the one asked for. It is the one place
that turns an :class:`~isa.errors.IsaError` (also one Ray raised again from a task) or an error of the
environment (:func:`refusal`) into ``isa STAGE: error: MESSAGE`` and exit status 2.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from isa.errors import IsaError

# stage name -> (module, one-line summary)
STAGES: dict[str, tuple[str, str]] = {
    "embed": ("pipelines.embed", "cache teacher image embeddings with Ray Data (resumable, any fsspec URI)"),
    "train": ("pipelines.train", "distil the light query encoder with Ray Train (DDP, checkpoints, MLflow)"),
    "eval": ("pipelines.eval", "FashionIQ / CIRR / CIRCO / image-only metrics, baselines, test-server files, report"),
    "tune": ("tune.sweep", "sweep isa train with Ray Tune: ASHA, resumable, MLflow parent + nested trial runs"),
    "ablate": ("tune.ablation", "ablation suite (tokens, losses, lambda, ...): train, evaluate, table, CSV, plot"),
    "export": ("pipelines.export", "the query encoder (student + token learner) as ONNX for onnxruntime, int8 too"),
    "index": ("pipelines.index", "a FAISS index of an isa embed cache: exact or approximate (IVF-PQ, HNSW), sharded"),
    "serve": ("pipelines.serve", "composed search over an index on Ray Serve: HTTP API and a search page"),
    "search": ("pipelines.search", "many composed queries at once through Ray Data, top-k per query to Parquet/JSONL"),
    "quickstart": ("pipelines.quickstart", "the whole pipeline offline on the synthetic world, one table at the end"),
    "world": ("pipelines.world", "write the synthetic world (images, captions, CIRR/FashionIQ/CIRCO layouts)"),
    "config": ("pipelines.show_config", "validate a config file and overrides, print the resolved config"),
}
USAGE_ERROR = 2  # exit status of a refused input, config or cluster (argparse's own, too)


def _usage() -> str:
    width = max(len(name) for name in STAGES)
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in STAGES.items()]
    return (
        "usage: isa STAGE [options]\n\nstages:\n" + "\n".join(lines) + "\n\n'isa STAGE --help' for a stage's options."
    )


def stage_module(stage: str):
    """The module of a stage (its ``parser()``, ``main(argv)``, ...)."""
    return importlib.import_module(STAGES[stage][0])


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    stage, rest = args[0], args[1:]
    if stage not in STAGES:
        print(f"isa: unknown stage {stage!r}; valid stages: {', '.join(STAGES)}", file=sys.stderr)
        return USAGE_ERROR
    try:
        return int(stage_module(stage).main(rest) or 0)
    except Exception as error:
        message = refusal(error)
        if message is None:
            raise  # a bug: its traceback
        print(f"isa {stage}: error: {message}", file=sys.stderr, flush=True)
        return USAGE_ERROR


def refusal(error: BaseException) -> str | None:
    """The one line an error gives the user, or None for a bug (which keeps its traceback).

    An :class:`~isa.errors.IsaError` gives its message, also when it was raised in a Ray task or actor and Ray
    raised it again here. A problem of the environment the stage met on the way (a file, a network or a
    permission: ``OSError``; missing or partial cloud credentials) gives its type and message.
    """
    from isa.storage import redact_uri  # a URI in a message keeps its secret hidden

    error = _raised(error)
    if isinstance(error, IsaError):
        return redact_uri(str(error))
    if isinstance(error, _environment_errors()):
        return redact_uri(f"{type(error).__name__}: {error}")
    return None


def _raised(error: BaseException) -> BaseException:
    """The error a Ray task or actor raised, for one Ray raised again in the driver (it keeps the original as
    ``cause``, or chains it); any other error as it is."""
    for _ in range(8):  # Ray Data wraps a task's error in a RayTaskError around its own UserCodeException
        if not type(error).__module__.startswith("ray."):
            return error
        inner = getattr(error, "cause", None)
        inner = inner if isinstance(inner, BaseException) else error.__cause__
        if inner is None:
            return error
        error = inner
    return error


def _environment_errors() -> tuple[type[BaseException], ...]:
    """OSError, and botocore's credential errors when botocore was loaded (an s3:// URI without credentials)."""
    found: list[type[BaseException]] = [OSError]
    botocore = sys.modules.get("botocore.exceptions")
    if botocore is not None:
        found += [botocore.NoCredentialsError, botocore.PartialCredentialsError]
    return tuple(found)


if __name__ == "__main__":
    sys.exit(main())

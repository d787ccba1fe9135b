"""The Ray stages of the pipeline and the ``isa`` command (one short file per stage, each with ``main()``)."""

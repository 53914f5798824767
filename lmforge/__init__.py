"""Entry points: the ``lmforge`` command, ``lmforge up`` and the process helpers they need."""

"""The ``geovae`` command. Thin: it parses options and calls the library.

Exit codes: 0 success, 1 runtime error (bad input, failed scene...), 2 usage error (bad
option, unknown subcommand), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM, what
schedulers and ``kill`` send). A :class:`~geovae.errors.GeovaeError` and a usage error are
printed as one line; ``--debug`` shows the traceback as well.

Process-wide settings (logging, signal handlers) are made here, at the entry point, never
by the library. One module per command group:

* :mod:`~geovae.cli.app`: the ``geovae`` group, logging, ``-v``/``-q``/``--debug``;
* :mod:`~geovae.cli.scenes`: ``info`` and ``view``;
* :mod:`~geovae.cli.segment`: ``segment`` and ``batch``, and the options they share (built
  from :class:`~geovae.segment.options.SegmentOptions`);
* :mod:`~geovae.cli.vectorize`: ``vectorize``;
* :mod:`~geovae.cli.model`: ``train``, ``generate``, ``export`` and ``models``;
* :mod:`~geovae.cli.evaluate`: ``evaluate``;
* :mod:`~geovae.cli.demo`: ``demo``;
* :mod:`~geovae.cli.entry`: :func:`main`, the console script: exit codes, one-line errors.
"""

from geovae.cli.app import cli
from geovae.cli.entry import main

__all__ = ["cli", "main"]

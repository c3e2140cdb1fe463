"""How many threads edgepipe's own work may take: ``$EDGEPIPE_THREADS``.

edgepipe's own work is everything but a benchmark: calibration, evaluation, sensitivity analysis and the
fine-tunes (torch, onnxruntime and OpenVINO sessions). By default each runtime takes every core, which is
right for one job on a machine; several jobs side by side (CI shards, ``pytest -n``, two releases on one
host) then oversubscribe the cores and a runtime's spinning threads burn the time the others need.
``EDGEPIPE_THREADS=1`` gives each job one thread. A benchmark always runs with its target's
``[runtime] threads``, whatever this says.
"""

from __future__ import annotations

import os

from edgepipe.errors import ConfigError

VARIABLE = "EDGEPIPE_THREADS"


def work_threads() -> int | None:
    """``$EDGEPIPE_THREADS`` as a positive int, or None (unset or empty: the runtimes' own default, every core).

    Raises:
        ConfigError: the variable is set to something that is not a positive whole number.
    """
    text = os.environ.get(VARIABLE, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"${VARIABLE}={text!r}: give a whole number of threads, 1 or more (or unset it to use "
                          "every core)")
    return int(text)


def apply() -> None:
    """Pass ``$EDGEPIPE_THREADS`` on to the OpenMP pool torch starts (``OMP_NUM_THREADS``, before torch is imported).

    An explicit ``OMP_NUM_THREADS`` is left as it is; a bad value is reported by the
    first stage that reads it, not at import."""
    try:
        n = work_threads()
    except ConfigError:
        return
    if n is not None:
        os.environ.setdefault("OMP_NUM_THREADS", str(n))

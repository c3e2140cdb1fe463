"""Vendor telemetry off, in this process and in every process edgepipe starts. Standard library only.

* **onnxruntime** (1.32's Linux wheel carries Microsoft's 1DS client): it reads ``ORT_DISABLE_TELEMETRY``
  when its library loads, so the variable must be set before the first ``import onnxruntime``; without
  it, a session writes ``~/.cache/Microsoft/DeveloperTools/.onnxruntime/`` and queues events for
  ``mobile.events.data.microsoft.com``. (``onnxruntime.disable_telemetry_events()`` comes too late:
  the files are written anyway.) :func:`apply` runs when ``edgepipe`` is imported, and the bench
  worker's environment carries the variable (:data:`NO_TELEMETRY_ENV`), here and on a board.
* **OpenVINO** (the converter) and **NNCF** report through the ``openvino_telemetry`` package, which
  ignores ``OPENVINO_TELEMETRY_DISABLE`` (2025.2) and whose documented opt-out (``opt_in_out
  --opt_out``) writes ``~/intel/`` and sends a "declined" event itself. Both fall back to a no-op
  when the package cannot be imported, so :func:`block_openvino` makes it unimportable before
  either is imported (the OpenVINO backend calls it before every ``import openvino``/``nncf``, in
  the build and in the bench worker); a client made earlier by the host program is told to stop.
"""

from __future__ import annotations

import contextlib
import os
import sys

NO_TELEMETRY_ENV = {"ORT_DISABLE_TELEMETRY": "1"}
_ABSENT = object()


def apply() -> None:
    """Switch off what environment variables switch off, for this process and its children."""
    os.environ.update(NO_TELEMETRY_ENV)
    ort = sys.modules.get("onnxruntime")
    if ort is not None:  # imported before edgepipe: at least stop its events
        with contextlib.suppress(Exception):  # an older onnxruntime without the call
            ort.disable_telemetry_events()


def block_openvino() -> None:
    """Make ``openvino_telemetry`` unimportable (OpenVINO and NNCF then use their no-op stubs)."""
    mod = sys.modules.get("openvino_telemetry", _ABSENT)
    if mod is _ABSENT:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]
    elif mod is not None:
        client = getattr(getattr(mod, "Telemetry", None), "_SingletonMetaClass__single_instance", None)
        if client is not None:
            client.consent = False

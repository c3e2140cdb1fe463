"""Targets: one TOML file per hardware deployment, validated when loaded.

A target names its backend and precision, the model input shape, how to calibrate, the budgets the
artifact must meet, runtime options, backend-specific ``[options]`` and, optionally, a board to
benchmark on over SSH.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgepipe._hashing import sha256_json
from edgepipe.config._schema import check_name, from_dict, load_toml, to_dict
from edgepipe.config.options import parse_options
from edgepipe.errors import ConfigError
from edgepipe.types import DEFAULT_INPUT_SHAPE

Precision = Literal["fp32", "fp16", "bf16", "int8"]
CalibrationMethod = Literal["minmax", "entropy", "percentile"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")


@dataclass(frozen=True)
class Calibration:
    """How the target's int8 scales are computed (the ``[calibration]`` table).

    Attributes:
        method: how activation ranges are found: ``minmax``, ``entropy`` or ``percentile``.
        samples: how many training samples calibrate (at least 1).
        seed: which of the training samples are drawn for calibration.
        float_layers: mixed precision: keep this many layers in float, the most sensitive to int8 first
            (per-layer sensitivity measured at compile); 0: every layer int8.
        equalize: cross-layer equalization and bias correction on the ONNX before the backend quantizes it.
        keep_float: mixed precision by name: these ONNX nodes stay in float (filled from ``float_layers`` at
            compile).
        finetune: quantization-aware fine-tuning epochs over the calibration samples with int8 simulated,
            against the fp32 model's logits, before the backend quantizes; 0: none.
        finetune_lr: the fine-tune's learning rate (Adam, cosine decay to 0).
        float_mixed_ranges: keep in float each output head that concatenates parts of very different ranges
            (a detector's boxes and scores in one tensor), found on the calibration samples, so each part
            keeps its own int8 scale (see edgepipe.quantize.ranges).
        adaround: AdaRound's optimisation steps per layer (learned up/down rounding of int8 weights on the
            calibration samples, for every backend); 0: round to nearest.

    Raises:
        ConfigError: on construction, ``samples`` < 1, ``float_layers`` or ``finetune`` < 0, or
            ``finetune_lr`` not a finite number > 0.
    """

    method: CalibrationMethod = "minmax"
    samples: int = 256
    seed: int = 0
    #: mixed precision: keep this many layers in float, the most sensitive to int8 first (per-layer
    #: sensitivity measured at compile, see edgepipe.quantize); 0: every layer int8
    float_layers: int = 0
    #: cross-layer equalization and bias correction on the ONNX before the backend quantizes it
    #: (see edgepipe.quantize.equalize)
    equalize: bool = False
    #: mixed precision by name: these ONNX nodes stay in float (filled from float_layers at compile)
    keep_float: tuple[str, ...] = ()
    #: quantization-aware fine-tuning: epochs over the calibration samples with int8 simulated, against the
    #: fp32 model's logits, before the backend quantizes (see edgepipe.quantize.finetune); 0: none
    finetune: int = 0
    #: the fine-tune's learning rate (Adam, cosine decay to 0)
    finetune_lr: float = 2e-5
    #: keep in float each output head that concatenates parts of very different ranges (a detector's boxes
    #: and scores in one tensor), found on the calibration samples (see edgepipe.quantize.ranges)
    float_mixed_ranges: bool = False
    #: AdaRound: learned int8 weight rounding, this many optimisation steps per layer on the calibration
    #: samples, before the backend quantizes (see edgepipe.quantize.adaround); 0: round to nearest
    adaround: int = 0

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ConfigError(
                f"calibration.samples = {self.samples}: the calibration set would be empty; use 1 or more"
            )
        if self.float_layers < 0:
            raise ConfigError(f"calibration.float_layers = {self.float_layers}: give 0 (every layer int8) or more")
        if self.finetune < 0:
            raise ConfigError(f"calibration.finetune = {self.finetune}: give the fine-tune's epochs (0: none)")
        if self.adaround < 0:
            raise ConfigError(f"calibration.adaround = {self.adaround}: give AdaRound's steps per layer (e.g. 500; "
                              "0: none)")
        if not (math.isfinite(self.finetune_lr) and self.finetune_lr > 0):
            raise ConfigError(f"calibration.finetune_lr = {self.finetune_lr}: give a learning rate > 0 (e.g. 2e-5)")


@dataclass(frozen=True)
class Budgets:
    """What the artifact must meet (the ``[budgets]`` table). ``None`` means no budget.

    Attributes:
        max_metric_drop: how much worse than the original model in fp32 the artifact may be on the validation
            split, in the model's metric's units (points of top-1, of mAP, dB of SQNR ...); ``None``:
            ``max_accuracy_drop``.
        max_accuracy_drop: the older name of ``max_metric_drop`` (top-1 points); 1.0 by default.
        max_latency_ms: the most p50 latency, in ms, on the measuring machine (not checked when emulated).
        max_memory_mb: the most peak resident memory above the worker's baseline, in MiB.
        max_size_mb: the most size of the artifact's files, in MB (10^6 bytes).

    Raises:
        ConfigError: on construction, a budget that is not a finite number >= 0.
    """

    #: how much worse than the original model in fp32 the artifact may be on the validation split, in the
    #: model's metric's units (points of top-1, of mAP, dB of SQNR ...); ``None``: ``max_accuracy_drop``
    max_metric_drop: float | None = None
    max_accuracy_drop: float | None = 1.0  # the older name of max_metric_drop (top-1 points)
    max_latency_ms: float | None = None  # p50 at batch 1 on the measuring machine
    max_memory_mb: float | None = None  # peak resident memory above the worker's baseline
    max_size_mb: float | None = None  # the artifact's files, in MB (10^6 bytes)

    @property
    def metric_drop(self) -> float | None:
        """The metric budget in force: ``max_metric_drop``, else its alias ``max_accuracy_drop``."""
        return self.max_metric_drop if self.max_metric_drop is not None else self.max_accuracy_drop

    def __post_init__(self) -> None:
        for name in ("max_metric_drop", "max_accuracy_drop", "max_latency_ms", "max_memory_mb", "max_size_mb"):
            v = getattr(self, name)
            if v is not None and (not math.isfinite(v) or v < 0):
                raise ConfigError(f"budgets.{name} = {v}: must be a finite number >= 0; leave it out for no budget")


@dataclass(frozen=True)
class Runtime:
    """How the artifact is run and measured (the ``[runtime]`` table).

    Attributes:
        threads: the runtime's threads (``None``: the runtime's default).
        batch: the batch size timed.
        warmup: untimed calls before timing.
        iterations: timed calls.

    Raises:
        ConfigError: on construction, ``batch`` or ``iterations`` < 1, ``warmup`` < 0, or ``threads`` < 1.
    """

    threads: int | None = None  # None: the runtime's default
    batch: int = 1
    warmup: int = 20
    iterations: int = 200

    def __post_init__(self) -> None:
        for name in ("batch", "iterations"):
            if getattr(self, name) < 1:
                raise ConfigError(f"runtime.{name} = {getattr(self, name)}: must be >= 1")
        if self.warmup < 0:
            raise ConfigError(f"runtime.warmup = {self.warmup}: must be >= 0")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"runtime.threads = {self.threads}: must be >= 1, or left out for the default")


# the largest sample (C*H*W values) a target may ask for: 64 Mi values, 256 MiB per sample in float32
MAX_SAMPLE_VALUES = 1 << 26


def _choice(*values: str) -> Callable[[str], str]:
    def check(v: str) -> str:
        for c in values:
            if v.lower() == c.lower():
                return c
        raise ValueError(" or ".join(values))
    return check


def _integer(lo: int, hi: int) -> Callable[[str], str]:
    def check(v: str) -> str:
        if not re.fullmatch(r"[0-9]{1,6}", v) or not lo <= int(v) <= hi:
            raise ValueError(f"an integer in {lo}..{hi}")
        return str(int(v))
    return check


def _algorithms(v: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9@._-]+(,[A-Za-z0-9@._-]+)*", v) or v.startswith("-"):
        raise ValueError("a plain comma-separated list of algorithm names (no '+', '-', '^' or '*')")
    return v


_QOS = r"(af[1-4][1-3]|cs[0-7]|ef|le|lowdelay|throughput|reliability|none|[0-9]{1,3})"


def _qos(v: str) -> str:
    if not re.fullmatch(rf"{_QOS}([ \t]+{_QOS})?", v, re.IGNORECASE):
        raise ValueError("one or two of af11..af43, cs0..cs7, ef, le, lowdelay, throughput, reliability, none")
    return " ".join(v.split())


def _regular_file(v: str) -> str:
    """An existing regular file (links followed, so no /dev/null), as the absolute path ssh is given."""
    p = str(Path(v).expanduser().resolve())
    if re.search(r"[\s\"'%$\\]", p):  # ssh splits on spaces and expands %, $ and ~: the file checked is the one read
        raise ValueError("a path without spaces, quotes, '\\', '%' or '$'")
    if not Path(p).is_file():
        raise ValueError("an existing regular file (not /dev/null, a directory or a missing path)")
    return p


#: the ssh options a target file may set, and what each takes: none of them runs a command, forwards
#: anything, changes which host is reached or turns host-key checking off (edgepipe forces BatchMode=yes)
SSH_OPTIONS: dict[str, Callable[[str], str]] = {
    "AddressFamily": _choice("any", "inet", "inet6"),
    "Ciphers": _algorithms,
    "Compression": _choice("yes", "no"),
    "ConnectionAttempts": _integer(1, 100),
    "ConnectTimeout": _integer(1, 3600),
    "HostKeyAlgorithms": _algorithms,
    "IdentitiesOnly": _choice("yes", "no"),
    "IdentityFile": _regular_file,
    "IPQoS": _qos,
    "KexAlgorithms": _algorithms,
    "LogLevel": _choice("QUIET", "FATAL", "ERROR", "INFO", "VERBOSE", "DEBUG", "DEBUG1", "DEBUG2", "DEBUG3"),
    "MACs": _algorithms,
    "PubkeyAcceptedAlgorithms": _algorithms,
    "ServerAliveCountMax": _integer(0, 1000),
    "ServerAliveInterval": _integer(0, 86400),
    "StrictHostKeyChecking": _choice("yes"),
    "TCPKeepAlive": _choice("yes", "no"),
    "UserKnownHostsFile": _regular_file,
}
_SSH_KEYS = {k.lower(): k for k in SSH_OPTIONS}
_BOARD_FIELDS = {"port": "board.port", "user": "board.user", "hostname": "board.host"}
# how ssh reads an `-o` value: a keyword (maybe in double quotes), then spaces/tabs and/or one '=', the argument
_SSH_OPTION = re.compile(r'("?)([A-Za-z][A-Za-z0-9]*)\1(?:[ \t]*=[ \t]*|[ \t]+)(.+)')


def ssh_option(option: str) -> tuple[str, str]:
    """One ``ssh_options`` entry, parsed the way ssh parses ``-o``, as ``(Keyword, argument)`` if the
    keyword is in :data:`SSH_OPTIONS` and its argument is one it allows.

    The normalized pair, not the original text, is what ssh is given (``-o Keyword=argument``).

    Args:
        option: ``Keyword=argument`` or ``Keyword argument`` (the keyword in any case, maybe in double quotes).

    Returns:
        The keyword as :data:`SSH_OPTIONS` spells it, and the checked, normalized argument.

    Raises:
        ConfigError: one line: the option is not text, holds control characters, is not one ssh option, its
            keyword is not allowed, or its argument is not one the keyword takes here.
    """
    allowed = (f"allowed: {', '.join(SSH_OPTIONS)}; put anything else in ~/.ssh/config (a target file is data: "
               "it may not run commands, forward, change the host or turn off host-key checking)")
    if not isinstance(option, str) or not all(c.isprintable() or c == "\t" for c in option):
        raise ConfigError(f"board.ssh_options: {option!r} holds control characters or is not text; {allowed}")
    m = _SSH_OPTION.fullmatch(option.strip(" \t"))
    if m is None:
        raise ConfigError(f"board.ssh_options: {option!r} is not one ssh option (Keyword=value); {allowed}")
    key = _SSH_KEYS.get(m[2].lower())
    if key is None:
        instead = f" (set {_BOARD_FIELDS[m[2].lower()]} instead)" if m[2].lower() in _BOARD_FIELDS else ""
        raise ConfigError(f"board.ssh_options: {option!r}: {m[2]} may not be set by a target file{instead}; {allowed}")
    try:
        return key, SSH_OPTIONS[key](m[3].strip(" \t"))
    except ValueError as e:
        raise ConfigError(f"board.ssh_options: {option!r}: {key} takes {e}; {allowed}") from None


@dataclass(frozen=True)
class Board:
    """A remote board to benchmark on over SSH (the ``[board]`` table).

    Attributes:
        host: the host name or address.
        user: the login user (``None``: ssh's default).
        port: the SSH port.
        python: the board's interpreter; needs Python >= 3.11, numpy and the artifact's runtime there.
        workdir: the directory on the board the artifact and the worker are copied into.
        identity_file: the private key ssh is given (``-i``).
        ssh_options: extra ssh/scp options, ``Keyword=value``, from an allow-list (:data:`SSH_OPTIONS`).

    Raises:
        ConfigError: on construction, an empty field or one starting with ``-``, a host or user with spaces,
            quotes or shell characters, a port outside 1..65535, or an ssh option that is not allowed.
    """

    host: str
    user: str | None = None
    port: int = 22
    python: str = "python3"  # needs Python >= 3.11, numpy and the artifact's runtime on the board
    workdir: str = "/tmp/edgepipe"
    identity_file: str | None = None
    #: extra ssh/scp options, ``Keyword=value``, from an allow-list (:data:`SSH_OPTIONS`)
    ssh_options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("host", "user", "python", "workdir", "identity_file"):
            v = getattr(self, name)
            if v is None:
                continue
            if not v or v.startswith("-"):
                raise ConfigError(f"board.{name} = {v!r}: must not be empty or start with '-' (ssh and scp would "
                                  "read it as an option)")
            if name in ("host", "user") and any(c.isspace() or ord(c) < 32 or c in "'\"`;|&$<>" for c in v):
                raise ConfigError(f"board.{name} = {v!r}: must not contain spaces, quotes or shell characters")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"board.port = {self.port}: must be in 1..65535")
        self.ssh_args()

    def ssh_args(self) -> list[str]:
        """``ssh_options`` checked and normalized, as ssh/scp arguments.

        Returns:
            ``["-o", "Keyword=value", ...]``.

        Raises:
            ConfigError: an option is not allowed (see :func:`ssh_option`).
        """
        out: list[str] = []
        for o in self.ssh_options:
            key, value = ssh_option(o)
            out += ["-o", f"{key}={value}"]
        return out

    @classmethod
    def parse(cls, spec: str) -> Board:
        """``[user@]host[:port]`` as a Board.

        Args:
            spec: ``[user@]host[:port]``.

        Returns:
            The board (port 22 when none is given; the other fields their defaults).

        Raises:
            ConfigError: no host, a port that is not a number, or a field the board refuses.
        """
        user, _, rest = spec.rpartition("@")
        host, _, port = rest.partition(":")
        if not host or (port and not port.isdigit()):
            raise ConfigError(f"board {spec!r}: give [user@]host[:port], or a target name whose file has a [board]")
        return cls(host=host, user=user or None, port=int(port) if port else 22)


@dataclass(frozen=True)
class Target:
    """A hardware deployment: backend, precision, input shape, calibration, budgets, runtime.

    Attributes:
        name: the target's name (a plain name: it names the release directory).
        backend: the backend that compiles and runs it (``onnxruntime``, ``openvino``, ``tflite``, ``tensorrt``).
        precision: ``fp32``, ``fp16``, ``bf16`` or ``int8``.
        input_shape: one shape (a one-input model), or a table of shapes by input name; any rank, batch first.
        description: one line for people.
        dynamic_batch: export and compile with a dynamic batch dimension.
        calibration: how int8 scales are computed.
        budgets: what the artifact must meet.
        runtime: how the artifact is run and measured.
        options: the backend's typed options (a dict is parsed on construction).
        board: where to benchmark over SSH (``None``: this machine).

    Raises:
        ConfigError: on construction, a bad name, an unknown backend or invalid options, an empty shape table,
            a shape that is not positive sizes or too large, or inputs with different batch sizes.
    """

    name: str
    backend: str
    precision: Precision
    #: one shape (a one-input model), or a table of shapes by input name; any rank, batch first
    input_shape: tuple[int, ...] | dict[str, tuple[int, ...]] = DEFAULT_INPUT_SHAPE
    description: str = ""
    dynamic_batch: bool = True
    calibration: Calibration = field(default_factory=Calibration)
    budgets: Budgets = field(default_factory=Budgets)
    runtime: Runtime = field(default_factory=Runtime)
    options: Any = field(default_factory=dict)  # the backend's typed options (a dict is parsed on construction)
    board: Board | None = None

    def __post_init__(self) -> None:
        check_name(self.name, "name")
        object.__setattr__(self, "options", parse_options(self.backend, self.options))
        if isinstance(self.input_shape, dict):
            if not self.input_shape:
                raise ConfigError("input_shape = {}: name at least one input, e.g. { images = [1, 3, 224, 224] }")
            shapes = {str(k): tuple(v) for k, v in self.input_shape.items()}
            object.__setattr__(self, "input_shape", shapes)
            for k, v in shapes.items():
                check_shape(v, f"input_shape.{k}")
            batches = {v[0] for v in shapes.values()}
            if len(batches) > 1:
                raise ConfigError(f"input_shape = {shapes}: every input needs the same batch size (the first "
                                  f"dimension), got {sorted(batches)}")
        else:
            object.__setattr__(self, "input_shape", tuple(self.input_shape))
            check_shape(self.input_shape, "input_shape")

    @property
    def batch(self) -> int:
        """The batch size every input's shape starts with."""
        return next(iter(self.input_shape.values()))[0] if isinstance(self.input_shape, dict) else self.input_shape[0]

    def shapes(self, names: list[str]) -> dict[str, tuple[int, ...]]:
        """The shape of each of a model's inputs (``names``, in order), from ``input_shape``.

        A single shape is the one input's; a table must name every input and no other.

        Args:
            names: the model's input names, in order.

        Returns:
            One shape per name, in that order.

        Raises:
            ConfigError: a single shape for a model with several inputs, or a table that misses an input or
                names one the model does not have.
        """
        return match_shapes(self.input_shape, names, f"target {self.name!r}: input_shape")

    @property
    def chw(self) -> tuple[int, ...]:
        """The one input's shape without its batch (C, H, W for an image model).

        Raises:
            ConfigError: the target has a shape table of several inputs.
        """
        if isinstance(self.input_shape, dict):
            if len(self.input_shape) != 1:
                raise ConfigError(f"target {self.name!r} has several inputs; they have no single sample shape")
            return next(iter(self.input_shape.values()))[1:]
        return self.input_shape[1:]

    def to_dict(self) -> dict[str, Any]:
        """The target as a TOML-ready dict (what a manifest records).

        Returns:
            Every field, tuples as lists and ``None`` values left out.
        """
        return to_dict(self)

    @property
    def sha256(self) -> str:
        """The SHA-256 of :meth:`to_dict` (as canonical JSON): what caches and manifests key the target by."""
        return sha256_json(self.to_dict())

    def with_input_shape(self, shape: tuple[int, ...] | dict[str, tuple[int, ...]]) -> Target:
        """A copy of the target with another input shape (``--input-shape``).

        Args:
            shape: one shape, or a table of shapes by input name.

        Returns:
            The new target, validated.

        Raises:
            ConfigError: the shape is invalid (as on construction).
        """
        return dataclasses.replace(self, input_shape=dict(shape) if isinstance(shape, dict) else tuple(shape))


def match_shapes(shape: tuple[int, ...] | dict[str, tuple[int, ...]], names: list[str],
                 where: str) -> dict[str, tuple[int, ...]]:
    """The shape of each of a model's inputs (``names``, in order), from one shape or a table by name.

    Args:
        shape: one shape (the one input's) or a shape per input name.
        names: the model's input names, in order.
        where: what the shapes came from, leading the error (``target 'x': input_shape``, ``--input-shape``).

    Returns:
        One shape per name, in that order.

    Raises:
        ConfigError: one shape for a model with several inputs, or a table that misses an input or names one the
            model does not have.
    """
    if not isinstance(shape, dict):
        if len(names) != 1:
            raise ConfigError(f"{where}: one shape, but the model has {len(names)} inputs ({', '.join(names)}); give "
                              "a shape per input: --input-shape NAME=d0,d1,... for each, or input_shape = "
                              "{ name = [...] } in the target")
        return {names[0]: tuple(shape)}
    unknown = sorted(set(shape) - set(names))
    missing = [n for n in names if n not in shape]
    if unknown or missing:
        raise ConfigError(f"{where} names {', '.join(unknown) or 'every input'} but the model's inputs are "
                          f"{', '.join(names)}" + (f" (no shape for {', '.join(missing)})" if missing else ""))
    return {n: tuple(shape[n]) for n in names}


def check_shape(shape: tuple[int, ...], where: str) -> None:
    """A concrete input shape: at least one dimension, every size >= 1, a sample that fits in memory.

    Args:
        shape: the shape, batch first.
        where: how the error names it (``input_shape``, ``input_shape.images``).

    Raises:
        ConfigError: no dimension, a size that is not an integer >= 1, more than :data:`MAX_SAMPLE_VALUES`
            values per sample, or a batch over 4096.
    """
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise ConfigError(f"{where} = {list(shape)}: give positive sizes, batch first (e.g. [1, 3, 224, 224], "
                          "[1, 1, 16000] or [1, 16])")
    if math.prod(shape[1:]) > MAX_SAMPLE_VALUES or shape[0] > 4096:
        raise ConfigError(f"{where} = {list(shape)}: at most {MAX_SAMPLE_VALUES:,} values per sample and a batch of "
                          "at most 4096; this would not fit in memory")


def target_from_dict(data: dict[str, Any], where: str) -> Target:
    """A target from a parsed TOML table (a target file, a manifest's ``target``).

    Args:
        data: the table.
        where: how errors name its source (``target file 'x.toml'``), prefixed to the message.

    Returns:
        The target, validated.

    Raises:
        ConfigError: an unknown key, a value of the wrong type, a missing required key, or an invalid value.
    """
    try:
        return from_dict(Target, data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def targets_dirs() -> list[Path]:
    """Where named targets are looked up, first match wins.

    Returns:
        The existing directories among ``$EDGEPIPE_TARGETS`` (os.pathsep-separated), ``./targets``, then the
        targets shipped with edgepipe, each once.
    """
    dirs = [Path(p) for p in os.environ.get("EDGEPIPE_TARGETS", "").split(os.pathsep) if p]
    dirs.append(Path.cwd() / "targets")
    here = Path(__file__).resolve().parents[1]  # the edgepipe package
    dirs += [here / "_targets", here.parent / "targets"]
    seen, out = set(), []
    for d in dirs:
        if d.is_dir() and d.resolve() not in seen:
            seen.add(d.resolve())
            out.append(d)
    return out


def target_files() -> dict[str, Path]:
    """Every named target that can be found.

    Returns:
        Name (a ``.toml`` file's stem) -> file; the first directory of :func:`targets_dirs` that has it wins.
    """
    found: dict[str, Path] = {}
    for d in targets_dirs():
        for p in sorted(d.glob("*.toml")):
            found.setdefault(p.stem, p)
    return found


def load_target(spec: str | Path) -> Target:
    """Load a target by name (``cpu-int8``) or by path to its TOML file.

    Args:
        spec: a target name (see :func:`target_files`), or a path ending in ``.toml``.

    Returns:
        The target, validated.

    Raises:
        ConfigError: an unknown name (listing the known ones), a file that does not exist or is not valid
            TOML, or an invalid target.
    """
    path = Path(spec)
    if path.suffix != ".toml":
        files = target_files()
        if str(spec) not in files:
            known = ", ".join(sorted(files)) or "(none found)"
            raise ConfigError(f"unknown target {str(spec)!r}; known targets: {known}; or give a path to a .toml file")
        path = files[str(spec)]
    if not path.is_file():
        raise ConfigError(f"target file {str(path)!r} not found")
    return target_from_dict(load_toml(path, "target"), f"target file {str(path)!r}")

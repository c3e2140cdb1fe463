"""The values that flow between stages, and the manifest that records them.

Every stage is a function from these values to one of them plus a :class:`StageRecord`; the pipeline
assembles the records into a :class:`Manifest`, which writes and reads ``manifest.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from edgepipe._hashing import sha256_arrays

if TYPE_CHECKING:
    from edgepipe.config.target import Target

#: The bundled example's input (N, C, H, W): the one place it is written.
DEFAULT_INPUT_SHAPE: tuple[int, int, int, int] = (1, 1, 32, 32)

#: 2: typed stage records, three data splits, original-model reference, candidate; 3: the model's signature, its
#: metric (any metric, in its units), fidelity to fp32 (SQNR, flip rate), budgets in the metric's units
MANIFEST_SCHEMA = 3


#: a dimension: a size, a named dynamic dimension ("batch", "height") or unknown (None)
Dim = int | str | None

#: ONNX element types by their numpy names (``onnx.TensorProto`` numbers), for the signatures read from graphs
ONNX_DTYPES: dict[int, str] = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64",
                               9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16"}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model: its name, shape (named or unknown dynamic dimensions) and numpy dtype.

    Attributes:
        name: the tensor's name (the ONNX graph's, or the ``forward`` argument's).
        shape: one :data:`Dim` per dimension, batch first: a size, a named dynamic dimension or ``None``.
        dtype: the numpy dtype name (``float32``, ``int64``, ...); ``onnx:<n>`` for an ONNX element type numpy
            lacks, ``""`` where the model does not say (a torch module's input: the data's dtype).
    """

    name: str
    shape: tuple[Dim, ...]
    dtype: str

    @property
    def rank(self) -> int:
        """The number of dimensions."""
        return len(self.shape)

    @property
    def is_float(self) -> bool:
        """Whether the dtype is a floating-point one (``float16``, ``float32``, ``bfloat16``, ...)."""
        return "float" in self.dtype

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-ready values.

        Returns:
            ``{"name", "shape" (a list), "dtype"}``.
        """
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        """The spec :meth:`to_dict` wrote.

        Args:
            d: a dict with ``name``, ``shape`` and ``dtype``.

        Returns:
            The spec, its shape as a tuple.

        Raises:
            KeyError: a key is missing.
        """
        return cls(str(d["name"]), tuple(d["shape"]), str(d["dtype"]))


@dataclass(frozen=True)
class Signature:
    """A model's inputs and outputs, in order: the value every stage reads instead of assuming one NCHW input
    and one ``[N, C]`` output.

    Attributes:
        inputs: every input, in the model's order.
        outputs: every output, in the model's order (empty where they are not known).
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...] = ()

    @property
    def input_names(self) -> list[str]:
        """The inputs' names, in order."""
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        """The outputs' names, in order."""
        return [t.name for t in self.outputs]

    def input(self, name: str) -> TensorSpec:
        """The input called ``name``.

        Args:
            name: the input's name.

        Returns:
            Its spec.

        Raises:
            KeyError: the model has no input of that name.
        """
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """The signature as JSON-ready values (as a manifest's ``signature`` holds it).

        Returns:
            ``{"inputs": [...], "outputs": [...]}``, each a list of :meth:`TensorSpec.to_dict` dicts.
        """
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Signature:
        """The signature :meth:`to_dict` wrote.

        Args:
            d: a dict with ``inputs`` and ``outputs`` lists (a missing one is empty).

        Returns:
            The signature.

        Raises:
            KeyError: a tensor lacks ``name``, ``shape`` or ``dtype``.
        """
        return cls(tuple(TensorSpec.from_dict(t) for t in d.get("inputs", [])),
                   tuple(TensorSpec.from_dict(t) for t in d.get("outputs", [])))


@dataclass(frozen=True)
class OnnxModel:
    """An exported float ONNX model on disk (single file, weights inside) and its signature.

    Attributes:
        path: the ``.onnx`` file.
        input_name: the first input's name (a one-input model's input).
        input_shape: the first input's shape.
        sha256: the file's SHA-256 (hex).
        signature: every input and output, when read from the graph (``None``: only the first input is known).
    """

    path: Path
    input_name: str  # the first input's (a one-input model's) name and shape; every input is in ``signature``
    input_shape: tuple[Dim, ...]
    sha256: str
    signature: Signature | None = None

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        """Every input: the signature's, else the first input as ``float32``."""
        if self.signature is not None:
            return self.signature.inputs
        return (TensorSpec(self.input_name, self.input_shape, "float32"),)


#: samples of a model's inputs: one array (a one-input model) or one array per input, by name (axis 0 = sample)
Samples = np.ndarray | dict[str, np.ndarray]


def sample_count(x: Samples) -> int:
    """How many samples ``x`` holds (the first dimension; every input's must agree).

    Args:
        x: one array, or one array per input name.

    Returns:
        The length of axis 0 (0 for an empty dict).

    Raises:
        ValueError: the inputs hold different sample counts.
    """
    if isinstance(x, dict):
        counts = {len(v) for v in x.values()}
        if len(counts) > 1:
            raise ValueError(f"inputs hold different sample counts: { {k: len(v) for k, v in x.items()} }")
        return counts.pop() if counts else 0
    return len(x)


def feeds_of(x: Samples, names: list[str]) -> dict[str, np.ndarray]:
    """``x`` as arrays by input name: a single array is the one input's; a dict must name every input.

    A dict of one array for a one-input model is taken whatever its key.

    Args:
        x: one array, or one array per input name.
        names: the model's input names, in order.

    Returns:
        One array per name in ``names``, in that order (extra arrays in ``x`` are left out).

    Raises:
        ValueError: a single array for a model with several inputs, or no array for one of ``names``.
    """
    if not isinstance(x, dict):
        if len(names) != 1:
            raise ValueError(f"the model has {len(names)} inputs ({', '.join(names)}); give one array per input")
        return {names[0]: x}
    if len(names) == 1 and len(x) == 1 and names[0] not in x:  # a one-input model's array under another name
        return {names[0]: next(iter(x.values()))}
    missing = [n for n in names if n not in x]
    if missing:
        raise ValueError(f"no samples for input(s) {', '.join(missing)}; the data has {', '.join(sorted(x))}")
    return {n: x[n] for n in names}


def take(x: Samples, idx: Any) -> Samples:
    """The samples ``idx`` (an index array or a slice) of every input.

    Args:
        x: one array, or one array per input name.
        idx: anything numpy indexes axis 0 with (an index array, a slice, a boolean mask).

    Returns:
        The same kind of value as ``x``, holding only those samples.
    """
    return {k: v[idx] for k, v in x.items()} if isinstance(x, dict) else x[idx]


def _sha256_samples(x: Samples) -> str:
    if isinstance(x, dict):
        return sha256_arrays(*(a for _, a in sorted(x.items())), names=sorted(x))
    return sha256_arrays(x)


@dataclass(frozen=True)
class CalibrationSet:
    """Samples from the calibration split (the method is the target's ``calibration.method``).

    ``len()`` of it is the number of calibration samples.

    Attributes:
        x: the calibration samples: one array for a one-input model or one array per input name.
        source: the split's name, as recorded in ``calibration.json``.
        validation_x: optional labelled samples for backends that check accuracy while compiling (OpenVINO's
            accuracy-controlled int8); the pipeline passes the validation split, never the test split the
            figures are reported on.
        validation_y: the labels of ``validation_x``.
        validation_source: the validation split's name.
    """

    x: Samples
    source: str = ""
    validation_x: Samples | None = None
    validation_y: np.ndarray | None = None
    validation_source: str = ""
    #: the model's own metric on outputs of ``validation_x`` (higher is better), for choices made while
    #: compiling (float layers ranked by it); ``None``: ranked by output error
    validation_score: Callable[[list[np.ndarray]], float] | None = field(default=None, compare=False)
    #: what names ``validation_score`` in a cache key (the metric, its postprocess, the split)
    validation_score_key: str = ""

    def __len__(self) -> int:
        return sample_count(self.x)

    def feeds(self, names: list[str]) -> dict[str, np.ndarray]:
        """The calibration samples by input name (see :func:`feeds_of`).

        Args:
            names: the model's input names, in order.

        Returns:
            One array per input name.

        Raises:
            ValueError: as :func:`feeds_of` does.
        """
        return feeds_of(self.x, names)

    @property
    def sha256(self) -> str:
        """The SHA-256 of the calibration samples (every input's arrays, by sorted name)."""
        return _sha256_samples(self.x)

    @property
    def validation_sha256(self) -> str | None:
        """The SHA-256 of the validation samples and labels, or ``None`` without both."""
        if self.validation_x is None or self.validation_y is None:
            return None
        if isinstance(self.validation_x, dict):
            return sha256_arrays(*(a for _, a in sorted(self.validation_x.items())), self.validation_y,
                                 names=[*sorted(self.validation_x), "y"])
        return sha256_arrays(self.validation_x, self.validation_y)

    def record(self) -> dict[str, Any]:
        """What a release's ``calibration.json`` (and a backend's metadata) records of the set.

        Returns:
            ``{"source", "samples", "sha256"}``.
        """
        return {"source": self.source, "samples": len(self), "sha256": self.sha256}


@dataclass
class Artifact:
    """A compiled model: its main file, every file that belongs with it, and what compile recorded.

    Attributes:
        backend: the backend that compiled it (and runs it).
        precision: ``fp32``, ``fp16``, ``bf16`` or ``int8`` (``""`` for a bare file whose precision is unknown).
        path: the main file (the one the backend loads).
        files: every file that belongs with it, the main one included (default: ``[path]``).
        metadata: what compile recorded (backend-specific: calibration, plan, outputs, ...).
    """

    backend: str
    precision: str
    path: Path
    files: list[Path] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not self.files:
            self.files = [self.path]

    @property
    def size_bytes(self) -> int:
        """The total size of its files in bytes (regular files only)."""
        return sum(p.stat().st_size for p in self.files if p.is_file())


@dataclass(frozen=True)
class StandIn:
    """What a machine that cannot run an artifact evaluates in its place: a model of another backend that
    computes the same function (e.g. a TensorRT bundle's Q/DQ ONNX on onnxruntime), and what that means.

    Attributes:
        artifact: the artifact evaluated instead.
        evaluates: what the accuracy measured on the stand-in stands for.
        bench: why it is not benchmarked, and where the artifact itself gets timed.
    """

    artifact: Artifact
    evaluates: str  # what the accuracy measured on the stand-in stands for
    bench: str  # why it is not benchmarked, and where the artifact itself gets timed


class Runner(Protocol):
    """A loaded artifact, ready for inference (what ``Backend.load`` returns).

    Calling it with one array per input name (``feeds``) returns every output, in the model's output order.

    Attributes:
        inputs: the model's inputs as the runtime reports them (names, shapes, dtypes).
    """

    inputs: list[TensorSpec]

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


@dataclass
class StageRecord:
    """What one stage did: its inputs and output by hash, how long it took, and whether it was cached.

    Attributes:
        name: the stage (``compress``, ``export``, ``compile``, ``evaluate``, ``bench``, ...).
        inputs: what the stage's output depends on, by name: hashes (or ``None``).
        output_sha256: the hash of its output.
        seconds: how long it took in this run.
        cached: whether its output came from the cache.
        details: stage-specific figures (written beside the other keys).
        skipped: why the stage did nothing, if it did nothing.
    """

    name: str
    inputs: dict[str, str | None] = field(default_factory=dict)
    output_sha256: str | None = None
    seconds: float = 0.0
    cached: bool = False
    details: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None

    def to_dict(self, run: bool = True) -> dict[str, Any]:
        """The record as a dict, ``details`` merged in beside the fields.

        Args:
            run: include how this run went (``seconds``, ``cached``); ``False`` leaves them out, as a manifest
                does, so that the same inputs give the same bytes whether or not the stage came from the cache.

        Returns:
            ``name``, ``inputs``, ``output_sha256``, ``skipped`` when set, and every ``details`` key.
        """
        out: dict[str, Any] = {"name": self.name, "inputs": self.inputs, "output_sha256": self.output_sha256}
        if run:
            out.update(cached=self.cached, seconds=round(self.seconds, 3))
        if self.skipped:
            out["skipped"] = self.skipped
        return {**out, **self.details}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageRecord:
        """The record :meth:`to_dict` wrote.

        Args:
            d: a dict with at least ``name``; keys other than the fields go into ``details``.

        Returns:
            The record (``seconds`` 0 and ``cached`` false where absent, as in a manifest).

        Raises:
            KeyError: ``name`` is missing.
        """
        known = {"name", "inputs", "output_sha256", "cached", "seconds", "skipped"}
        return cls(d["name"], d.get("inputs") or {}, d.get("output_sha256"), d.get("seconds", 0.0),
                   d.get("cached", False), {k: v for k, v in d.items() if k not in known}, d.get("skipped"))


@dataclass
class Accuracy:
    """The artifact's score on the model's metric (test split), against the original (uncompressed) model's fp32
    score on the same samples.

    Attributes:
        metric: the metric's name (``top1``, ``miou``, ``sqnr``, a user's ``package.module:object``, ...).
        value: the artifact's score on the test split, in the metric's units.
        reference: the original model's fp32 score on the same samples.
        drop: how much worse than the reference the artifact is, in the metric's units (positive: worse,
            whichever way the metric goes).
        dataset: the test split's name.
        samples: how many test samples were scored.
        unit: the metric's unit (``%``, ``dB``, or ``""`` for none).
        higher_is_better: which way the metric goes.
        compressed: the compressed model's fp32 score (validation; ``None`` without a recipe).
        validation_value: the artifact's score on the validation split (the figure choices were made on).
        validation_reference: the original model's fp32 score on the validation split.
        validation_drop: ``drop`` on the validation split (what the metric budget is checked against).
        validation_samples: how many validation samples were scored.
        evaluated_on: what was evaluated in the artifact's place when this machine cannot run it (a stand-in).
    """

    metric: str
    value: float
    reference: float
    drop: float
    dataset: str
    samples: int
    unit: str = "%"
    higher_is_better: bool = True
    compressed: float | None = None
    validation_value: float | None = None
    validation_reference: float | None = None
    validation_drop: float | None = None
    validation_samples: int | None = None
    evaluated_on: str | None = None

    def format(self, value: float | None) -> str:
        """``value`` in the metric's units, as tables and reports print it.

        Args:
            value: a score in the metric's units, or ``None``.

        Returns:
            ``12.34%`` for a ``%`` metric, else 4 significant digits and the unit; ``-`` for ``None``.
        """
        if value is None:
            return "-"
        return f"{value:.2f}%" if self.unit == "%" else f"{value:.4g}{' ' + self.unit if self.unit else ''}"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Accuracy:
        """The accuracy a manifest records: schema 3's fields, or schema 2's top-1 (a fraction, made percent).

        Args:
            d: a manifest's ``accuracy``; unknown keys are ignored.

        Returns:
            The accuracy.

        Raises:
            KeyError: schema 2's ``drop_points``, ``dataset`` or ``samples`` is missing.
            TypeError: schema 3's required fields are missing.
        """
        if "top1" in d and "metric" not in d:  # schema 2: top-1 as a fraction, drops in points
            pct = {k: None if d.get(k) is None else d[k] * 100 for k in
                   ("top1", "reference_top1", "compressed_top1", "validation_top1", "validation_reference_top1")}
            return cls("top1", pct["top1"], pct["reference_top1"], d["drop_points"], d["dataset"], d["samples"],
                       compressed=pct["compressed_top1"], validation_value=pct["validation_top1"],
                       validation_reference=pct["validation_reference_top1"],
                       validation_drop=d.get("validation_drop_points"), validation_samples=d.get("validation_samples"),
                       evaluated_on=d.get("evaluated_on"))
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in fields(cls)}})


@dataclass
class Budget:
    """One of the target's budgets against what was measured.

    Attributes:
        limit: the budget, in its key's units (the metric's units for ``max_metric_drop``, ms for
            ``max_latency_ms``, MiB for ``max_memory_mb``, MB of 10^6 bytes for ``max_size_mb``).
        value: what was measured, in the same units (the validation drop, the p50 latency, the peak memory
            above the worker's baseline, the artifact's size).
        ok: whether ``value`` is at most ``limit``.
    """

    limit: float
    value: float
    ok: bool


@dataclass
class FileRecord:
    """One file of a release, as the manifest records it.

    Attributes:
        name: its path relative to the release directory (POSIX separators).
        sha256: its SHA-256 (hex).
        bytes: its size in bytes.
    """

    name: str
    sha256: str
    bytes: int


@dataclass
class ArtifactRecord:
    """The artifact as a release's manifest records it.

    Attributes:
        backend: the backend that compiled it.
        precision: its precision.
        file: the main file's name in the release directory.
        files: every file of the artifact (the main one included).
        size_bytes: the files' total size in bytes.
        metadata: what compile recorded.
    """

    backend: str
    precision: str
    file: str
    files: list[FileRecord]
    size_bytes: int
    metadata: dict[str, Any] = field(default_factory=dict)


#: the largest manifest.json read (real ones are tens of KiB)
MAX_MANIFEST_BYTES = 16 << 20


@dataclass(frozen=True)
class Measurement:
    """What the bench worker measured for one artifact: latency (ms), throughput, memory, and where.

    Attributes:
        p50_ms, p90_ms, p99_ms: latency percentiles of one call, in ms.
        mean_ms, std_ms, min_ms, max_ms: the mean, standard deviation, fastest and slowest call, in ms.
        throughput_per_s: samples per second (batch / mean latency).
        load_ms: loading the artifact and its first call, in ms.
        baseline_rss_mb: the worker's resident memory before loading, in MiB.
        peak_rss_mb: its peak resident memory, in MiB.
        peak_rss_above_baseline_mb: the peak above the baseline (what the memory budget is checked against).
        iterations: the timed calls.
        warmup: the untimed calls before them.
        batch: the batch size timed.
        threads: the runtime's threads (``None``: its default).
        size_bytes: the artifact's files, in bytes.
        device_memory_mb: the GPU memory the runner took, in MiB (GPU backends only).
        backend: the artifact's backend.
        precision: the artifact's precision.
        host: the machine it ran on (node, machine, system, processor, python; ``emulated`` under qemu-user).
        eval: with ``verify``, the outputs of the release's test split where it ran (see ``worker.evaluate``).
    """

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    throughput_per_s: float
    load_ms: float
    baseline_rss_mb: float
    peak_rss_mb: float
    peak_rss_above_baseline_mb: float
    iterations: int
    warmup: int
    batch: int
    threads: int | None
    size_bytes: int = 0
    device_memory_mb: float | None = None  # GPU memory the runner took (GPU backends only)
    backend: str = ""
    precision: str = ""
    host: dict[str, Any] = field(default_factory=dict)
    #: with ``verify``: every output of the release's test split where it ran (see ``worker.evaluate``); after
    #: :func:`edgepipe.ship.verify.verified`, the metric scored from them and the comparison with this host's run
    eval: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The measurement as a dict (a manifest's ``latency``, a cached bench).

        Returns:
            Every field; ``eval`` only when there is one.
        """
        d = asdict(self)
        if d["eval"] is None:
            del d["eval"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Measurement:
        """The measurement :meth:`to_dict` wrote (a manifest's ``latency``, a cached bench, a worker's reply).

        Args:
            d: the fields; unknown keys are ignored.

        Returns:
            The measurement.

        Raises:
            TypeError: a required field is missing.
        """
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def emulated(self) -> str | None:
        """``"qemu-user"`` when the worker ran under emulation: its latency proves function, never speed."""
        return self.host.get("emulated")

    @property
    def where(self) -> str:
        """Where it was measured, in words: ``node (machine)``, with ``, emulated by qemu-user`` if so."""
        h = self.host
        return f"{h.get('node', '?')} ({h.get('machine', '?')}" + (f", emulated by {h['emulated']})"
                                                                  if h.get("emulated") else ")")


@dataclass
class Manifest:
    """Everything a release directory's ``manifest.json`` says: read it with :meth:`read`, not by key.

    Attributes:
        target: the target it was built for.
        inputs: what the build depended on: the model (spec, kind, weights' sha256), the data (name, sha256,
            split counts), the target's sha256, the recipe's and the calibration method.
        tools: the versions of the tools used, by distribution name.
        stages: one record per stage, in order.
        accuracy: the artifact's score against the original fp32 model's.
        budgets: each of the target's budgets against what was measured, by key (``max_latency_ms``, ...).
        latency: the artifact's measurement (``None``: not benchmarked).
        reference_latency: the fp32 reference's measurement, for the speed-up.
        bench_skipped: why it was not benchmarked.
        compression: the recipe's step records (``None`` without a recipe).
        candidate: which search candidate this is (release only).
        artifact: the released artifact's files (set when the release is written).
        source_onnx: the ``source.onnx`` it was compiled from.
        signature: the model's inputs and outputs (names, shapes, dtypes) as the artifact takes them.
        fidelity: how far the artifact's outputs are from the fp32 reference's on the test split (SQNR per
            output in dB; flip rates where outputs are class scores).
        schema: the manifest's schema version (:data:`MANIFEST_SCHEMA` for one written now).
    """

    target: Target
    inputs: dict[str, Any]
    tools: dict[str, str]
    stages: list[StageRecord]
    accuracy: Accuracy
    budgets: dict[str, Budget]
    latency: Measurement | None = None
    reference_latency: Measurement | None = None
    bench_skipped: str | None = None
    compression: list[dict[str, Any]] | None = None
    candidate: dict[str, Any] | None = None  # which search candidate this is (release only)
    artifact: ArtifactRecord | None = None
    source_onnx: FileRecord | None = None
    #: the model's inputs and outputs (names, shapes, dtypes) as the artifact takes them
    signature: dict[str, Any] | None = None
    #: how far the artifact's outputs are from the fp32 reference's on the test split, whatever the metric:
    #: SQNR per output (dB), flip rate overall and among confident samples (where outputs are class scores)
    fidelity: dict[str, Any] | None = None
    schema: int = MANIFEST_SCHEMA

    @property
    def name(self) -> str:
        """The target's name."""
        return self.target.name

    @property
    def budgets_ok(self) -> bool:
        """Whether every budget is met (true when there are none)."""
        return all(b.ok for b in self.budgets.values())

    def to_dict(self) -> dict[str, Any]:
        """The manifest as ``manifest.json`` holds it.

        Stage records leave out how this run went (seconds, cached), so the same inputs give the same bytes.

        Returns:
            ``schema`` first, then every field; the target with its ``sha256`` beside its settings.
        """
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["target"] = {**self.target.to_dict(), "sha256": self.target.sha256}
        d["latency"] = self.latency.to_dict() if self.latency is not None else None
        d["reference_latency"] = self.reference_latency.to_dict() if self.reference_latency is not None else None
        d["stages"] = [s.to_dict(run=False) for s in self.stages]
        d["accuracy"] = asdict(self.accuracy)
        d["budgets"] = {k: asdict(b) for k, b in self.budgets.items()}
        d["artifact"] = asdict(self.artifact) if self.artifact else None
        d["source_onnx"] = asdict(self.source_onnx) if self.source_onnx else None
        return {"schema": d.pop("schema"), **d}

    def to_json(self) -> str:
        """The text of ``manifest.json``: :meth:`to_dict` as indented JSON and a newline (other values as text)."""
        return json.dumps(self.to_dict(), indent=2, default=str) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """The manifest :meth:`to_dict` wrote (schema 2 or 3).

        Args:
            d: the parsed ``manifest.json``.

        Returns:
            The manifest.

        Raises:
            ConfigError: the target is not a table, is invalid, or its settings do not match the ``sha256``
                written beside them (edited after the build).
            KeyError: a required key is missing.
            TypeError: a record has missing or unknown fields.
        """
        a = d.get("artifact")
        art = None
        if a:
            art = ArtifactRecord(**{**a, "files": [FileRecord(**f) for f in a["files"]]})
        acc = d["accuracy"]
        return cls(
            target=_target(d["target"]), inputs=d["inputs"], tools=d.get("tools", {}),
            stages=[StageRecord.from_dict(s) for s in d.get("stages", [])],
            accuracy=Accuracy.from_dict(acc),
            budgets={k: Budget(**b) for k, b in (d.get("budgets") or {}).items()},
            latency=Measurement.from_dict(d["latency"]) if d.get("latency") else None,
            reference_latency=Measurement.from_dict(d["reference_latency"]) if d.get("reference_latency") else None,
            bench_skipped=d.get("bench_skipped"), compression=d.get("compression"), candidate=d.get("candidate"),
            artifact=art, source_onnx=FileRecord(**d["source_onnx"]) if d.get("source_onnx") else None,
            signature=d.get("signature"), fidelity=d.get("fidelity"),
            schema=d.get("schema", MANIFEST_SCHEMA),
        )

    @classmethod
    def read(cls, path: Path) -> Manifest:
        """Read ``manifest.json`` (or the one inside a release directory).

        Args:
            path: a ``manifest.json`` or a release directory.

        Returns:
            The manifest.

        Raises:
            ConfigError: the file cannot be read, is larger than :data:`MAX_MANIFEST_BYTES`, is not a manifest
                edgepipe wrote, or its target was edited after the build.
        """
        from edgepipe._fs import read_bounded
        from edgepipe.errors import ConfigError

        p = Path(path)
        if p.is_dir():
            p = p / "manifest.json"
        data = read_bounded(p, MAX_MANIFEST_BYTES, "manifest")
        try:
            return cls.from_dict(json.loads(data))
        except ConfigError as e:
            raise ConfigError(f"manifest {str(p)!r}: {e}") from None
        except (ValueError, RecursionError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"manifest {str(p)!r} is not a manifest edgepipe wrote ({type(e).__name__}: "
                              f"{str(e)[:200]}); rebuild the release") from None


def _target(d: dict[str, Any]) -> Target:
    """A manifest's target: the :class:`~edgepipe.config.Target` it was built for, checked against the
    ``sha256`` written beside it (a target edited after the build is refused)."""
    from edgepipe.config.target import target_from_dict
    from edgepipe.errors import ConfigError

    if not isinstance(d, dict):
        raise ConfigError(f"target is {type(d).__name__}, not a table")
    t = target_from_dict({k: v for k, v in d.items() if k != "sha256"}, "target")
    if "sha256" in d and d["sha256"] != t.sha256:
        raise ConfigError(f"target {t.name!r}: its sha256 {str(d['sha256'])[:12]}... is not that of its settings "
                          f"({t.sha256[:12]}...): the target was edited after the build")
    return t

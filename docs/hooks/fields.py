"""MkDocs hook: field tables generated from edgepipe's own code, so the reference cannot drift from it.

Two markers, each on a line of its own in a page:

- ``<!-- fields: package.module.Class -->`` becomes a table of the dataclass's fields: name, type, default and
  description. A description comes from the class docstring's ``Attributes:`` section, else a ``#:`` comment
  above the field, else its trailing ``# comment``; a field with none of these is described here, in
  ``EXTRA`` (so nothing in ``edgepipe/`` has to change for the docs). A field named in the class's docstring
  prose (````name````) reads "see above", and the docstring is printed above the table. A field that is
  described nowhere fails the build (``mkdocs build --strict`` runs in the tests).
- ``<!-- keys: NAME -->`` becomes a table of one object of ``index.json``: its keys are read from the source
  of the functions that write it (``INDEX[NAME]["from"]``, dict displays, ``d["key"] = ...`` and
  ``d.update(key=...)``), described in ``INDEX[NAME]["keys"]``. A key in the code that is not described here,
  or a description of a key the code no longer writes, fails the build.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import io
import re
import textwrap
import tokenize
from typing import Any

from mkdocs.exceptions import PluginError

FIELDS = re.compile(r"^<!-- fields: ([\w.]+) -->$", re.M)
KEYS = re.compile(r"^<!-- keys: ([\w.-]+) -->$", re.M)

#: descriptions of fields whose class documents them nowhere (keyed ``module.Class.field``)
EXTRA: dict[str, str] = {
    # onnxruntime's [options]: read from edgepipe/backends/onnxruntime.py and the backend's page
    "edgepipe.config.options.OrtOptions.activation_type": "``uint8`` (U8S8: unsigned activations, signed weights; "
        "fuses every Conv on VNNI CPUs), ``int8`` (S8S8, onnxruntime's own default), or ``uint16``/``int16`` (16-bit "
        "Q/DQ activations, computed in float between them: accuracy int8 cannot hold, at about fp32's speed)",
    "edgepipe.config.options.OrtOptions.per_channel": "per-channel int8 weights (``false``: one scale per tensor)",
    "edgepipe.config.options.OrtOptions.reduce_range": "7-bit weights, for CPUs without VNNI, where U8S8's 8-bit "
        "products saturate",
    "edgepipe.config.options.OrtOptions.calibration_batch": "samples per calibration batch fed to onnxruntime's "
        "calibrator",
    "edgepipe.config.options.TFLiteOptions.delegate_library": "the GPU delegate's shared library "
        "(``delegate = \"gpu\"``)",
    "edgepipe.config.options.TrtOptions.max_batch": "the optimization profile's largest batch (dynamic-batch "
        "models)",
    # recipes
    "edgepipe.config.recipe._RecipeTop.finetune": "the shared fine-tuning loop, the ``[finetune]`` table (below)",
    "edgepipe.config.recipe._RecipeTop.distill": "the optional distillation objective, the ``[distill]`` table "
        "(below); without it the fine-tune is plain cross-entropy (or distillation from the original model for "
        "a model that is not a one-output classifier)",
    "edgepipe.config.recipe._RecipeTop.name": "the recipe's name, as the manifest records it",
    "edgepipe.config.recipe.FinetuneConfig.epochs": "epochs of the shared fine-tuning loop",
    "edgepipe.config.recipe.FinetuneConfig.lr": "its learning rate",
    "edgepipe.config.recipe.FinetuneConfig.optimizer": "``adamw`` or ``sgd``",
    "edgepipe.config.recipe.FinetuneConfig.weight_decay": "the optimizer's weight decay",
    "edgepipe.config.recipe.FinetuneConfig.momentum": "SGD's momentum",
    "edgepipe.config.recipe.FinetuneConfig.batch_size": "training batch size",
    "edgepipe.config.recipe.FinetuneConfig.seed": "the seed of the batches' order (fine-tunes are deterministic)",
    "edgepipe.config.recipe.DistillConfig.kind": "``soft`` (T² · KL + CE), ``hard`` (the teacher's argmax as "
        "labels) or ``intermediate`` (FitNets hints between named layers)",
    "edgepipe.config.recipe.DistillConfig.teacher_weights": "the teacher factory's weights (safetensors or a "
        "state dict)",
    "edgepipe.config.recipe.DistillConfig.temperature": "the softmax temperature T of ``soft``",
    "edgepipe.config.recipe.DistillConfig.hint_weight": "the weight of the hint losses of ``intermediate``",
    # search spaces
    "edgepipe.config.search.SearchSpace.recipes": "the recipes every target tries (``none``, a shipped name, or a "
        "path)",
    "edgepipe.config.search.SearchSpace.settings": "per backend (``[onnxruntime]``, ``[openvino]``, ...): a list "
        "of values (searched exhaustively) or a range table per key: ``precision``, ``calibration``, "
        "``calibration_samples``, ``equalize``, ``float_layers``, ``finetune``, or any ``[options]`` field",
    "edgepipe.config.search.SearchSpace.max_trials": "candidates per target; more combinations (or a range) "
        "switch to Optuna; ``--max-trials`` overrides",
    "edgepipe.config.search.SearchSpace.noise": "latencies within this fraction of the fastest tie",
    "edgepipe.config.search.SearchSpace.sampler": "Optuna's sampler: ``tpe`` or ``nsga2`` (seeded)",
    "edgepipe.config.search.SearchSpace.seed": "the sampler's seed",
    "edgepipe.config.search.SearchSpace.name": "the space's name (the file's stem)",
    "edgepipe.config.search.Range.low": "the lowest value",
    "edgepipe.config.search.Range.high": "the highest value (inclusive)",
    "edgepipe.config.search.Range.step": "the grid's step (``None``: continuous)",
    "edgepipe.config.search.Range.log": "sample on a log scale (``low`` > 0)",
    "edgepipe.config.search.Range.integer": "sample integers",
    # the technique tables whose class docstring does not name them
    "edgepipe.config.techniques.MagnitudePruneConfig.module_types": "the layer types pruned: ``Conv1d``, "
        "``Conv2d``, ``Conv3d``, ``Linear``",
    "edgepipe.config.techniques.TaylorPruneConfig.batch_size": "the batch size of those batches",
    "edgepipe.config.techniques.StructuredPruneConfig.batch_size": "the batch size of the ``taylor`` batches",
    "edgepipe.config.techniques.LowRankConfig.rank": "how ranks are chosen: ``energy`` (keep ``energy`` of the "
        "squared singular values, or meet a ``macs``/``params`` budget) or ``vbmf`` (variational Bayesian "
        "matrix factorization estimates each layer's rank)",
    "edgepipe.config.techniques.LowRankConfig.ignored_layers": "layers never factorised",
    "edgepipe.config.techniques.LowRankConfig.min_rank": "no layer's rank goes below this",
    "edgepipe.config.techniques.LowRankConfig.tucker_iterations": "iterations of the Tucker-2 decomposition "
        "(tensorly) for a conv",
    "edgepipe.config.techniques.ShareConfig.bits": "bits per layer kind (``conv``, ``linear``) or per layer name, "
        "1..16 (2 to 65,536 shared values); layers with no entry stay as they are",
    "edgepipe.config.techniques.ShareConfig.ignored_layers": "layers never shared",
    "edgepipe.config.techniques.ShareConfig.init": "k-means centroid initialisation: ``linear`` (Deep "
        "Compression's best), ``density`` or ``random``",
    "edgepipe.config.techniques.ShareConfig.seed": "k-means' seed",
    "edgepipe.config.techniques.HashingConfig.ignored_layers": "layers never hashed",
    "edgepipe.config.techniques.HashingConfig.seed": "the hash's seed (kept in the ``.epk`` archive)",
}

#: index.json, object by object: the functions that write it and what each key means
INDEX: dict[str, dict[str, Any]] = {
    "index": {
        "from": ["edgepipe.release.release_index:return"],
        "keys": {
            "schema": "index.json's schema version (3: the finalists' re-timing, 2: the metric by name and unit)",
            "model": "the model released (its spec as given, or the bundled example)",
            "search": "the search space as read: see [search spaces](toml.md#search-spaces)",
            "search_sha256": "the search space's hash",
            "targets": "one object per target, by name (below)",
        },
    },
    "target": {
        "from": ["edgepipe.release.release_index:entry"],
        "keys": {
            "status": "``released``, ``failed`` (no candidate meets the budgets) or ``skipped`` (cannot build here)",
            "backend": "the target's backend",
            "reason": "why it failed or was skipped (``null`` when released)",
            "budgets": "the target's budgets that are set, by key",
            "release_dir": "``<target>/`` when released, else ``null``",
            "chosen": "the chosen candidate's id",
            "metric": "the model's metric: ``name``, ``unit``, ``higher_is_better``",
            "metric.name": "the metric's name (``top1``, ``map50``, a user's ``pkg.mod:obj``)",
            "metric.unit": "its unit (``%``, ``dB`` or empty)",
            "metric.higher_is_better": "which way it goes",
            "reference": "the original model's fp32 figures: ``validation``, ``test``, ``p50_ms``, ``emulated``",
            "reference.validation": "its metric on the validation split (the budgets' reference)",
            "reference.test": "its metric on the test split",
            "reference.p50_ms": "its p50 latency where the target's artifacts are timed",
            "reference.emulated": "``qemu-user`` when that timing ran under emulation",
            "candidates": "every candidate tried (below)",
            "finalists": "the finalists' re-timing (below), or ``null``",
        },
    },
    "candidate": {
        "from": ["edgepipe.pipeline.search.Candidate.to_dict", "edgepipe.pipeline.search.Tried.to_dict",
                 "edgepipe.pipeline.search.Tried.misses", "edgepipe.release.release_index:d"],
        "keys": {
            "id": "the candidate's id (a hash of its recipe and settings)",
            "recipe": "its recipe (``none``, a name or a path)",
            "settings": "its backend settings (calibration, options ...)",
            "qualifies": "whether it meets every budget",
            "pareto": "whether it is on the Pareto front of validation metric, latency and size",
            "error": "why it could not be built (only then; no figures follow)",
            "validation": "its metric on the validation split, in the metric's units",
            "validation_drop": "how much worse than the reference on validation (what the budget checks)",
            "test": "its metric on the test split",
            "test_drop": "how much worse than the reference on test",
            "sqnr_db": "SQNR of each output against the fp32 model's, in dB (fidelity)",
            "flip_rate": "samples whose top-1 changed, where the first output is class scores (fidelity)",
            "p50_ms": "its p50 latency (``null``: not timed here)",
            "peak_memory_mb": "peak resident memory above the worker's baseline, MiB",
            "size_bytes": "the artifact's files, in bytes",
            "emulated": "``qemu-user`` when timed under emulation, which proves function only (never a board's "
                        "latency)",
            "missed": "each budget it misses, by key: ``{value, limit}``",
            "missed.value": "what was measured",
            "missed.limit": "the budget",
            "why": "why it was chosen, a finalist, rejected or could not be built, in words",
        },
    },
    "finalists": {
        "from": ["edgepipe.harness.rounds.Retiming.to_dict", "edgepipe.release._finalists"],
        "keys": {
            "ids": "the finalists' candidate ids (empty when the re-timing was skipped)",
            "skipped": "why there was no re-timing (e.g. nothing can be timed here)",
            "rounds": "interleaved rounds run",
            "iterations": "timed calls per finalist per round",
            "where": "the machine they were timed on",
            "p50_ms": "per finalist, its p50 in each round",
            "ratio": "per finalist, the median over rounds of its p50 over the fastest's in the same round",
            "spread": "per finalist, the lowest and highest per-round ratio",
            "within_noise": "whether the two fastest are within the search's ``noise`` (then size, then accuracy, "
                            "choose)",
        },
    },
}


def _attributes(doc: str) -> dict[str, str]:
    """The ``Attributes:`` section of a Google-style docstring, by field name (``a, b: ...`` names both)."""
    out: dict[str, str] = {}
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return out
    base = len(lines[start]) - len(lines[start].lstrip())
    names: list[str] = []
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= base:
            break
        m = re.match(r"\s*([\w, ]+):\s*(.*)$", line)
        if m and indent == base + 4:
            names = [n.strip() for n in m.group(1).split(",")]
            for n in names:
                out[n] = m.group(2)
        else:
            for n in names:
                out[n] += " " + line.strip()
    return out


def _prose(doc: str) -> str:
    """The docstring without its sections (Attributes, Raises, ...)."""
    kept = []
    for line in doc.splitlines():
        if re.fullmatch(r"(Attributes|Raises|Args|Returns|Example|Examples):", line.strip()):
            break
        kept.append(line)
    return "\n".join(kept).strip()


def _comments(cls: type) -> tuple[dict[str, str], dict[str, str], dict[str, tuple[str, str]]]:
    """Per field of the class body: its ``#:`` comment, its trailing comment, and (type, default) as written."""
    src = textwrap.dedent(inspect.getsource(cls))
    tree = ast.parse(src)
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef)).body
    lines = src.splitlines()
    trailing: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT and lines[tok.start[0] - 1][:tok.start[1]].strip():
            trailing[tok.start[0]] = tok.string.lstrip("#").strip()
    above: dict[str, str] = {}
    after: dict[str, str] = {}
    written: dict[str, tuple[str, str]] = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name = node.target.id
        block = []
        i = node.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#:"):
            block.insert(0, lines[i].strip()[2:].strip())
            i -= 1
        if block:
            above[name] = " ".join(block)
        if node.end_lineno in trailing:
            after[name] = trailing[node.end_lineno]
        default = ""
        if node.value is not None:
            v = node.value
            if isinstance(v, ast.Call) and getattr(v.func, "id", "") == "field":
                kw = {k.arg: k.value for k in v.keywords}
                if "default_factory" in kw:
                    f = kw["default_factory"]
                    default = "{}" if getattr(f, "id", "") == "dict" else (
                        ast.unparse(f.body) if isinstance(f, ast.Lambda) else f"{ast.unparse(f)}()")
                elif "default" in kw:
                    default = ast.unparse(kw["default"])
            else:
                default = ast.unparse(v)
        written[name] = (ast.unparse(node.annotation), default)
    return above, after, written


def _text(text: str) -> str:
    """Docstring markup (reST double backticks, Sphinx roles) as Markdown."""
    return re.sub(r":(?:data|class|func|meth|mod|attr):`~?([^`]+)`", r"`\1`", text).replace("``", "`")


def _md(text: str) -> str:
    """The same, on one table cell."""
    return _text(text).replace("|", "\\|").replace("\n", " ")


def _doc(c: type) -> str:
    """The class's own docstring (not a base's, nor the signature ``@dataclass`` writes for a class without one)."""
    doc = inspect.cleandoc(c.__dict__.get("__doc__") or "")
    return "" if doc.startswith(f"{c.__name__}(") else doc


def fields_table(path: str) -> str:
    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if not dataclasses.is_dataclass(cls):
        raise PluginError(f"fields: {path} is not a dataclass")
    attrs = _attributes(_doc(cls))
    rows = ["| field | type | default | description |", "|---|---|---|---|"]
    missing = []
    # a subclass's fields: the base's written source holds theirs
    chain = [c for c in cls.__mro__ if dataclasses.is_dataclass(c)]
    notes: dict[str, tuple[str, str, str, str]] = {}
    for c in reversed(chain):
        above, after, written = _comments(c)
        for f, (tp, default) in written.items():
            notes[f] = (above.get(f, ""), after.get(f, ""), tp, default)
            if f in _attributes(_doc(c)):
                attrs.setdefault(f, _attributes(_doc(c))[f])
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        above, after, tp, default = notes.get(f.name, ("", "", str(f.type), ""))
        desc = (attrs.get(f.name) or above or after or EXTRA.get(f"{path}.{f.name}")
                or next((EXTRA[f"{c.__module__}.{c.__qualname__}.{f.name}"] for c in chain
                         if f"{c.__module__}.{c.__qualname__}.{f.name}" in EXTRA), None))
        if not desc and re.search(rf"``{re.escape(f.name)}(\s*=[^`]*)?``", "\n".join(
                _prose(_doc(c)) for c in chain)):
            desc = "see above"
        if not desc:
            missing.append(f.name)
            continue
        rows.append(f"| `{f.name}` | `{_md(tp)}` | {f'`{_md(default)}`' if default else 'required'} | {_md(desc)} |")
    if missing:
        raise PluginError(f"fields: {path} has undocumented fields {missing}: document them in its docstring "
                          f"(Attributes:) or in docs/hooks/fields.py's EXTRA")
    head = ""
    if any("see above" in r for r in rows):  # the prose of the class (and of the classes it extends)
        head = "".join(_text(_prose(_doc(c))) + "\n\n" for c in chain if _prose(_doc(c)))
    return head + "\n".join(rows)


def _function(spec: str) -> ast.AST:
    target, _, part = spec.partition(":")
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        break
    node = ast.parse(textwrap.dedent(inspect.getsource(obj))).body[0]
    if not part:
        return node
    if part == "return":  # the dict the function returns
        return ast.Module(body=[n for n in ast.walk(node) if isinstance(n, ast.Return)
                                and isinstance(n.value, ast.Dict)], type_ignores=[])
    # the dict assigned to a name (``entry = {...}``) and every ``entry["key"] = ...`` of the function
    mine = [n for n in ast.walk(node) if isinstance(n, ast.Assign | ast.AnnAssign) and any(
        (isinstance(t, ast.Name) and t.id == part)
        or (isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and t.value.id == part)
        for t in (n.targets if isinstance(n, ast.Assign) else [n.target]))]
    if not mine:
        raise PluginError(f"keys: {spec}: the function sets no {part!r}")
    return ast.Module(body=mine, type_ignores=[])


def _keys(node: ast.AST) -> set[str]:
    found: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Dict):
            found |= {k.value for k in n.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
        elif isinstance(n, ast.Assign | ast.AnnAssign):
            for t in n.targets if isinstance(n, ast.Assign) else [n.target]:
                if isinstance(t, ast.Subscript) and isinstance(t.slice, ast.Constant) and isinstance(t.slice.value, str):
                    found.add(t.slice.value)
        elif isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "update":
            found |= {k.arg for k in n.keywords if k.arg}
    return found


def keys_table(name: str) -> str:
    spec = INDEX.get(name)
    if spec is None:
        raise PluginError(f"keys: no index.json object {name!r} in docs/hooks/fields.py")
    in_code: set[str] = set()
    for f in spec["from"]:
        in_code |= _keys(_function(f))
    documented = {k.rpartition(".")[2] for k in spec["keys"]}
    if in_code - documented or documented - in_code:
        raise PluginError(f"keys: index.json's {name!r} object: written but not documented: "
                          f"{sorted(in_code - documented)}; documented but no longer written: "
                          f"{sorted(documented - in_code)} (docs/hooks/fields.py's INDEX)")
    rows = ["| key | description |", "|---|---|"]
    rows += [f"| `{k}` | {_md(v)} |" for k, v in spec["keys"].items()]
    return "\n".join(rows)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    markdown = FIELDS.sub(lambda m: fields_table(m.group(1)), markdown)
    return KEYS.sub(lambda m: keys_table(m.group(1)), markdown)

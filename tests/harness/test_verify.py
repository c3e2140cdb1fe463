"""``--verify`` for any model: the worker where it runs (here: a board behind a real sshd on 127.0.0.1) feeds every
input of the release's test split and returns every output; this host scores them with the release's metric
through the registry and compares them, output by output, with its own run of the same file.

A manifest names its metric but cannot choose code: a user metric, or the postprocess a release was scored
after, is computed only when the caller passes it. A reply whose outputs do not match what they claim, or that
would not fit the reply limit, is refused in one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_trust_board import GOOD, _hostile, _target_file

from edgepipe import api
from edgepipe.errors import BenchmarkError, ConfigError
from edgepipe.models.tasks import TASKS

USER_METRICS = '''
def mean_score(outputs, targets):
    """A user metric: the mean of the first output (code, so never chosen by a manifest)."""
    return float(outputs[0].mean())
'''


def _target(path: Path, precision: str) -> Path:
    path.write_text(f'backend = "onnxruntime"\nprecision = "{precision}"\n[runtime]\nthreads = 1\n'
                    '[calibration]\nsamples = 64\n')
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    """Releases of the task models, built once per module on demand: ``built(name) -> release dir``.

    Labels are random (not the fp32 model's own answers), so the metric is far from 100 and a verify that
    scored other outputs, or other samples, would not reproduce the manifest's value.
    """
    root = tmp_path_factory.mktemp("verify-releases")
    (root / "verifymetrics.py").write_text(USER_METRICS)
    made: dict[str, Path] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))

        def build(kind: str) -> Path:
            if kind in made:
                return made[kind]
            r = np.random.default_rng(1)
            options: dict[str, object] = {}
            if kind in ("image_vector", "user_metric"):
                task = TASKS["image_vector"]
                arrays = {**task.inputs(), "y": r.integers(0, 10, task.samples)}
                if kind == "user_metric":
                    options["metric"] = "verifymetrics:mean_score"
            elif kind == "segmenter":
                task = TASKS["segmenter"]
                arrays = {**task.inputs(), "y": r.integers(0, 4, (task.samples, 32, 32))}
                options["metric"] = "miou"
            elif kind == "detector":
                task = TASKS["detector"]
                arrays = task.data()
                options.update(metric="map50", postprocess=task.postprocess)
            else:  # a one-input classifier
                task = TASKS["audio"]
                arrays = {**task.inputs(), "y": r.integers(0, 6, task.samples)}
            data = root / f"{kind}.npz"
            np.savez(data, **arrays)
            precision = "int8" if kind in ("image_vector", "segmenter") else "fp32"
            target = _target(root / f"{kind}.toml", precision)
            res = api.build(f"edgepipe.models.tasks:{task.name}", [str(target)], out=root / "dist", data=str(data),
                            input_shape=task.shapes, bench=False, allow_accuracy_drop=True, **options)
            made[kind] = res.results[0].release_dir
            return made[kind]

        yield build


def _manifest(release: Path) -> dict:
    return json.loads((release / "manifest.json").read_text())


def _bench_on_board(release: Path, board, tmp_path: Path, monkeypatch, capsys, *extra: str) -> dict:
    """``edgepipe bench RELEASE --device <the loopback board> --verify --json``, in this process."""
    from edgepipe.cli import main

    _target_file(tmp_path / "targets", "loopback", board)
    monkeypatch.setenv("EDGEPIPE_TARGETS", str(tmp_path / "targets"))
    with pytest.raises(SystemExit) as e:
        main(["bench", str(release), "--device", "loopback", "--verify", "--threads", "1", "--iterations", "5",
              "--warmup", "1", "--json", *extra])
    out = capsys.readouterr()
    assert e.value.code == 0, out.err
    return json.loads(out.out)


def test_a_two_input_model_is_verified_on_a_board_output_by_output(built, loopback_board, tmp_path, monkeypatch,
                                                                   capsys):
    rel = built("image_vector")
    mf = _manifest(rel)
    assert [t["name"] for t in mf["signature"]["inputs"]] == ["image", "feats"]
    m = _bench_on_board(rel, loopback_board, tmp_path, monkeypatch, capsys)
    ev = m["eval"]
    acc = mf["accuracy"]
    assert ev["samples"] == ev["of"] == acc["samples"] == 48 and ev["note"] is None
    assert ev["metric"] == "top1" and ev["metric_matches_release"] and ev["metric_skipped"] is None
    assert 0 < acc["value"] < 60  # random labels: the figure means something
    assert ev["value"] == pytest.approx(acc["value"]) and ev["release_value"] == acc["value"]
    assert ev["top1"] == pytest.approx(acc["value"] / 100) and ev["release_top1"] == pytest.approx(acc["value"] / 100)
    assert ev["outputs"] == [{"name": "logits", "shape": [48, 10], "dtype": "float32"}]
    c = ev["comparison"]
    (out,) = c["outputs"]
    # the same int8 file, the same onnxruntime: the board's answers are this host's
    assert out["name"] == "logits" and out["shape"] == [48, 10] and out["sqnr_db"] >= 100
    assert out["agreement"] == 1.0 and out["max_abs_diff"] < 1e-5
    assert c["agreement"] == 1.0 and c["here_top1"] == c["there_top1"] == pytest.approx(acc["value"] / 100)
    assert c["min_sqnr_db"] == out["sqnr_db"] and "b64" not in json.dumps(ev)  # the bytes are not kept


def test_a_segmenter_scored_by_miou_is_verified_on_a_board(built, loopback_board, tmp_path, monkeypatch, capsys):
    rel = built("segmenter")
    acc = _manifest(rel)["accuracy"]
    assert acc["metric"] == "miou" and 0 < acc["value"] < 60
    m = _bench_on_board(rel, loopback_board, tmp_path, monkeypatch, capsys)
    ev = m["eval"]
    assert ev["metric"] == "miou" and ev["unit"] == acc["unit"]
    assert ev["value"] == pytest.approx(acc["value"]) and ev["release_value"] == acc["value"]
    assert ev["top1"] is None and ev["release_top1"] is None  # not a classifier
    c = ev["comparison"]
    (out,) = c["outputs"]
    assert out["shape"] == [48, 4, 32, 32] and out["sqnr_db"] >= 100 and out["agreement"] is None
    assert c["agreement"] is None and c["here_top1"] is None
    # the table names the metric and each output
    from edgepipe.cli import main

    with pytest.raises(SystemExit):
        main(["bench", str(rel), "--device", "loopback", "--verify", "--iterations", "3", "--warmup", "0"])
    table = capsys.readouterr().out
    assert "miou there" in table and "(release: " in table and "there vs here" in table


def test_a_user_metric_named_by_the_manifest_is_not_run_unless_the_caller_names_it(built, cli_error, capsys):
    rel = built("user_metric")
    acc = _manifest(rel)["accuracy"]
    assert acc["metric"] == "verifymetrics:mean_score"
    m = api.bench(rel, verify=True, iterations=3, warmup=0, threads=1)
    ev = m.eval
    assert ev["value"] is None and "code" in ev["metric_skipped"] and "--metric verifymetrics:mean_score" in \
        ev["metric_skipped"]
    assert ev["comparison"]["outputs"][0]["sqnr_db"] >= 100  # fidelity is still reported
    m = api.bench(rel, verify=True, iterations=3, warmup=0, threads=1, metric="verifymetrics:mean_score")
    assert m.eval["metric_skipped"] is None and m.eval["metric_matches_release"]
    assert m.eval["value"] == pytest.approx(acc["value"])
    with pytest.raises(ConfigError, match="unknown metric 'nope'"):  # before any work
        api.bench(rel, verify=True, metric="nope")
    with pytest.raises(ConfigError, match="add --verify"):
        api.bench(rel, metric="top1")
    # the command line: --metric computes it; a bad one is one line
    from edgepipe.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", str(rel), "--verify", "--metric", "verifymetrics:mean_score", "--iterations", "2", "--json"])
    assert e.value.code == 0
    assert json.loads(capsys.readouterr().out)["eval"]["value"] == pytest.approx(acc["value"])
    assert "unknown metric 'nope'" in cli_error("bench", str(rel), "--verify", "--metric", "nope")
    assert "add --verify" in cli_error("bench", str(rel), "--metric", "top1")


def test_a_release_scored_after_a_postprocess_needs_it_named(built):
    rel = built("detector")
    acc = _manifest(rel)["accuracy"]
    assert acc["metric"] == "map50"
    m = api.bench(rel, verify=True, iterations=3, warmup=0, threads=1)
    assert m.eval["value"] is None and "postprocess" in m.eval["metric_skipped"]
    c = m.eval["comparison"]
    assert [o["shape"][1:] for o in c["outputs"]] == [[8, 4], [8]] and min(o["sqnr_db"] for o in c["outputs"]) >= 100
    m = api.bench(rel, verify=True, iterations=3, warmup=0, threads=1, postprocess=TASKS["detector"].postprocess)
    assert m.eval["metric_matches_release"] and m.eval["value"] == pytest.approx(acc["value"])


def test_outputs_beyond_the_reply_limit_are_cut_to_what_fits_and_one_sample_too_many_is_one_line(built,
                                                                                                 monkeypatch):
    from edgepipe import harness

    rel = built("segmenter")
    one = 4 * -(-(4 * 32 * 32 * 4) // 3)  # one sample's [4, 32, 32] float32 output as base64
    monkeypatch.setattr(harness, "EVAL_REPLY_BYTES", 5 * one + 600)
    ev = api.bench(rel, verify=True, iterations=2, warmup=0, threads=1).eval
    assert ev["samples"] == 5 and ev["of"] == 48 and "first 5 of 48 samples" in ev["note"]
    assert ev["comparison"]["samples"] == 5 and ev["comparison"]["outputs"][0]["sqnr_db"] >= 100
    monkeypatch.setattr(harness, "EVAL_REPLY_BYTES", 1000)
    with pytest.raises(BenchmarkError, match=rf"one sample take {one} bytes .* more than the 1000 bytes .*none of the "
                                             r"48 samples") as e:
        api.bench(rel, verify=True, iterations=2, warmup=0)
    assert "\n" not in str(e.value)


def test_an_old_eval_file_and_an_old_images_reply_still_verify_a_one_input_classifier(built, tmp_path):
    """Files written before every input was named (``x``, ``y``), and replies of images built before every output
    was returned (``top1`` and ``logits``), keep working for one-input, one-output classifiers."""
    import base64
    import dataclasses

    from edgepipe import backends
    from edgepipe.harness import Measurement, worker
    from edgepipe.release import artifact_from_release
    from edgepipe.ship import verify

    rel = built("audio")
    split = verify.eval_data(rel)
    old = tmp_path / "old.npz"
    np.savez(old, x=split.x.astype(np.float64), y=split.y)  # float64: fed as the float32 the model takes
    art = artifact_from_release(rel)
    runner = backends.get(art.backend).load(art, 1)
    rec = worker.evaluate(runner, str(old))
    (logits,) = worker.decode_outputs(rec)
    assert rec["samples"] == rec["of"] == len(split.y) and logits.shape == (len(split.y), 6)
    legacy = {"top1": 0.0, "samples": len(logits), "dataset": "old.npz",
              "logits": {"shape": list(logits.shape), "float32_b64": base64.b64encode(logits.tobytes()).decode()}}
    m = api.bench(rel, iterations=2, warmup=0)
    v = verify.verified(dataclasses.replace(m, eval=legacy), rel, split.x, split.all_targets)
    acc = _manifest(rel)["accuracy"]
    assert v.eval["value"] == pytest.approx(acc["value"]) and v.eval["top1"] == pytest.approx(acc["value"] / 100)
    assert v.eval["comparison"]["agreement"] == 1.0 and isinstance(v, Measurement)


def test_the_worker_verifies_a_release_without_anything_above_the_harness(built, tmp_path):
    """The runtime images' entrypoint (``--release DIR --eval FILE``) imports neither the release module nor the
    pipeline, metrics, data or torch: the worker stays what a board's plain Python can run."""
    from edgepipe.ship import verify

    rel = built("image_vector")
    verify.write_eval(rel, tmp_path / "eval.npz")
    block = tmp_path / "block"
    block.mkdir()
    banned = ("torch", "onnxscript", "sklearn", "edgepipe.release", "edgepipe.pipeline", "edgepipe.api",
              "edgepipe.cli", "edgepipe.ship", "edgepipe.metrics", "edgepipe.compress", "edgepipe.data")
    (block / "sitecustomize.py").write_text(f"import sys\nfor m in {banned!r}:\n    sys.modules[m] = None\n")
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-m", "edgepipe.harness.worker", "--release", str(rel), "--eval",
                        str(tmp_path / "eval.npz"), "--iterations", "2", "--warmup", "0"], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": f"{block}{os.pathsep}{root}"})
    reply = json.loads(r.stdout.strip().splitlines()[-1])
    assert reply["ok"], reply
    (out,) = reply["eval"]["outputs"]
    assert out["name"] == "logits" and out["shape"] == [48, 10] and out["dtype"] == "float32"


# ---------------------------------------------------------------------------------------------------------
# a board's reply is checked before it is used


def _outputs_reply(outputs: list[dict], samples: int = 2, **extra: object) -> str:
    return json.dumps({**GOOD, "eval": {"samples": samples, "of": samples, "dataset": "eval.npz", "outputs": outputs,
                                        **extra}})


def _out(shape: list[int], dtype: str = "float32", nbytes: int | None = None, **extra: object) -> dict:
    import base64

    size = nbytes if nbytes is not None else int(np.prod(shape)) * np.dtype(dtype if dtype != "object" else "f4").itemsize
    return {"name": "scores", "shape": shape, "dtype": dtype, "b64": base64.b64encode(b"\0" * size).decode(), **extra}


BAD_OUTPUTS = {
    "short bytes": (_outputs_reply([_out([2, 10], nbytes=4)]), r"b64: expected base64 of 2 x 10 float32 values"),
    "long bytes": (_outputs_reply([_out([2, 3, 4], "int64", nbytes=2 * 3 * 4 * 8 + 8)]),
                   r"b64: expected base64 of 2 x 3 x 4 int64 values"),
    "other samples": (_outputs_reply([_out([2, 10]), _out([3, 10])]), r"output 1 holds 3 samples, not the 2"),
    "object dtype": (_outputs_reply([_out([2, 10], "object")]), r"dtype = 'object': expected one of"),
    "rank 9": (_outputs_reply([_out([2] + [1] * 8)]), r"expected a list of 1 to 8 sizes"),
    "negative size": (_outputs_reply([_out([2, -1], nbytes=0)]), r"expected a list of 1 to 8 sizes"),
    "too many outputs": (_outputs_reply([_out([2, 1])] * 257), r"expected a list of 1 to 256 outputs"),
    "unknown field": (_outputs_reply([_out([2, 10], evil=1)]), r"unknown key 'evil'"),
    "not base64": (_outputs_reply([{**_out([2, 1]), "b64": "!!!!"}]), r"b64: expected base64"),
    "more than of": (_outputs_reply([_out([2, 10])], samples=2, of=1), r"of = 1: fewer than the 2 samples"),
    "no outputs": (json.dumps({**GOOD, "eval": {"samples": 2}}),
                   r"eval = \{\.\.\.\}: no 'outputs'"),
}


@pytest.mark.parametrize("case", list(BAD_OUTPUTS))
def test_a_reply_whose_outputs_are_not_what_they_claim_is_refused_in_one_line(case, loopback_board, tmp_path):
    reply, why = BAD_OUTPUTS[case]
    model = tmp_path / "m.onnx"
    model.write_bytes(b"the board never loads it")
    board = _hostile(loopback_board, tmp_path, "\n" + reply + "\n")
    with pytest.raises(BenchmarkError, match=why) as e:
        api.bench(model, device=board, iterations=3, warmup=0)
    assert "\n" not in str(e.value) and "not what edgepipe's worker sends" in str(e.value)


def test_outputs_of_more_bytes_than_a_reply_may_hold_are_refused_unread(loopback_board, tmp_path):
    """Well-formed outputs of 17 MiB: past the 16 MiB a reply may hold, refused in one line."""
    n = (17 << 20) // (10 * 4 * 4 // 3) + 1
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    board = _hostile(loopback_board, tmp_path, _outputs_reply([_out([n, 10])], samples=n) + "\n")
    with pytest.raises(BenchmarkError, match=r"reply is larger than 16 MiB.*refused unread") as e:
        api.bench(model, device=board, iterations=1, warmup=0)
    assert "\n" not in str(e.value)

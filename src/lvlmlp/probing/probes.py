"""Linear probes on first-token features, as scikit-learn-style estimators saved as safetensors + JSON.

- `LogisticProbe`: binary; by default exactly the paper's `sklearn.linear_model.LogisticRegression()` on raw
  first-token logits (fitted through scikit-learn, weights kept as numpy arrays).
- `MultinomialProbe`: softmax regression in torch, trained in mini-batches read from a memory map (or a
  `FeatureView`) so that 1,000-class tasks on large runs never load all features; CPU or GPU, seeded.
- `LDAProbe`: the paper's ImageNet classifier, `LinearDiscriminantAnalysis()` (solver "svd"), computed by the
  same algorithm in torch (CPU or GPU); shrinkage LDA (`shrinkage="auto"`) is an option.
- `MLPProbe`: not linear, not the paper's: a ReLU perceptron (HALP's 512-256-128) with early stopping, trained in
  torch (`lvlmlp.probing.mlp`); it scores rows through its network, its parameters saved as one flat vector.

The linear three score rows the same way, chunk by chunk: `(x - mean_) / scale_ @ coef_.T + intercept_`, then a sigmoid
(binary, one weight row) or a softmax. A probe folder holds `probe.safetensors` (arrays) and `probe.json`
(class, hyper-parameters, feature spec, classes, threshold); `load_probe` never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from scipy.special import expit, softmax
from sklearn.base import BaseEstimator, ClassifierMixin

from lvlmlp.errors import LvlmlpError
from lvlmlp.probing.features import FeatureSpec
from lvlmlp.probing.lda import lda_svd

PROBE_FORMAT = "lvlmlp-probe"
PROBE_FORMAT_VERSION = 1
_SCORE_CHUNK = 2048  # rows scored per step: bounds float32 temporaries to ~ chunk * D * 4 bytes


def _shape(X: Any) -> tuple[int, int]:
    shape = tuple(getattr(X, "shape", np.shape(X)))
    if len(shape) != 2:
        raise LvlmlpError(f"features must be a 2-D matrix (rows, dims), got shape {shape}")
    return int(shape[0]), int(shape[1])


def _rows(X: Any, start: int, stop: int) -> np.ndarray:
    return np.asarray(X[start:stop], dtype=np.float32)


def _to_memory(X: Any) -> np.ndarray:
    """float32 copy of X read chunk by chunk (scikit-learn solvers need the matrix in RAM)."""
    n, d = _shape(X)
    if isinstance(X, np.ndarray) and X.dtype == np.float32 and not isinstance(X, np.memmap):
        out = X
    else:
        out = np.empty((n, d), dtype=np.float32)
        for start in range(0, n, _SCORE_CHUNK):
            out[start : start + _SCORE_CHUNK] = _rows(X, start, start + _SCORE_CHUNK)
    if not np.isfinite(out).all():
        row = int(np.argmax(~np.isfinite(out).all(axis=1)))
        raise LvlmlpError(f"feature row {row} has NaN or infinite values")
    return out


def _check_labels(y: Any, n: int, min_classes: int = 2) -> np.ndarray:
    y = np.asarray(y)
    if y.shape != (n,):
        raise LvlmlpError(f"labels have shape {y.shape} for {n} feature rows")
    if y.dtype.kind == "f":
        if np.isnan(y).any():
            raise LvlmlpError("labels contain NaN: select labelled rows before fitting")
        if not np.all(y == np.round(y)):
            raise LvlmlpError("labels must be integers")
        y = y.astype(np.int64)
    classes = np.unique(y)
    if n == 0:
        raise LvlmlpError("no labelled rows to fit the probe on")
    if classes.size < min_classes:
        raise LvlmlpError(f"labels hold {classes.size} class(es) ({classes.tolist()}): a probe needs at least 2")
    return y


class Probe(ClassifierMixin, BaseEstimator):
    """Common scoring, saving and compatibility checks on scikit-learn's estimator base (`get_params`,
    `set_params`, `clone`, `cross_val_predict` and `score` = accuracy come from there). Subclasses store their
    hyper-parameters in `__init__` unchanged, implement `fit` and list their learned arrays."""

    # Learned arrays saved to probe.safetensors (None-valued ones are skipped).
    _ARRAYS: ClassVar[tuple[str, ...]] = ("coef_", "intercept_", "mean_", "scale_")

    threshold: float
    coef_: np.ndarray
    intercept_: np.ndarray
    classes_: np.ndarray
    mean_: np.ndarray | None = None
    scale_: np.ndarray | None = None
    spec_: FeatureSpec | None = None
    label_names_: list[str] | None = None

    # ---- fitting helpers ----
    def _start_fit(self, n_features: int, spec: FeatureSpec | None, label_names: list[str] | None) -> None:
        self.n_features_in_ = n_features
        self.spec_ = spec if spec is not None else FeatureSpec(dim=n_features)
        if self.spec_.dim is not None and self.spec_.dim != n_features:
            raise LvlmlpError(f"feature spec says dim {self.spec_.dim} but features have {n_features} columns")
        self.label_names_ = list(label_names) if label_names is not None else None

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise LvlmlpError(f"{type(self).__name__} is not fitted yet")

    def _check_weights(self, weights_path: Path) -> bool:
        """`load_probe`: check the shapes of a probe's own arrays and return True (probes that are not one linear
        layer override it); False: `coef_` and `intercept_` are checked as a linear probe's."""
        return False

    # ---- scoring ----
    def check_compatible(self, spec: FeatureSpec) -> None:
        """Refuse features of another model, kind, token, layer or dimension than the probe was trained on."""
        self._check_fitted()
        assert self.spec_ is not None
        problems = self.spec_.mismatches(spec)
        if problems:
            raise LvlmlpError(
                f"probe trained on {self.spec_.describe()} cannot score these features: " + "; ".join(problems)
            )

    def decision_function(self, X: Any) -> np.ndarray:
        """Linear scores: (n,) for a binary probe with one weight row, else (n, n_classes)."""
        self._check_fitted()
        n, d = _shape(X)
        if d != self.n_features_in_:
            raise LvlmlpError(f"features have {d} columns but the probe expects {self.n_features_in_}")
        out = np.empty((n, self.coef_.shape[0]), dtype=np.float64)
        coef_t = self.coef_.T
        for start in range(0, n, _SCORE_CHUNK):
            block = _rows(X, start, start + _SCORE_CHUNK)
            if self.mean_ is not None and self.scale_ is not None:
                block = (block - self.mean_) / self.scale_
            out[start : start + block.shape[0]] = block @ coef_t + self.intercept_
        if not np.isfinite(out).all():
            raise LvlmlpError(f"feature row {int(np.argmax(~np.isfinite(out).all(axis=1)))} has NaN or infinite values")
        return out[:, 0] if out.shape[1] == 1 else out

    def predict_proba(self, X: Any) -> np.ndarray:
        """(n, n_classes) class probabilities (sigmoid for one weight row, as scikit-learn does, else softmax)."""
        scores = self.decision_function(X)
        if scores.ndim == 1:
            p = expit(scores)
            return np.column_stack([1.0 - p, p])
        return softmax(scores, axis=1)

    def positive_score(self, X: Any) -> np.ndarray:
        """Binary probes: probability of the larger label (label 1), the score every binary metric uses."""
        if len(self.classes_) != 2:
            raise LvlmlpError(f"{type(self).__name__} has {len(self.classes_)} classes: no single positive score")
        return self.predict_proba(X)[:, 1]

    def predict(self, X: Any) -> np.ndarray:
        """Binary: label 1 when its probability reaches `threshold` (below it the row is flagged); else argmax."""
        proba = self.predict_proba(X)
        if len(self.classes_) == 2:
            return np.where(proba[:, 1] >= self.threshold, self.classes_[1], self.classes_[0])
        return self.classes_[np.argmax(proba, axis=1)]

    # ---- persistence ----
    def save(self, directory: str | Path) -> Path:
        """Write `probe.safetensors` + `probe.json` into `directory` as one unit: built beside it and swapped into
        place (`lvlmlp.outputs.replaced_folder`), so a failed write never leaves new weights beside an old JSON.
        `directory` must be new, empty or a probe folder."""
        from lvlmlp.outputs import replaced_folder

        self._check_fitted()
        with replaced_folder(directory, "probe") as tmp:
            self._write(tmp)
        return Path(directory)

    def _write(self, out: Path) -> None:
        from safetensors.numpy import save_file

        from lvlmlp import __version__

        arrays = {
            name.rstrip("_"): np.ascontiguousarray(getattr(self, name))
            for name in self._ARRAYS
            if getattr(self, name, None) is not None
        }
        save_file(arrays, str(out / "probe.safetensors"))
        doc = {
            # the JSON and the weights are one unit: load_probe refuses weights of another probe beside this JSON
            "weights_sha256": _sha256(out / "probe.safetensors"),
            "format": PROBE_FORMAT,
            "format_version": PROBE_FORMAT_VERSION,
            "lvlmlp_version": __version__,
            "class": type(self).__name__,
            "params": self.get_params(),  # the one threshold field is params.threshold
            "classes": self.classes_.tolist(),
            "label_names": self.label_names_,
            "n_features_in": self.n_features_in_,
            "feature_spec": self.spec_.to_dict() if self.spec_ else None,
            "fit_info": getattr(self, "fit_info_", {}),
        }
        (out / "probe.json").write_text(json.dumps(doc, indent=2))


def load_probe(directory: str | Path) -> Probe:
    """Read a probe folder written by `Probe.save` (JSON + safetensors only: no pickle, no code execution).

    Everything is checked against everything else (params, arrays, class list, feature count), so a damaged or
    hand-edited probe is refused here, naming the file and the key, rather than producing wrong scores later."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    folder = Path(directory)
    json_path, weights_path = folder / "probe.json", folder / "probe.safetensors"
    for path in (json_path, weights_path):
        if not path.is_file():
            raise LvlmlpError(f"{folder}: not a probe folder (missing {path.name})")
    try:
        doc = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LvlmlpError(f"{json_path}: invalid JSON ({err.msg} at line {err.lineno})") from None
    except UnicodeDecodeError:
        raise LvlmlpError(f"{json_path}: not UTF-8 text") from None
    if not isinstance(doc, dict) or doc.get("format") != PROBE_FORMAT:
        raise LvlmlpError(f"{json_path}: not an lvlmlp probe (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    cls = {c.__name__: c for c in PROBES.values()}.get(doc.get("class", ""))
    if cls is None:
        raise LvlmlpError(f"{json_path}: unknown probe class {doc.get('class')!r}")
    params = doc.get("params")
    if not isinstance(params, dict):
        raise LvlmlpError(f"{json_path}: 'params' is missing or not an object")
    allowed = set(cls().get_params())
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise LvlmlpError(f"{json_path}: params.{unknown[0]} is not a parameter of {cls.__name__} "
                          f"(parameters: {', '.join(sorted(allowed))})")
    # Probes saved before params.threshold became the one field also wrote a top-level copy: read only if it agrees.
    if "threshold" in doc and doc["threshold"] != params.get("threshold", doc["threshold"]):
        raise LvlmlpError(f"{json_path}: 'threshold' {doc['threshold']!r} and 'params.threshold' "
                          f"{params['threshold']!r} disagree (params.threshold is the one used): make them equal")
    try:
        arrays = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise LvlmlpError(f"{weights_path}: unreadable ({str(err).splitlines()[0]}); train the probe again") from None
    probe = cls(**params)
    for name in cls._ARRAYS:
        setattr(probe, name, arrays.get(name.rstrip("_")))
    classes, n_in = doc.get("classes"), doc.get("n_features_in")
    if not isinstance(classes, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in classes):
        raise LvlmlpError(f"{json_path}: 'classes' must be a list of integer labels, got {classes!r}")
    if not isinstance(n_in, int) or n_in < 1:
        raise LvlmlpError(f"{json_path}: 'n_features_in' must be a positive integer, got {n_in!r}")
    probe.classes_ = np.asarray(classes)
    probe.n_features_in_ = n_in
    _check_loaded(probe, json_path, weights_path)
    # last: a damaged file gets its own message above; here whole weights that are another probe's
    recorded = doc.get("weights_sha256")
    if recorded is not None and recorded != _sha256(weights_path):
        raise LvlmlpError(f"{weights_path}: not the weights probe.json was saved with (sha256 differs): the folder "
                          "mixes two probes; train the probe again")
    spec = doc.get("feature_spec")
    if spec is not None and not isinstance(spec, dict):
        raise LvlmlpError(f"{json_path}: 'feature_spec' must be an object or null, got {spec!r}")
    probe.spec_ = FeatureSpec.from_dict(spec) if spec else None  # unknown keys are ignored, missing ones defaulted
    probe.label_names_ = doc.get("label_names")
    probe.fit_info_ = doc.get("fit_info", {})
    return probe


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_loaded(probe: Probe, json_path: Path, weights_path: Path) -> None:
    classes, d = probe.classes_.tolist(), probe.n_features_in_
    if len(classes) < 2 or classes != sorted(set(classes)):
        raise LvlmlpError(f"{json_path}: 'classes' must be 2 or more distinct labels in increasing order, got {classes}")
    if len(classes) == 2 and classes != [0, 1]:
        raise LvlmlpError(f"{json_path}: a binary probe's classes must be [0, 1] (label 1 is the positive class), "
                          f"got {classes}")
    if not probe._check_weights(weights_path):
        coef, intercept = getattr(probe, "coef_", None), getattr(probe, "intercept_", None)
        if coef is None or intercept is None:
            raise LvlmlpError(f"{weights_path}: missing {'coef' if coef is None else 'intercept'} weights")
        rows_ok = (1, 2) if len(classes) == 2 else (len(classes),)
        if coef.ndim != 2 or coef.shape[0] not in rows_ok or coef.shape[1] != d:
            raise LvlmlpError(f"{weights_path}: coef has shape {coef.shape}, but probe.json says {len(classes)} "
                              f"classes ({classes}) on {d} features")
        if intercept.shape != (coef.shape[0],):
            raise LvlmlpError(f"{weights_path}: intercept has shape {intercept.shape}, expected ({coef.shape[0]},)")
    for name in type(probe)._ARRAYS:
        arr = getattr(probe, name, None)
        if arr is None:
            continue
        if name in ("mean_", "scale_") and arr.shape != (d,):
            raise LvlmlpError(f"{weights_path}: {name.rstrip('_')} has shape {arr.shape}, expected ({d},)")
        if not np.isfinite(arr).all():
            raise LvlmlpError(f"{weights_path}: the probe's {name.rstrip('_')} weights hold NaN or infinite values "
                              "(a damaged probe; train it again)")


def _column_stats(X: Any, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of each column, merging chunk statistics (Chan et al.) in float64."""
    count, mean, m2 = 0, np.zeros(d), np.zeros(d)
    for start in range(0, n, _SCORE_CHUNK):
        block = _rows(X, start, start + _SCORE_CHUNK).astype(np.float64)
        b_n, b_mean = block.shape[0], block.mean(axis=0)
        b_m2 = ((block - b_mean) ** 2).sum(axis=0)
        delta = b_mean - mean
        total = count + b_n
        mean = mean + delta * b_n / total
        m2 = m2 + b_m2 + delta**2 * count * b_n / total
        count = total
    std = np.sqrt(m2 / max(count, 1))
    return mean.astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32)


class LogisticProbe(Probe):
    """Binary logistic-regression probe; the defaults are the paper's `LogisticRegression()` on raw logits.

    Features are fitted as float32 (half the memory of float64; the stored logits are float16/float32 anyway).
    `threshold`: a row is predicted label 1 when P(label 1) >= threshold, and flagged ("refuse") below it.
    """

    def __init__(
        self,
        C: float = 1.0,
        standardize: bool = False,
        class_weight: str | None = None,
        max_iter: int = 100,
        tol: float = 1e-4,
        solver: str = "lbfgs",
        threshold: float = 0.5,
    ) -> None:
        self.C = C
        self.standardize = standardize
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.tol = tol
        self.solver = solver
        self.threshold = threshold

    def fit(
        self, X: Any, y: Any, spec: FeatureSpec | None = None, label_names: list[str] | None = None
    ) -> LogisticProbe:
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        n, d = _shape(X)
        y = _check_labels(y, n)
        if np.unique(y).size != 2:
            raise LvlmlpError(
                f"LogisticProbe is binary but labels hold {np.unique(y).size} classes: use --probe multinomial or lda"
            )
        self._start_fit(d, spec, label_names)
        data = _to_memory(X)
        self.mean_ = self.scale_ = None
        if self.standardize:
            self.mean_, self.scale_ = _column_stats(data, n, d)
            data = (data - self.mean_) / self.scale_
        model = LogisticRegression(
            C=self.C, class_weight=self.class_weight, max_iter=self.max_iter, tol=self.tol, solver=self.solver
        )
        with warnings.catch_warnings(record=True) as caught:
            # The paper's default (100 lbfgs steps on raw logits) often stops before convergence; record it.
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(data, y)
        self.coef_ = np.asarray(model.coef_, dtype=np.float64)
        self.intercept_ = np.asarray(model.intercept_, dtype=np.float64)
        self.classes_ = np.asarray(model.classes_)
        self.fit_info_ = {
            "n_rows": n,
            "n_iter": int(np.max(model.n_iter_)),
            "converged": not any(issubclass(w.category, ConvergenceWarning) for w in caught),
        }
        return self


class LDAProbe(Probe):
    """Linear discriminant analysis; binary or multiclass.

    Default (`shrinkage=None`): the paper's ImageNet classifier, scikit-learn's `LinearDiscriminantAnalysis()`
    (solver "svd", tol 1e-4): the same fitted coefficients, computed in torch without its SVDs (`lvlmlp.probing.lda.lda_svd`), on
    `device` (cpu, cuda or auto): the same predictions, faster (bench/probe_speed.py --lda).
    `shrinkage="auto"` or a float: scikit-learn's `LinearDiscriminantAnalysis(solver="lsqr", shrinkage=...)`, an
    option that keeps the covariance well-posed when features outnumber rows (not the paper's).
    """

    def __init__(
        self, shrinkage: str | float | None = None, tol: float = 1e-4, device: str = "cpu", threshold: float = 0.5
    ) -> None:
        self.shrinkage = shrinkage
        self.tol = tol
        self.device = device
        self.threshold = threshold

    def fit(self, X: Any, y: Any, spec: FeatureSpec | None = None, label_names: list[str] | None = None) -> LDAProbe:
        n, d = _shape(X)
        y = _check_labels(y, n)
        self._start_fit(d, spec, label_names)
        if self.shrinkage is None:
            coef, intercept, self.classes_ = lda_svd(_to_memory(X), y, self.tol, _torch_device(self.device))
        else:
            from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

            model = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=self.shrinkage).fit(_to_memory(X), y)
            coef, intercept, self.classes_ = model.coef_, model.intercept_, np.asarray(model.classes_)
        self.coef_ = np.atleast_2d(np.asarray(coef, dtype=np.float64))
        self.intercept_ = np.atleast_1d(np.asarray(intercept, dtype=np.float64))
        self.mean_ = self.scale_ = None
        self.fit_info_ = {"n_rows": n, "solver": "svd" if self.shrinkage is None else "lsqr"}
        return self


def _torch_device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise LvlmlpError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


class MultinomialProbe(Probe):
    """Softmax regression trained with Adam in mini-batches streamed from a memory map; seeded.

    `X` may be any (n, D) object indexable by row arrays: np.ndarray, np.memmap or `features.FeatureView`; each
    batch reads only its rows (in sorted order, so the memory map is walked forwards). Standardisation statistics
    are streamed chunk by chunk in float64. The loss is mean cross-entropy + weight_decay/2 * ||W||^2 (the bias is
    not penalised). Training starts from zero weights, so a seed fixes the whole run on a given device.
    """

    def __init__(
        self,
        epochs: int = 20,
        batch_size: int = 512,
        lr: float = 1e-2,
        weight_decay: float = 1e-4,
        standardize: bool = True,
        device: str = "cpu",
        seed: int = 0,
        threshold: float = 0.5,
    ) -> None:
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.standardize = standardize
        self.device = device
        self.seed = seed
        self.threshold = threshold

    def _device(self) -> Any:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if str(self.device).startswith("cuda") and not torch.cuda.is_available():
            raise LvlmlpError(f"--device {self.device}: CUDA is not available on this machine")
        return torch.device(self.device)

    def fit(
        self, X: Any, y: Any, spec: FeatureSpec | None = None, label_names: list[str] | None = None
    ) -> MultinomialProbe:
        import torch

        n, d = _shape(X)
        y = _check_labels(y, n)
        self._start_fit(d, spec, label_names)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        k = self.classes_.size
        device = self._device()
        if self.standardize:
            self.mean_, self.scale_ = _column_stats(X, n, d)
            mean_t = torch.from_numpy(self.mean_).to(device)
            scale_t = torch.from_numpy(self.scale_).to(device)
        else:
            self.mean_ = self.scale_ = None
        torch.manual_seed(self.seed)
        weight = torch.zeros(k, d, device=device, requires_grad=True)
        bias = torch.zeros(k, device=device, requires_grad=True)
        opt = torch.optim.Adam([weight, bias], lr=self.lr)
        targets = torch.from_numpy(y_idx.astype(np.int64))
        rng = np.random.default_rng(self.seed)
        losses: list[float] = []
        for _ in range(self.epochs):
            perm = rng.permutation(n)
            total = 0.0
            for start in range(0, n, self.batch_size):
                idx = np.sort(perm[start : start + self.batch_size])
                xb = torch.from_numpy(np.asarray(X[idx], dtype=np.float32)).to(device, non_blocking=True)
                if not torch.isfinite(xb).all():
                    raise LvlmlpError(f"feature row {int(idx[int((~torch.isfinite(xb).all(1)).nonzero()[0])])} "
                                      "has NaN or infinite values")
                if self.standardize:
                    xb = (xb - mean_t) / scale_t
                logits = xb @ weight.T + bias
                loss = torch.nn.functional.cross_entropy(logits, targets[idx].to(device))
                loss = loss + 0.5 * self.weight_decay * (weight * weight).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * idx.size
            losses.append(total / n)
        self.coef_ = weight.detach().cpu().numpy().astype(np.float32)
        self.intercept_ = bias.detach().cpu().numpy().astype(np.float32)
        self.fit_info_ = {"n_rows": n, "epochs": self.epochs, "final_loss": losses[-1] if losses else None}
        return self


def _check_hidden(hidden: Any, weights_path: Path) -> None:
    """A loaded probe's `hidden` (JSON) must be a list of positive layer sizes before any shape is computed."""
    # A bare number is no list either: taken as one layer here, it reached the shape code as a TypeError.
    if not isinstance(hidden, (list, tuple)) or not hidden or \
            not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden):
        raise LvlmlpError(f"{weights_path.with_name('probe.json')}: params.hidden {hidden!r} must be a list of "
                          "positive layer sizes")


class MLPProbe(Probe):
    """A ReLU multi-layer perceptron (`hidden` sizes, HALP's 512-256-128 by default) trained in torch with early
    stopping on a stratified validation split of the train rows (`val_fraction`, `patience` epochs); binary (one
    output logit, as the linear probes) or multiclass (softmax); CPU or GPU; seeded. The network and its training
    are in `lvlmlp.probing.mlp`; its parameters are saved as one flat vector (`weights`)."""

    _ARRAYS: ClassVar[tuple[str, ...]] = ("weights_", "mean_", "scale_")
    weights_: np.ndarray

    def __init__(
        self,
        hidden: tuple[int, ...] = (512, 256, 128),
        epochs: int = 200,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        patience: int = 10,
        val_fraction: float = 0.1,
        standardize: bool = True,
        device: str = "cpu",
        seed: int = 0,
        threshold: float = 0.5,
    ) -> None:
        self.hidden = hidden
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.patience = patience
        self.val_fraction = val_fraction
        self.standardize = standardize
        self.device = device
        self.seed = seed
        self.threshold = threshold

    def _shapes(self) -> list[tuple[int, int]]:
        from lvlmlp.probing.mlp import layer_shapes

        return layer_shapes(self.n_features_in_, tuple(self.hidden), 1 if len(self.classes_) == 2 else len(self.classes_))

    def _check_fitted(self) -> None:
        if not hasattr(self, "weights_"):
            raise LvlmlpError(f"{type(self).__name__} is not fitted yet")

    def fit(self, X: Any, y: Any, spec: FeatureSpec | None = None, label_names: list[str] | None = None) -> MLPProbe:
        from lvlmlp.probing.mlp import train_mlp

        hidden = tuple(self.hidden)
        if not hidden or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden):
            raise LvlmlpError(f"mlp probe: hidden {list(hidden)!r} must be one or more positive layer sizes")
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1 or not 0 <= self.val_fraction < 1:
            raise LvlmlpError("mlp probe: epochs, batch_size and patience must be >= 1 and val_fraction in [0, 1) "
                              f"(got {self.epochs}, {self.batch_size}, {self.patience}, {self.val_fraction})")
        n, d = _shape(X)
        y = _check_labels(y, n)
        self._start_fit(d, spec, label_names)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        self.mean_, self.scale_ = _column_stats(X, n, d) if self.standardize else (None, None)
        result = train_mlp(X, y_idx, 1 if self.classes_.size == 2 else self.classes_.size, hidden,
                           epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                           patience=self.patience, val_fraction=self.val_fraction, mean=self.mean_,
                           scale=self.scale_, device=_torch_device(self.device), seed=self.seed)
        self.weights_ = result.params
        self.fit_info_ = result.info
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        """The network's output logits: (n,) for a binary probe, else (n, n_classes); computed in numpy."""
        from lvlmlp.probing.mlp import forward, unpack

        self._check_fitted()
        n, d = _shape(X)
        if d != self.n_features_in_:
            raise LvlmlpError(f"features have {d} columns but the probe expects {self.n_features_in_}")
        layers = unpack(self.weights_, self._shapes())
        out = np.empty((n, layers[-1][1].size), dtype=np.float64)
        for start in range(0, n, _SCORE_CHUNK):
            block = _rows(X, start, start + _SCORE_CHUNK)
            if self.mean_ is not None and self.scale_ is not None:
                block = (block - self.mean_) / self.scale_
            out[start : start + block.shape[0]] = forward(layers, block)
        if not np.isfinite(out).all():
            raise LvlmlpError(f"feature row {int(np.argmax(~np.isfinite(out).all(axis=1)))} has NaN or infinite values")
        return out[:, 0] if out.shape[1] == 1 else out

    def _check_weights(self, weights_path: Path) -> bool:
        from lvlmlp.probing.mlp import n_params

        weights = self.weights_  # load_probe sets every array of _ARRAYS, None when the file lacks it
        if weights is None:
            raise LvlmlpError(f"{weights_path}: missing weights")
        _check_hidden(self.hidden, weights_path)
        expected = n_params(self._shapes())
        if weights.shape != (expected,):
            raise LvlmlpError(f"{weights_path}: weights has shape {weights.shape}, but an MLP with hidden sizes "
                              f"{list(self.hidden)} on {self.n_features_in_} features and {len(self.classes_)} "
                              f"classes has {expected} parameters")
        return True


class MTREProbe(Probe):
    """MTRE's multi-token aggregation (arXiv 2505.11741, lanl/MTRE) on `multi-token` features: one per-token
    classifier (`head`: `logistic`, MTRE's logistic-regression option, or `mlp`, this toolkit's MLP standing in for
    MTRE's attention network) fitted on every generated token of the train rows with its row's label; a row scores
    the sum of its generated tokens' log-odds (`lvlmlp.probing.mtre`). Binary only. `tokens`: K (default: the
    feature spec's). docs/signals.md says what of MTRE this reproduces and what not."""

    _ARRAYS: ClassVar[tuple[str, ...]] = ("coef_", "intercept_", "weights_")  # raw logits: no standardisation
    weights_: np.ndarray | None = None

    def __init__(
        self,
        tokens: int | None = None,
        head: str = "logistic",
        C: float = 1.0,
        max_iter: int = 100,
        hidden: tuple[int, ...] = (128, 128, 128),
        epochs: int = 200,
        device: str = "cpu",
        seed: int = 0,
        threshold: float = 0.5,
    ) -> None:
        self.tokens = tokens
        self.head = head
        self.C = C
        self.max_iter = max_iter
        self.hidden = hidden
        self.epochs = epochs
        self.device = device
        self.seed = seed
        self.threshold = threshold

    def _check_fitted(self) -> None:
        if getattr(self, "coef_", None) is None and getattr(self, "weights_", None) is None:
            raise LvlmlpError(f"{type(self).__name__} is not fitted yet")

    def _vocab(self) -> int:
        """V, the width of one token's features: from the head's own arrays."""
        if self.head == "logistic":
            return int(self.coef_.shape[1])
        hidden = [int(h) for h in self.hidden]
        rest = sum(o * i + o for o, i in zip([*hidden[1:], 1], hidden))
        return (int(self.weights_.size) - rest - hidden[0]) // hidden[0]  # type: ignore[union-attr]

    def _head_probe(self) -> Probe:
        """The fitted per-token classifier as a probe on V features (built from this probe's arrays)."""
        vocab = self._vocab()
        head: Probe = LogisticProbe() if self.head == "logistic" else MLPProbe(hidden=tuple(self.hidden))
        head.n_features_in_, head.classes_ = vocab, self.classes_  # the token rows carry their rows' two labels
        head.mean_ = head.scale_ = None
        if self.head == "logistic":
            head.coef_, head.intercept_ = self.coef_, self.intercept_
        else:
            head.weights_ = self.weights_  # type: ignore[attr-defined]
        return head

    def fit(self, X: Any, y: Any, spec: FeatureSpec | None = None, label_names: list[str] | None = None) -> MTREProbe:
        from lvlmlp.probing.mtre import token_rows

        if self.head not in ("logistic", "mlp"):
            raise LvlmlpError(f"mtre probe: head {self.head!r} is not logistic or mlp")
        n, d = _shape(X)
        y = _check_labels(y, n)
        if np.unique(y).size != 2:
            raise LvlmlpError(f"MTREProbe is binary but labels hold {np.unique(y).size} classes")
        k = self.tokens if self.tokens is not None else (spec.tokens if spec is not None else None)
        if not k or k < 1 or d % k:
            raise LvlmlpError(f"mtre probe: needs multi-token features of K tokens (--feature multi-token --tokens K); "
                              f"got {d} columns and tokens {k}")
        self._start_fit(d, spec, label_names)
        self.classes_ = np.unique(y)
        feats, token_y, row_of = token_rows(X, y, k)
        if np.unique(token_y).size < 2:
            raise LvlmlpError("mtre probe: the generated tokens of the train rows hold one label only")
        if self.head == "logistic":
            head: Probe = LogisticProbe(C=self.C, max_iter=self.max_iter)
        else:  # raw logits, as MTRE feeds its network (no standardisation)
            head = MLPProbe(hidden=tuple(self.hidden), epochs=self.epochs, standardize=False, device=self.device,
                            seed=self.seed)
        head.fit(feats, token_y)
        self.coef_ = getattr(head, "coef_", None)  # type: ignore[assignment]
        self.intercept_ = getattr(head, "intercept_", None)  # type: ignore[assignment]
        self.weights_ = getattr(head, "weights_", None)  # mean_ and scale_ stay None (the class's): raw logits
        self.fit_info_ = {"n_rows": n, "tokens": int(k), "n_token_rows": int(feats.shape[0]),
                          "head": head.fit_info_}
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        """(n,) MTRE's score: the sum over each row's generated tokens of the head's log-odds."""
        from lvlmlp.probing.mtre import summed_log_odds

        self._check_fitted()
        n, d = _shape(X)
        if d != self.n_features_in_:
            raise LvlmlpError(f"features have {d} columns but the probe expects {self.n_features_in_}")
        head = self._head_probe()
        return summed_log_odds(X, d // head.n_features_in_, head.decision_function)

    def _check_weights(self, weights_path: Path) -> bool:
        if self.head not in ("logistic", "mlp"):
            raise LvlmlpError(f"{weights_path.with_name('probe.json')}: params.head {self.head!r} is not logistic or mlp")
        if getattr(self, "coef_" if self.head == "logistic" else "weights_") is None:  # load_probe set it
            raise LvlmlpError(f"{weights_path}: missing the {self.head} head's weights")
        if self.head == "logistic" and self.coef_.ndim != 2:
            raise LvlmlpError(f"{weights_path}: the logistic head's coef has shape {self.coef_.shape}, expected (1, V)")
        if self.head == "mlp":
            _check_hidden(self.hidden, weights_path)
        vocab = self._vocab()
        if vocab < 1 or self.n_features_in_ % vocab:
            raise LvlmlpError(f"{weights_path}: a head on {vocab} features cannot score {self.n_features_in_} "
                              "multi-token features")
        if self.head == "logistic" and (self.coef_.shape[0] != 1 or self.intercept_ is None
                                        or self.intercept_.shape != (1,)):
            raise LvlmlpError(f"{weights_path}: the logistic head's coef {self.coef_.shape} / intercept must be one row")
        if self.head == "mlp":
            self._head_probe()._check_weights(weights_path)  # the vector against the hidden sizes
        return True


# The one registry of probe kinds: CLI choices, configs, `load_probe` and cross-validation all read it.
PROBES: dict[str, type[Probe]] = {"logistic": LogisticProbe, "multinomial": MultinomialProbe, "lda": LDAProbe,
                                  "mlp": MLPProbe, "mtre": MTREProbe}


def make_probe(kind: str, params: dict[str, Any], *, cli: bool = False) -> Probe:
    """The one probe factory (`probe train`, `lvlmlp run`, its analyses and cross-validation, finetuning's
    comparison): `PROBES[kind](**params)`, after checking the kind, that each parameter is one of that probe's
    (`get_params`) and in its declared range (`lvlmlp.ranges.PROBE_PARAMS`). Errors name what the caller wrote:
    a flag (`--max-iter`) when `cli`, else a config key (`probe.max_iter`)."""
    from lvlmlp.ranges import check_probe_params

    def name(param: str) -> str:
        return "--" + param.replace("_", "-") if cli else f"probe.{param}"

    if kind not in PROBES:
        what = f"--probe {kind!r}: unknown probe" if cli else f"probe.kind {kind!r}: unknown"
        raise LvlmlpError(f"{what} (choose from {', '.join(PROBES)})")
    check_probe_params(params, "--" if cli else "probe.")  # a value out of range first, whatever the probe
    cls = PROBES[kind]
    accepted = list(cls().get_params())
    for param in params:
        if param not in accepted:
            if cli:
                raise LvlmlpError(f"{name(param)} does not apply to --probe {kind} (its hyper-parameters: "
                                  f"{', '.join(name(p) for p in accepted)})")
            raise LvlmlpError(f"{name(param)}: not a parameter of the {kind} probe (parameters: {', '.join(accepted)})")
    return cls(**params)

"""The training loop: QA-IBP, plain QAT, IBP, and float IBP followed by post-training quantization.

Configuration is a frozen :class:`Config` (sections ``data``, ``model``, ``quant``, ``train``) read from TOML
(:func:`load_config`) and overridden by ``section.key=value`` strings (what ``qverify train --set`` passes).

Methods (``train.method``):

* ``qaibp``  quantization-aware training with the QA-IBP objective (:mod:`qverify.train.loss`): natural loss during
  ``warmup_epochs``, then ``eps``, ``lambda`` and ``rho`` ramp linearly over ``ramp_epochs``;
* ``ibp``    the same quantized model, classic IBP loss with kappa mixing (``kappa: 1 -> kappa_end``);
* ``qat``    plain quantization-aware training (no bounds; baseline);
* ``float-ibp``  float training with (float) IBP and kappa mixing, then post-training quantization: scales
  calibrated on training images, weights rounded (baseline: what quantization does to a float certificate);
* ``pgd-at`` / ``fgsm-rs``  adversarial training of the fake-quantized model: cross entropy at an l-inf PGD
  example (Madry et al. 2018; ``pgd_steps``, ``pgd_alpha``, ``pgd_restarts``) or at a one-step FGSM example from a
  random start (Wong, Rice, Kolter 2020; ``fgsm_alpha``), radius ``eps`` in pixels with the same warm-up and ramp
  (:mod:`qverify.train.methods`);
* ``float-pgd-at``  the same PGD adversarial training of the **float** model, then post-training quantization as
  for ``float-ibp`` (the checkpoint is the adversarially trained float model that ``qverify quantize`` quantizes,
  e.g. with the layer-wise Lipschitz criterion of Song, Ranjan, Li, arXiv 2110.12308: ``[ptq] weight_clipping =
  "lipschitz"``);
* ``grad-l1``  float training with the gradient l1 regularizer of Alizadeh et al. 2020 (``lambda_w``,
  ``lambda_a``, scaled by the ramp fraction like ``lam``: plain float training during the warm-up; double
  back-propagation, :mod:`qverify.train.methods`), then post-training quantization as for
  ``float-ibp``; the float checkpoint is the model ``qverify quantize`` quantizes to any width;
* ``binaryrelax``  BinaryRelax (Yin et al. 2018): binary / ternary / 4-bit weights (``quant.weight_bits`` 1 / 2 /
  4) through the relaxed projection ``G = (eta Q(W) + W) / (1 + eta)``, ``eta = br_eta0 br_rho^e`` in quantized
  epoch ``e``, then the hard projection in the last ``br_hard_epochs``; the loss ``(1 - br_beta) CE(x) + br_beta
  CE(x_adv)`` with the PGD example of ``pgd-at`` (same settings and radius ramp); the weight sparsity
  (``zero_weights``, ``zero_channels``) in every epoch's record;
* ``robust2bit``  2-bit weights as two power-of-two binary bases (Li et al. 2020) with the feature-matching loss
  against the float model and the spectral-norm term (``feature_weight``, ``spectral_weight``, scaled by the ramp
  fraction like ``grad-l1``'s; :mod:`qverify.train.methods`).

Architectures (``model.arch``, :class:`~qverify.train.layers.ModelConfig`): ``mlp`` (``model.hidden`` dense
layers), ``cnn`` (``model.conv`` layers, then the dense layers) and ``resnet`` (the ``model.conv`` stem, then
``model.blocks`` identity residual blocks ``y = relu(Q(conv_b(relu(Q(conv_a(x)))) + x))``, then the dense layers;
exported as a graph network, :mod:`qverify.train.layers` "Residual blocks"). Every method trains all three;
``bound = "crown-ibp"`` passes the residual skip backwards too; the QDQ ONNX export (``--onnx``) refuses ``resnet``.

``quant.weight_quantizer`` is set from ``train.method`` (``binaryrelax``: ``binaryrelax``; ``robust2bit``:
``pow2-bases``; else ``uniform``); a config naming another is an error.

``bound = "crown-ibp"`` replaces the interval margin bounds of any bound-using method by CROWN-IBP's
``beta(t) lb_CROWN-IBP + (1 - beta(t)) lb_IBP`` (:mod:`qverify.train.bounds_crown`; ``beta`` ramps from 1 to
``beta_end``, as in Zhang et al. 2020); the certified-by-bounds accuracy reported per epoch stays the exact
interval one.

Gaussian-noise training (``train.noise_sigma = sigma > 0``; Cohen, Rosenfeld, Kolter 2019, sec. 3: the base
classifier of a smoothed classifier is trained on noisy inputs): for the natural-loss methods ``qat`` and
``float-ibp`` with ``eps = 0`` (plain float training), every training image ``x`` (integer pixels) of every step is
replaced by :func:`noisy_inputs`, ``x' = clamp(rne(x + eps / s_in), 0, input_hi)`` with ``eps ~ N(0, sigma^2 I)``
in the model's real input units ``v = s_in x`` (``s_in`` = the model's input scale, ``1/256`` for 8-bit pixels
in ``pow2``): the nearest grid point of the noisy real input, the input quantizer that :mod:`qverify.smooth`
applies for the exported network (``input_rounding`` none: the nearest grid point, ties to even), so training
sees the integer inputs certification samples. The noise of step ``s`` of epoch ``e`` comes from a torch
generator seeded with :func:`noise_seed` ``(seed, e, s)`` (on the CPU, float64; the same on every device), so a
run is reproducible and resumable; ``noise_sigma = 0`` skips it (the old behaviour, bit for bit). Other methods
with ``noise_sigma > 0`` are an error naming the setting. Evaluation stays on clean images.

Fine-tuning (``train(..., init=state_dict)``): the model starts from a checkpoint's weights (another bit width
of the same architecture: :mod:`qverify.mixed_precision` fine-tunes each candidate this way); without float
epochs its scales are calibrated from those weights and their activations before the first step.

Optional ``float_epochs`` of natural float pre-training precede quantization (then scales are calibrated from the
trained float model). Determinism: weights are initialised from ``seed``; epoch ``e`` visits the training set in
the order of a generator seeded with ``(seed, e)``; the schedule and learning rate are pure functions of
``(epoch, step)``. A checkpoint after each epoch holds the model, the optimizer and the history, so
``train(cfg, resume=True)`` continues to the same final model as an uninterrupted run (tested). On CUDA, training
runs with deterministic kernels only (:func:`deterministic_kernels`; tested on an H100 where a GPU is lent).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qverify.train.bounds_ibp import certified_by_bounds, input_box, output_bounds
from qverify.train.data import Dataset, load_dataset
from qverify.train.layers import ModelConfig, QuantConfig, QuantNet, build_model, calibrate
from qverify.train.loss import ROBUST_TERMS, objective
from qverify.train.methods import (
    ADVERSARIAL,
    BINARYRELAX,
    GRAD_L1,
    METHOD_WEIGHT_QUANTIZER,
    ROBUST2BIT,
    adversarial_objective,
    binaryrelax_objective,
    br_eta,
    grad_l1_objective,
    robust2bit_objective,
    set_relaxation,
    weight_sparsity,
)
from qverify.train.schedule import schedule_values

#: adversarial training of the float model (then post-training quantization): the adversarially trained float
#: models that Song, Ranjan, Li (arXiv 2110.12308) quantize layer by layer
FLOAT_PGD_AT = "float-pgd-at"
METHODS = ("qaibp", "ibp", "qat", "float-ibp", *ADVERSARIAL, FLOAT_PGD_AT, GRAD_L1, BINARYRELAX, ROBUST2BIT)
#: methods that train the float model and quantize it after training
FLOAT_METHODS = ("float-ibp", GRAD_L1, FLOAT_PGD_AT)
BOUNDS = ("ibp", "crown-ibp")
CHECKPOINT = "checkpoint.pt"


class ConfigError(ValueError):
    """A bad configuration (the message names the key)."""


@dataclass(frozen=True)
class DataConfig:
    """``train``/``eval``: data set specs (:func:`qverify.train.data.load_dataset`); ``eval`` empty: the held-out
    part (``holdout`` images of the shuffled training set) or, without one, the first ``eval_limit`` training
    images. ``shuffle_seed`` fixes the permutation applied to the training set before ``holdout``/``train_limit``."""

    train: str = "mnist-5k"
    eval: str = ""
    train_limit: int = 0
    eval_limit: int = 0
    holdout: int = 0
    shuffle_seed: int = 0

    def __post_init__(self) -> None:
        for name in ("train_limit", "eval_limit", "holdout", "shuffle_seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class TrainConfig:
    method: str = "qaibp"
    epochs: int = 20
    batch_size: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-4
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    float_epochs: int = 0
    warmup_epochs: float = 2.0
    ramp_epochs: float = 6.0
    eps: float = 2.0
    eval_radius: int = -1
    lam: float = 1.0
    rho: float = 0.0
    kappa_end: float = 0.5
    robust: str = ""
    margin: float = 0.5
    bound: str = "ibp"
    beta_end: float = 0.0
    grad_clip: float = 10.0
    calib_images: int = 1000
    pgd_steps: int = 40
    pgd_alpha: float = 1.0 / 30.0
    pgd_restarts: int = 1
    fgsm_alpha: float = 1.25
    adv_grid: bool = True
    lambda_w: float = 0.05
    lambda_a: float = 0.05
    br_eta0: float = 1.0
    br_rho: float = 1.02
    br_hard_epochs: int = 2
    br_beta: float = 0.5
    feature_weight: float = 0.1
    spectral_weight: float = 0.01
    spectral_iters: int = 10
    noise_sigma: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr_milestones", tuple(int(m) for m in self.lr_milestones))
        if not self.noise_sigma >= 0:
            raise ConfigError(f"train.noise_sigma must be >= 0, got {self.noise_sigma}")
        if self.noise_sigma > 0 and not (self.method == "qat" or (self.method == "float-ibp" and self.eps == 0)):
            raise ConfigError(f"train.noise_sigma = {self.noise_sigma:g} (Gaussian-noise training) needs the natural "
                              f"loss: train.method 'qat', or 'float-ibp' with train.eps = 0 (got method "
                              f"{self.method!r}, eps {self.eps:g})")
        if self.method not in METHODS:
            raise ConfigError(f"train.method must be one of {METHODS}, got {self.method!r}")
        if self.robust and self.robust not in ROBUST_TERMS:
            raise ConfigError(f"train.robust must be one of {ROBUST_TERMS}, got {self.robust!r}")
        if self.bound not in BOUNDS:
            raise ConfigError(f"train.bound must be one of {BOUNDS}, got {self.bound!r}")
        if not 0.0 <= self.beta_end <= 1.0:
            raise ConfigError(f"train.beta_end must be in [0, 1], got {self.beta_end}")
        if self.epochs < 0 or self.batch_size < 1:
            raise ConfigError("train.epochs must be >= 0 and train.batch_size >= 1")
        if self.eps < 0:
            raise ConfigError(f"train.eps must be >= 0, got {self.eps}")
        # the other numbers: (name, lowest allowed, whether the lowest is excluded, highest allowed); NaN fails all
        for name, lo, open_lo, hi in (("lr", 0.0, True, math.inf), ("weight_decay", 0.0, False, math.inf),
                                      ("lr_gamma", 0.0, True, 1.0), ("float_epochs", 0, False, math.inf),
                                      ("warmup_epochs", 0.0, False, math.inf), ("ramp_epochs", 0.0, False, math.inf),
                                      ("lam", 0.0, False, math.inf), ("rho", 0.0, False, math.inf),
                                      ("kappa_end", 0.0, False, 1.0), ("margin", 0.0, False, math.inf),
                                      ("grad_clip", 0.0, False, math.inf), ("calib_images", 0, False, math.inf),
                                      ("eval_radius", -1, False, math.inf), ("pgd_steps", 1, False, math.inf),
                                      ("pgd_alpha", 0.0, True, math.inf), ("pgd_restarts", 1, False, math.inf),
                                      ("fgsm_alpha", 0.0, True, math.inf), ("lambda_w", 0.0, False, math.inf),
                                      ("lambda_a", 0.0, False, math.inf), ("br_eta0", 0.0, True, math.inf),
                                      ("br_rho", 1.0, False, math.inf), ("br_hard_epochs", 1, False, math.inf),
                                      ("br_beta", 0.0, False, 1.0), ("feature_weight", 0.0, False, math.inf),
                                      ("spectral_weight", 0.0, False, math.inf),
                                      ("spectral_iters", 1, False, math.inf)):
            v = getattr(self, name)
            if not ((v > lo if open_lo else v >= lo) and v <= hi):
                where = f"{'(' if open_lo else '['}{lo:g}, {hi:g}{']' if hi < math.inf else ')'}"
                raise ConfigError(f"train.{name} must be in {where}, got {v}")
        if any(m < 0 for m in self.lr_milestones):
            raise ConfigError(f"train.lr_milestones must be epochs >= 0, got {list(self.lr_milestones)}")

    def schedule_notes(self) -> list[str]:
        """Ways this schedule leaves the robust objective short of what was asked (empty when it does not). The
        warm-up ends at ``W = warmup_epochs`` (plus ``float_epochs`` of float pre-training, except for
        ``float-ibp``); with ``f = clip((epochs - W) / ramp_epochs, 0, 1)`` the last step trains at ``f * eps`` (and
        ``f * lam``, ``f * rho``), so ``f = 0`` is plain (quantization-aware or float) training and ``0 < f < 1``
        never reaches ``eps``."""
        regularizer = self.method in (GRAD_L1, ROBUST2BIT)  # ramped weights, not a radius
        if self.method == "qat" or (self.eps <= 0 and not regularizer) or self.epochs <= 0:
            return []
        pre = 0 if self.method in FLOAT_METHODS else self.float_epochs
        w = self.warmup_epochs + pre
        what = "train.warmup_epochs" + (" + train.float_epochs" if pre else "")
        if self.epochs <= w:
            plain = "float" if self.method in FLOAT_METHODS else "quantization-aware"
            return [f"train.epochs ({self.epochs}) <= {what} ({w:g}): the robust term never switches on, so this "
                    f"{self.method} run is plain {plain} training"]
        if self.ramp_epochs > 0 and self.epochs < w + self.ramp_epochs:
            f = (self.epochs - w) / self.ramp_epochs
            if regularizer:
                names = "train.lambda_w / train.lambda_a" if self.method == GRAD_L1 else \
                    "train.feature_weight / train.spectral_weight"
                return [f"train.epochs ({self.epochs}) < {what} + train.ramp_epochs ({w + self.ramp_epochs:g}): the "
                        f"regularizer reaches only {f:.3g} of {names} by the last step"]
            return [f"train.epochs ({self.epochs}) < {what} + train.ramp_epochs ({w + self.ramp_epochs:g}): epsilon "
                    f"reaches only {f * self.eps:.3g} of train.eps = {self.eps:g} by the last step"]
        return []

    @property
    def robust_term(self) -> str:
        return self.robust or ("hinge" if self.method == "qaibp" else "ce")

    @property
    def radius(self) -> int:
        """Integer radius (input units) of the certified-by-bounds accuracy reported per epoch."""
        return int(self.eval_radius) if self.eval_radius >= 0 else int(math.floor(self.eps))


@dataclass(frozen=True)
class Config:
    seed: int = 0
    device: str = "cpu"
    threads: int = 1
    out_dir: str = ""
    name: str = "model"
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        # quant.weight_quantizer follows train.method, also for configs built in Python or by replace() (the CLI's
        # baselines): a method's quantizer is never silently another's
        want = METHOD_WEIGHT_QUANTIZER.get(self.train.method, "uniform")
        if self.quant.weight_quantizer != want:
            try:
                object.__setattr__(self, "quant", dataclasses.replace(self.quant, weight_quantizer=want))
            except ValueError as e:
                raise ConfigError(f"train.method = {self.train.method!r}: {e}") from None


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "quant": QuantConfig, "train": TrainConfig}


def _coerce(cls: type, key: str, value: Any) -> Any:
    """Check a value against the dataclass field type (lists become tuples)."""
    f = {f.name: f for f in fields(cls)}.get(key)
    if f is None:
        raise ConfigError(f"unknown setting {key!r} (known: {', '.join(sorted(x.name for x in fields(cls)))})")
    t = str(f.type)
    if isinstance(value, list):
        value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    if t == "float" and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if t in ("int", "float", "bool", "str") and type(value).__name__ != t:
        raise ConfigError(f"setting {key!r} must be {t}, got {value!r}")
    return value


def config_from_dict(d: Mapping[str, Any]) -> Config:
    """A :class:`Config` from a nested mapping (the TOML layout)."""
    top: dict[str, Any] = {}
    d = _with_weight_quantizer(d)
    for key, value in d.items():
        if key == "ptq":  # qverify quantize's section (qverify.quantize.PTQConfig): one file serves QAT and PTQ
            continue
        if key in _SECTIONS:
            cls = _SECTIONS[key]
            if not isinstance(value, Mapping):
                raise ConfigError(f"[{key}] must be a table")
            try:
                top[key] = cls(**{k: _coerce(cls, k, v) for k, v in value.items()})
            except (ValueError, TypeError) as e:
                raise ConfigError(f"[{key}]: {e}") from None
        else:
            top[key] = _coerce(Config, key, value)
    return Config(**top)


def _with_weight_quantizer(d: Mapping[str, Any]) -> dict[str, Any]:
    """``d`` with ``quant.weight_quantizer`` set from ``train.method`` (module docstring); a config that names
    another quantizer than its method's is an error naming both settings."""
    train_sec = d.get("train", {})
    method = train_sec.get("method", TrainConfig.method) if isinstance(train_sec, Mapping) else TrainConfig.method
    want = METHOD_WEIGHT_QUANTIZER.get(method, "uniform")
    quant = d.get("quant", {})
    if not isinstance(quant, Mapping):
        return dict(d)
    have = quant.get("weight_quantizer")
    if have is not None and have != want:
        raise ConfigError(f"quant.weight_quantizer = {have!r} does not match train.method = {method!r} (which "
                          f"sets it to {want!r}; leave quant.weight_quantizer out)")
    return {**d, "quant": {**quant, "weight_quantizer": want}}


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The nested mapping of a config (tuples as lists), the inverse of :func:`config_from_dict`."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    out: dict[str, Any] = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out[f.name] = {g.name: plain(getattr(v, g.name)) for g in fields(v)}
        else:
            out[f.name] = plain(v)
    return out


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cfg: Config, overrides: Mapping[str, Any] | Iterable[str] = ()) -> Config:
    """``{"train.epochs": 3}`` or ``["train.epochs=3", "quant.scheme=affine"]`` (values parsed as TOML, else
    taken as strings)."""
    items: list[tuple[str, Any]] = []
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        for o in overrides:
            if "=" not in o:
                raise ConfigError(f"override {o!r} is not KEY=VALUE")
            k, v = o.split("=", 1)
            items.append((k.strip(), _parse_value(v.strip())))
    d = config_to_dict(cfg)
    d["quant"].pop("weight_quantizer", None)  # derived from train.method again (an override may change it)
    for key, value in items:
        sec, _, name = key.rpartition(".")
        if sec and sec not in _SECTIONS:
            raise ConfigError(f"override {key!r}: unknown section {sec!r} (known: {', '.join(_SECTIONS)})")
        target = d[sec] if sec else d
        if name not in target:
            raise ConfigError(f"override {key!r}: unknown setting")
        target[name] = value
    return config_from_dict(d)


YAML_SUFFIXES = (".yaml", ".yml")


def _read_yaml(p: Path, text: str) -> Any:
    """A YAML document (the TOML layout: top-level settings and one mapping per section), with the line and
    column of a syntax error."""
    import yaml

    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{p}: {where}{problem}") from None
    if d is None:
        return {}
    if not isinstance(d, Mapping):
        raise ConfigError(f"{p}: the document must be a mapping of settings and sections, got {type(d).__name__}")
    return d


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | Iterable[str] = ()) -> Config:
    """Read a TOML config, or a YAML one (``.yaml``/``.yml``, same layout), (``None``: the defaults) and apply
    overrides."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text()
            d = _read_yaml(p, text) if p.suffix.lower() in YAML_SUFFIXES else tomllib.loads(text)
        except OSError as e:
            raise ConfigError(f"{p}: cannot read ({e})") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: {e}") from None
        try:
            cfg = config_from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
    return apply_overrides(cfg, overrides)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if v is None:
        raise ConfigError("None cannot be written to TOML")
    raise ConfigError(f"cannot write {v!r} to TOML")


def dump_config(cfg: Config, header: str = "") -> str:
    """TOML text of a config (readable by :func:`load_config`)."""
    d = config_to_dict(cfg)
    lines = [f"# {h}" for h in header.splitlines()] if header else []
    for k, v in d.items():
        if not isinstance(v, dict):
            lines.append(f"{k} = {_toml_value(v)}")
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines.extend(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items() if vv is not None)
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ evaluation
@dataclass(frozen=True)
class EvalResult:
    n: int
    radius: int
    correct: np.ndarray
    certified: np.ndarray

    @property
    def natural_acc(self) -> float:
        return float(self.correct.mean()) if self.n else 0.0

    @property
    def certified_acc(self) -> float:
        return float(self.certified.mean()) if self.n else 0.0


@torch.no_grad()
def evaluate(model: QuantNet, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, radius: int,
             batch_size: int = 500, device: str | torch.device = "cpu") -> EvalResult:
    """Natural accuracy and certified-by-bounds accuracy on integer boxes of ``radius`` pixels (exact integer
    intervals when the model is quantized: the same figures as :mod:`qverify.bounds.interval` on the export)."""
    x_all = torch.as_tensor(np.asarray(images))
    y_all = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    correct, cert = [], []
    for s in range(0, len(y_all), batch_size):
        x = x_all[s:s + batch_size].to(device)
        y = y_all[s:s + batch_size].to(device)
        params = model.block_params()
        out = model.layer_values(x, params)[-1].reshape(-1, model.n_classes)
        correct.append((torch.argmax(out, dim=1) == y).cpu())
        lo, hi = input_box(x, radius, 0, model.input_hi)
        olo, ohi = output_bounds(model, lo, hi, params)
        cert.append(certified_by_bounds(olo, ohi, y).cpu())
    c = torch.cat(correct).numpy() if correct else np.zeros(0, dtype=bool)
    k = torch.cat(cert).numpy() if cert else np.zeros(0, dtype=bool)
    return EvalResult(len(c), int(radius), c, k)


# ------------------------------------------------------------------------------------------ training
@dataclass
class TrainResult:
    model: QuantNet
    history: list[dict[str, Any]]
    config: Config
    eval: EvalResult | None = None
    seconds: float = 0.0

    @property
    def eval_data(self) -> str:
        """What the evaluation figures were measured on: the eval spec, held-out or (by default) training images."""
        dc = self.config.data
        where = dc.eval or (f"{dc.holdout} held-out training images" if dc.holdout else "training images")
        return where + (f" (first {dc.eval_limit})" if dc.eval_limit else "")

    @property
    def eval_on_training_images(self) -> bool:
        """Whether :attr:`eval_data` is images the model trained on (no ``data.eval``, no ``data.holdout``)."""
        return not (self.config.data.eval or self.config.data.holdout)

    def network(self, name: str | None = None):
        """The exported :class:`~qverify.network.QNetwork` (metadata: method, radius, seed, eval figures)."""
        from qverify.train.export import export_qnetwork

        return export_qnetwork(self.model, name=name or self.config.name, metadata=_metadata(self))

    def save(self, path: str | Path, name: str | None = None):
        """Export and write the native ``.qnn`` file; returns the network."""
        from qverify.io import save_model

        net = self.network(name or Path(path).stem)
        save_model(net, path)
        return net


def _metadata(res: TrainResult) -> dict[str, str]:
    cfg = res.config
    md = {"train_method": cfg.train.method, "train_eps": str(cfg.train.eps), "train_seed": str(cfg.seed),
          "train_data": cfg.data.train, "train_epochs": str(cfg.train.epochs)}
    if cfg.train.method in METHOD_WEIGHT_QUANTIZER and res.model.quantized:
        sp = weight_sparsity(res.model)
        md.update(weight_quantizer=cfg.quant.weight_quantizer, zero_weights=f"{sp['zero_weights']:.4f}",
                  zero_channels=f"{sp['zero_channels']}/{sp['channels']}")
    if res.eval is not None:
        md.update(eval_data=res.eval_data, eval_radius=str(res.eval.radius),
                  eval_natural_acc=f"{res.eval.natural_acc:.4f}", eval_certified_acc=f"{res.eval.certified_acc:.4f}",
                  eval_n=str(res.eval.n))
    return md


def select_device(name: str) -> torch.device:
    """``cpu`` (default), ``cuda[:i]``, or ``auto`` (CUDA when present)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise ConfigError(f"device must be cpu, cuda, cuda:N or auto, got {name!r}")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s)")
    return dev


def prepare_data(cfg: Config) -> tuple[Dataset, Dataset]:
    """``(train, eval)`` data sets per the config (the training set shuffled by ``shuffle_seed``)."""
    dc = cfg.data
    full = load_dataset(dc.train)
    perm = np.random.default_rng(dc.shuffle_seed).permutation(len(full))
    full = full.subset(perm)
    held = full.subset(slice(0, dc.holdout), name=f"{full.name} (held out)") if dc.holdout else None
    train = full.subset(slice(dc.holdout, None))
    if dc.train_limit:
        train = train.subset(slice(0, dc.train_limit))
    if dc.eval:
        ev = load_dataset(dc.eval)
    elif held is not None:
        ev = held
    else:
        ev = train
    if dc.eval_limit:
        ev = ev.subset(slice(0, dc.eval_limit))
    if ev.input_shape != train.input_shape or ev.input_hi != train.input_hi:
        raise ConfigError(f"eval data {ev.input_shape} on [0, {ev.input_hi}] does not match the training data "
                          f"{train.input_shape} on [0, {train.input_hi}]")
    return train, ev


def _optimizer(model: QuantNet, tc: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("_log2") or name.endswith("bias") else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr)


#: settings that do not change the trained model (a run may be resumed with other values)
_RUN_ONLY = ("progress", "out_dir", "device", "threads")


def _resume_key(cfg: Config) -> dict[str, Any]:
    return {k: v for k, v in config_to_dict(cfg).items() if k not in _RUN_ONLY}


def _with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's configuration with the settings added since it was written at their defaults (the values
    that run used without naming them)."""
    out: dict[str, Any] = {}
    for k, v in _resume_key(Config()).items():
        out[k] = {**v, **saved.get(k, {})} if isinstance(v, dict) else saved.get(k, v)
    return out


def _config_diff(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``section.key: checkpoint A, this run B`` for each setting that differs between two resume keys."""
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}.{kk}: checkpoint {a.get(kk)!r}, this run {b.get(kk)!r}"
                    for kk in sorted(set(a) | set(b)) if a.get(kk) != b.get(kk)]
        elif a != b:
            out.append(f"{k}: checkpoint {a!r}, this run {b!r}")
    return out


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _model_meta(model: QuantNet) -> dict[str, Any]:
    """What rebuilding the model from a checkpoint needs besides the config (the data's shape and classes)."""
    return {"input_shape": list(model.input_shape), "input_hi": model.input_hi, "n_classes": model.n_classes}


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> tuple[Config, QuantNet, dict[str, Any]]:
    """``(config, model, state)`` of a ``qverify train`` checkpoint (``checkpoint.pt``, written after every
    epoch). The model holds the trained *float* (latent) weights whatever its mode: a ``float-ibp`` run's
    checkpoint is the float model before its post-training quantization, a QAT run's the latent weights of its
    fake-quantized layers, so either is a float model for ``qverify quantize``. ``model.quantized`` says which
    mode the run was in. Checkpoints written before ``model_meta`` was stored rebuild the model from the data
    set the config names."""
    p = Path(path)
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise ConfigError(f"{p}: not a readable qverify train checkpoint ({e})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ConfigError(f"{p}: not a qverify train checkpoint (no model / config)")
    cfg = config_from_dict(_with_defaults(state["config"]))
    meta = state.get("model_meta")
    if meta is None:
        tr, _ = prepare_data(cfg)
        meta = {"input_shape": list(tr.input_shape), "input_hi": tr.input_hi,
                "n_classes": max(tr.n_classes, int(tr.labels.max()) + 1)}
    model = build_model(cfg.model, cfg.quant, tuple(meta["input_shape"]), int(meta["input_hi"]),
                        int(meta["n_classes"]), seed=cfg.seed)
    model.load_state_dict(state["model"])
    return cfg, model, state


def _quantize_now(model: QuantNet, calib: torch.Tensor, weights: bool) -> None:
    calibrate(model, calib, weights=weights, activations=True)
    model.quantized = True


@contextlib.contextmanager
def deterministic_kernels(device: torch.device) -> Iterator[None]:
    """On CUDA, only deterministic kernels while the block runs (cuDNN's convolution backward otherwise sums in
    a run-dependent order, and two runs with one seed drift apart: measured on an H100); the global flags are
    restored afterwards. A no-op on the CPU, whose kernels are deterministic for a fixed thread count."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    if saved[3] is None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # what cuBLAS needs for reproducible reductions
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1], saved[2]
        if saved[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def noise_seed(seed: int, epoch: int, step: int) -> int:
    """The seed of the Gaussian noise of one training step (module docstring)."""
    return (int(seed) * 1_000_003 + int(epoch) * 65_537 + int(step)) * 2 + 2**40 + 1


def noisy_inputs(x: torch.Tensor, sigma: float, input_scale: float, input_hi: int,
                 generator: torch.Generator) -> torch.Tensor:
    """``clamp(rne(x + eps / s_in), 0, input_hi)`` with ``eps ~ N(0, sigma^2 I)`` (``sigma`` in real input
    units, ``s_in = input_scale``): integer pixels ``x`` moved to the nearest grid point of the noisy real input
    ``s_in x + eps`` (module docstring). The noise is drawn on the CPU in float64 from ``generator`` (the same on
    every device); ``torch.round`` rounds half to even. Float64 rounding can differ from the exact nearest point
    only within ``~1e-13`` of a midpoint: this chooses training inputs, it decides no verdict."""
    eps = torch.randn(tuple(x.shape), generator=generator, dtype=torch.float64)
    v = x.to(torch.float64) + (eps * float(sigma)).to(x.device) * (1.0 / float(input_scale))
    return torch.clamp(torch.round(v), 0, int(input_hi)).to(x.dtype)


def train(cfg: Config, resume: bool = False, stop_after_epoch: int | None = None,
          on_epoch: Callable[[dict[str, Any]], None] | None = None,
          data: tuple[Dataset, Dataset] | None = None,
          init: Mapping[str, torch.Tensor] | None = None) -> TrainResult:
    """Train per ``cfg`` (module docstring). ``resume``: continue from ``out_dir/checkpoint.pt`` when present.
    ``stop_after_epoch``: return after that epoch (simulates an interruption). ``data``: pre-loaded sets.
    ``init``: a model state dict (a checkpoint's ``model``) to fine-tune from instead of the seeded initialisation."""
    with deterministic_kernels(select_device(cfg.device)):
        return _train(cfg, resume, stop_after_epoch, on_epoch, data, init)


def _train(cfg: Config, resume: bool, stop_after_epoch: int | None,
           on_epoch: Callable[[dict[str, Any]], None] | None, data: tuple[Dataset, Dataset] | None,
           init: Mapping[str, torch.Tensor] | None = None) -> TrainResult:
    t_start = time.perf_counter()
    tc = cfg.train
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = select_device(cfg.device)
    train_set, eval_set = data if data is not None else prepare_data(cfg)
    model = build_model(cfg.model, cfg.quant, train_set.input_shape, train_set.input_hi,
                        max(train_set.n_classes, int(train_set.labels.max()) + 1), seed=cfg.seed)
    model.to(device)
    x_train = torch.as_tensor(train_set.images)
    y_train = torch.as_tensor(train_set.labels, dtype=torch.int64)
    calib = x_train[:max(1, tc.calib_images)].to(device)
    float_method = tc.method in FLOAT_METHODS
    float_epochs = tc.epochs if float_method else tc.float_epochs
    opt = _optimizer(model, tc)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    ckpt_path = Path(cfg.out_dir) / CHECKPOINT if cfg.out_dir else None
    if resume and ckpt_path is not None and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)  # tensors and plain values only
        diff = _config_diff(_with_defaults(state.get("config") or {}), _resume_key(cfg))
        if diff:
            raise ConfigError(f"{ckpt_path}: checkpoint was written with a different configuration "
                              f"({'; '.join(diff)}); resume with the checkpoint's settings or train into a new "
                              f"directory")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        history = list(state["history"])
        start_epoch = int(state["epoch"]) + 1
    else:
        if init is not None:
            model.load_state_dict(init)
        if float_epochs > 0:
            model.quantized = False
        elif init is not None:
            _quantize_now(model, calib, weights=True)  # scales from the loaded weights and their activations
        else:
            # quantize from the start: hidden activation ranges from data (weights keep the configured range in
            # pow2, affine weight scales start at max|w| / qmax; the output keeps its configured range, since
            # the logits of an untrained model say nothing about the trained one)
            if cfg.quant.calibrate:
                calibrate(model, calib, weights=cfg.quant.scheme == "affine", activations=True, output=False)
            model.quantized = True
    n = len(y_train)
    steps = max(1, math.ceil(n / tc.batch_size))
    ibp_mixing = tc.method in ("ibp", "float-ibp")
    kappa_end = tc.kappa_end if ibp_mixing else 1.0
    sched_start = 0.0 if float_method else float(float_epochs)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = (tqdm(total=tc.epochs, initial=start_epoch, desc=f"{cfg.name} ({tc.method})", unit="epoch",
                disable=not cfg.progress) if tqdm is not None else None)
    last_eval: EvalResult | None = None
    for epoch in range(start_epoch, tc.epochs):
        t0 = time.perf_counter()
        if not float_method and epoch == float_epochs and not model.quantized:
            _quantize_now(model, calib, weights=True)
        model.train()
        eta = None
        if tc.method == BINARYRELAX:  # the relaxation is a pure function of the epoch (resume sees the same)
            eta = br_eta(epoch, tc.epochs, int(float_epochs), tc.br_eta0, tc.br_rho, tc.br_hard_epochs)
            set_relaxation(model, eta)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g)
        tot = {"loss": 0.0, "natural": 0.0, "robust": 0.0, "width": 0.0, "correct": 0, "certified": 0, "n": 0}
        sv = None
        for step in range(steps):
            idx = perm[step * tc.batch_size:(step + 1) * tc.batch_size]
            x = x_train[idx].to(device)
            y = y_train[idx].to(device)
            if tc.noise_sigma > 0:
                x = noisy_inputs(x, tc.noise_sigma, float(model.input_scale), model.input_hi,
                                 torch.Generator().manual_seed(noise_seed(cfg.seed, epoch, step)))
            sv = schedule_values(epoch, step, steps, warmup_epochs=tc.warmup_epochs, ramp_epochs=tc.ramp_epochs,
                                 eps=tc.eps, lam=tc.lam, rho=tc.rho, kappa_end=kappa_end, lr=tc.lr,
                                 milestones=tc.lr_milestones, gamma=tc.lr_gamma, ibp_mixing=ibp_mixing,
                                 start_epoch=sched_start, beta_end=tc.beta_end)
            if tc.method == "qat" or (not float_method and not model.quantized):
                eps, lam, rho, kappa = 0.0, 0.0, 0.0, 1.0
            else:
                eps, lam, rho, kappa = sv.eps, sv.lam, sv.rho, sv.kappa
            for group in opt.param_groups:
                group["lr"] = sv.lr
            beta = sv.beta if tc.bound == "crown-ibp" else 0.0
            if tc.method in ADVERSARIAL or tc.method == FLOAT_PGD_AT:
                ag = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 65_537 + step + 1)
                adv = "pgd-at" if tc.method == FLOAT_PGD_AT else tc.method
                loss, st = adversarial_objective(model, x, y, eps, adv, tc.pgd_steps, tc.pgd_alpha,
                                                 tc.pgd_restarts, tc.fgsm_alpha, tc.adv_grid, generator=ag)
            elif tc.method == GRAD_L1:  # the regularizer follows the warm-up and ramp (f = 0: plain float)
                loss, st = grad_l1_objective(model, x, y, sv.fraction * tc.lambda_w, sv.fraction * tc.lambda_a)
            elif tc.method == BINARYRELAX:
                ag = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 65_537 + step + 1)
                loss, st = binaryrelax_objective(model, x, y, eps, tc.br_beta, tc.pgd_steps, tc.pgd_alpha,
                                                 tc.pgd_restarts, tc.adv_grid, generator=ag)
            elif tc.method == ROBUST2BIT and model.quantized:  # (float pre-training: the natural loss below)
                loss, st = robust2bit_objective(model, x, y, sv.fraction * tc.feature_weight,
                                                sv.fraction * tc.spectral_weight, tc.spectral_iters)
            else:
                loss, st = objective(model, x, y, eps, kappa, lam, rho, tc.robust_term, tc.margin, beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            for k in ("loss", "natural", "robust", "width"):
                tot[k] += getattr(st, k) * st.n
            for k in ("correct", "certified", "n"):
                tot[k] += getattr(st, k)
        model.eval()
        ev = evaluate(model, eval_set.images, eval_set.labels, tc.radius, device=device)
        last_eval = ev
        m = max(tot["n"], 1)
        rec = {"epoch": epoch, "quantized": model.quantized, "loss": tot["loss"] / m,
               "natural_loss": tot["natural"] / m, "robust_loss": tot["robust"] / m, "width": tot["width"] / m,
               "train_acc": tot["correct"] / m, "train_cert": tot["certified"] / m,
               "eps": sv.eps if sv else 0.0, "lr": sv.lr if sv else tc.lr,
               "eval_acc": ev.natural_acc, "eval_cert": ev.certified_acc, "eval_radius": ev.radius,
               "seconds": time.perf_counter() - t0}
        if tc.method in METHOD_WEIGHT_QUANTIZER and model.quantized:
            sp = weight_sparsity(model)  # of the hard-quantized codes (what the hard phase and the export use)
            rec.update(zero_weights=sp["zero_weights"], zero_channels=sp["zero_channels"], channels=sp["channels"],
                       zero_channels_per_layer=sp["zero_channels_per_layer"])
            if tc.method == BINARYRELAX:
                rec["br_eta"] = eta
        history.append(rec)
        if ckpt_path is not None:
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            _save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                         "history": history, "epoch": epoch, "config": _resume_key(cfg),
                                         "model_meta": _model_meta(model)})
        if bar is not None:
            bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['eval_acc']:.3f}",
                            cert=f"{rec['eval_cert']:.3f}", eps=f"{rec['eps']:.2f}")
            bar.update(1)
        if on_epoch is not None:
            on_epoch(rec)
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
    if bar is not None:
        bar.close()
    finished = not history or history[-1]["epoch"] == tc.epochs - 1
    if finished and tc.method == BINARYRELAX:
        set_relaxation(model, None)  # the hard projection (already so in the last br_hard_epochs)
    if finished and not model.quantized:
        # float-ibp baseline (or float pre-training covering every epoch): post-training quantization
        _quantize_now(model, calib, weights=True)
        model.eval()
        ev = evaluate(model, eval_set.images, eval_set.labels, tc.radius, device=device)
        last_eval = ev
        history.append({"epoch": tc.epochs - 1, "quantized": True, "ptq": True, "eval_acc": ev.natural_acc,
                        "eval_cert": ev.certified_acc, "eval_radius": ev.radius})
    elif last_eval is None and model.quantized:
        model.eval()
        last_eval = evaluate(model, eval_set.images, eval_set.labels, tc.radius, device=device)
    return TrainResult(model, history, cfg, last_eval, time.perf_counter() - t_start)

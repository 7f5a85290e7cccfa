"""The equal-budget study (v2, docs/study.md): every arm × seed trained from one teacher, evaluated along the run.

Each run (one arm, one seed) trains in *pieces*, one per evaluation point (:mod:`adcm.study.plan`): the
training loop resumes from the run's checkpoint, stops at the point (a pause of one uninterrupted run), and
the EMA weights are evaluated there — 1-step and 2-step (every t_mid of the sweep) KID and FID with a fixed
set of sample seeds, and the noise pass-through κ at every t_mid on held-out images
(:mod:`adcm.eval.passthrough`). After each piece the run's JSON record (``runs/<arm>/<seed>/record.json``)
is rewritten: its params, the code version, every evaluation, wall and training times. A killed session
loses at most the piece in progress; :meth:`Study.run` continues where the records end (a run whose checkpoint is
missing — checkpoints are not in git — is first replayed from its seed to its last recorded point, and the loss of
that step is checked against the record's: training is deterministic), and with
``max_minutes`` it stops cleanly after the piece that crosses the time limit.

The shared records (``runs/floor.json``, ``runs/teacher.json``) hold what every arm is read against: the data
floor (held-out real images scored like a sample set, at both N), the teacher's Heun metrics, and the teacher's
ε-shifted consistency function — every arm's initialisation, the curves' starting point — with its κ.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import itertools
import json
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import adcm
from adcm.config import Params, ScoreConfig, StudyConfig
from adcm.devices import resolve_device
from adcm.errors import CheckpointError, PartitionTooLongError, TrainingError
from adcm.eval.fid import build_extractor, image_features, resolve_inception_weights
from adcm.eval.metrics import ReferenceGeometry, fid_with_interval, kid_with_spread
from adcm.eval.passthrough import noise_passthrough
from adcm.eval.reference import held_out_images, load_reference
from adcm.io.datasets import ImageDataset, load_prepared
from adcm.io.files import sha256_file, write_json
from adcm.io.model_files import TeacherFile, load_teacher
from adcm.processes import ForwardProcess
from adcm.sampling.generate import ConsistencySampler, Sampler, generate, heun_for
from adcm.study.plan import (
    ParamsLoader,
    Piece,
    arm_params,
    arm_seeds,
    eval_steps,
    find_arm,
    plan_pieces,
    selected_arms,
    study_scale,
)
from adcm.train.batches import BatchSource
from adcm.train.loop import train
from adcm.train.runs import student_file, student_process, student_spec
from adcm.train.state import load_state

__all__ = [
    "RUN_FORMAT",
    "SHARED_FORMAT",
    "KappaSet",
    "Scorer",
    "Study",
    "StudyPaths",
    "StudyProgress",
    "code_version",
    "evaluate_consistency",
    "inception_scorer",
    "read_record",
    "set_name",
]

RUN_FORMAT = "adcm-study-run/2"
SHARED_FORMAT = "adcm-study-shared/2"
MAX_RECORD_BYTES = 64 << 20
"""Largest run record read (a λ = 0.001 run with its partitions is about 1 MB)."""


def set_name(t_mid: float | None) -> str:
    """The name of an image set in the records: ``1step``, or ``2step@<σ>`` for 2-step sampling at t_mid = σ."""
    return "1step" if t_mid is None else f"2step@{t_mid:g}"


def read_record(path: Path) -> dict[str, Any] | None:
    """A record written by the study (JSON, at most :data:`MAX_RECORD_BYTES`), or None when absent.

    Raises:
        CheckpointError: unreadable, too large or not a JSON object.
    """
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_RECORD_BYTES:
        raise CheckpointError(f"{path}: a study record larger than {MAX_RECORD_BYTES} bytes")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a study record ({exc}); delete it to redo that run") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{path}: not a study record (a JSON object); delete it to redo that run")
    return record


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """The version of the library that runs: package version, SHA-256 of its source files, the git commit
    of its checkout with a dirty flag (None outside a git checkout), and the torch build and CPU model (a replay of a
    run is bit-exact only on the same ones)."""
    root = Path(adcm.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    commit: str | None = None
    dirty: bool | None = None
    try:
        run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=20, check=True)
        commit = run(["git", "-C", str(root), "rev-parse", "HEAD"]).stdout.strip() or None
        dirty = bool(run(["git", "-C", str(root), "status", "--porcelain", "--", "."]).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "adcm": adcm.__version__,
        "source_sha256": digest.hexdigest(),
        "git_commit": commit,
        "git_dirty": dirty,
        "torch": torch.__version__,
        "cpu": _cpu_model(),
    }


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in itertools.islice(f, 200):
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scorer:
    """FID (with its bootstrap interval) and KID (with its spread) of image sets against fixed reference statistics.

    Attributes:
        extract: uint8 (N, C, H, W) images → (N, D) features (clean-fid's Inception for the study,
            :func:`inception_scorer`; any fixed map in tests).
        geometry: the reference's statistics (:class:`~adcm.eval.metrics.ReferenceGeometry`).
        reference_features: the reference's features (KID).
        extractor_id: identity of ``extract`` (recorded; records of another extractor are refused).
        bootstrap_resamples, kid_subsets, kid_subset_size: ``score`` params (docs/evaluation.md).
    """

    extract: Callable[[np.ndarray], np.ndarray]
    geometry: ReferenceGeometry
    reference_features: np.ndarray
    extractor_id: str
    bootstrap_resamples: int
    kid_subsets: int
    kid_subset_size: int

    def identity(self) -> dict[str, Any]:
        """What the metrics depend on besides the images (recorded with every run)."""
        return {
            "extractor": self.extractor_id,
            "reference_count": len(self.reference_features),
            "bootstrap_resamples": self.bootstrap_resamples,
            "kid_subsets": self.kid_subsets,
            "kid_subset_size": self.kid_subset_size,
        }

    def metrics(self, features: np.ndarray) -> dict[str, Any]:
        """``n``, ``fid`` with ``fid_ci95`` (bootstrap), ``kid`` and ``kid_std`` (×10³, over subsets)."""
        fid, lo, hi = fid_with_interval(features, self.geometry, resamples=self.bootstrap_resamples)
        kid, kid_std = kid_with_spread(
            features, self.reference_features, num_subsets=self.kid_subsets, max_subset_size=self.kid_subset_size
        )
        return {
            "n": len(features),
            "fid": round(fid, 4),
            "fid_ci95": [round(lo, 4), round(hi, 4)],
            "kid": round(1e3 * kid, 4),
            "kid_std": round(1e3 * kid_std, 4),
        }

    def curve_and_final(self, images: np.ndarray, curve_images: int, final: bool) -> dict[str, dict[str, Any]]:
        """Metrics of the first ``curve_images`` images (``curve``) and, when ``final``, of all (``final``)."""
        feats = self.extract(images)
        out = {"curve": self.metrics(feats[:curve_images])}
        if final:
            out["final"] = self.metrics(feats)
        return out


def inception_scorer(cfg: ScoreConfig, data_path: Path, ref_stats: Path) -> Scorer:
    """The study's :class:`Scorer`: clean-fid's Inception (offline weights, ``score.fid_mode``) and the pipeline's
    reference statistics (``fid_reference`` stage; read, never recomputed)."""
    device = resolve_device(cfg.device, "score.device")
    weights, identity = resolve_inception_weights(
        Path(cfg.inception_path) if cfg.inception_path else None, cfg.fid_mode
    )
    ref = load_reference(ref_stats, data_path, cfg.reference_count, identity)
    extractor = build_extractor(weights, device, cfg.fid_mode)
    return Scorer(
        functools.partial(image_features, extractor=extractor, batch_size=cfg.batch_size, device=device),
        ReferenceGeometry.from_stats(ref.mu, ref.sigma),
        ref.features,
        identity,
        cfg.bootstrap_resamples,
        cfg.kid_subsets,
        cfg.kid_subset_size,
    )


# ---------------------------------------------------------------------------------------------
# Evaluating one consistency function
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KappaSet:
    """The held-out images κ is measured on (float in [-1, 1]), their one-hot labels (conditional models), the seed."""

    x0: torch.Tensor
    labels: torch.Tensor | None
    seed: int


def evaluate_consistency(
    net: nn.Module,
    process: ForwardProcess,
    *,
    shape: tuple[int, int, int],
    label_probs: torch.Tensor | None,
    images: int,
    curve_images: int,
    t_mids: Sequence[float],
    scorer: Scorer,
    kappa: KappaSet,
    batch_size: int,
    device: torch.device,
) -> dict[str, Any]:
    """1-step and 2-step (every t_mid, a VE σ) metrics and κ(t_mid) of the consistency function ``net`` of ``process``.

    Image i of every set comes from sample seed i (:func:`adcm.sampling.generate.generate`), the same for every
    model; ``images`` > ``curve_images`` adds the ``final`` metrics of all of them (the curve's are their prefix).

    Returns:
        ``{"curve": {set: metrics}, "final": {set: metrics} (if images > curve_images), "kappa": {σ: κ}}`` with
        set names from :func:`set_name`.
    """
    net = net.to(device)
    out: dict[str, Any] = {"curve": {}}
    final = images > curve_images
    if final:
        out["final"] = {}
    for t_mid in (None, *t_mids):
        if t_mid is None:
            sampler: Sampler = ConsistencySampler(process)
        else:
            t = float(process.time_from_noise_to_signal(torch.tensor(t_mid, dtype=torch.float64)))
            sampler = ConsistencySampler(process, (t,))
        imgs = generate(
            net,
            sampler,
            list(range(images)),
            shape=shape,
            batch_size=batch_size,
            device=device,
            label_probs=label_probs,
        )
        scores = scorer.curve_and_final(imgs, curve_images, final)
        for part, metrics in scores.items():
            out[part][set_name(t_mid)] = metrics
    levels = noise_passthrough(
        net,
        kappa.x0.to(device),
        list(t_mids),
        process,
        seed=kappa.seed,
        batch_size=batch_size,
        labels=None if kappa.labels is None else kappa.labels.to(device),
        device=device,
    )
    out["kappa"] = {f"{lv.sigma:g}": {k: round(v, 6) for k, v in lv.as_dict().items()} for lv in levels}
    return out


# ---------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyPaths:
    """Where the study reads and writes: the shared teacher, the prepared data, the records and the checkpoints."""

    teacher: Path
    data: Path
    runs_dir: Path
    checkpoint_dir: Path

    def record(self, arm: str, seed: int) -> Path:
        """``runs/<arm>/<seed>/record.json``."""
        return self.runs_dir / arm / str(seed) / "record.json"

    def checkpoint(self, arm: str, seed: int) -> Path:
        """``checkpoints/<arm>/<seed>.pt`` (resumable training state; never in git)."""
        return self.checkpoint_dir / arm / f"{seed}.pt"

    @property
    def floor(self) -> Path:
        """``runs/floor.json``: the data floor."""
        return self.runs_dir / "floor.json"

    @property
    def teacher_record(self) -> Path:
        """``runs/teacher.json``: the teacher's Heun metrics and its consistency function (every curve's start)."""
        return self.runs_dir / "teacher.json"


@dataclass(frozen=True)
class StudyProgress:
    """What :meth:`Study.run` did: pieces run in this call, and those still to do (empty: the study is complete)."""

    ran: int
    remaining: list[Piece]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _differing(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _check_identity(path: Path, record: dict[str, Any], identity: dict[str, Any]) -> None:
    """Refuse a record made under other settings (one line naming them and how to start over)."""
    stored = {k: record.get(k) for k in identity}
    # JSON has no tuples: compare through a JSON round trip
    wanted = json.loads(json.dumps(identity))
    if stored != wanted:
        keys = ", ".join(_differing(stored, wanted))
        raise CheckpointError(
            f"{path}: made with other settings ({keys}); delete it (and the run's checkpoint) to redo it, "
            "or restore the settings"
        )


class Study:
    """The study of one scale (full or quick): its pieces, what is done, and running them in order.

    Args:
        load: the params file with overrides (:data:`~adcm.study.plan.ParamsLoader`).
        study: the study file.
        quick: the CI-sized scale instead of the full one.
        paths: the teacher, data, records and checkpoints.
        scorer: builds the :class:`Scorer` from the params with the scale's overrides (called once, when the first
            piece needs it; the CLI passes :func:`inception_scorer` of its ``score`` group).
        log: one line per piece.
    """

    def __init__(
        self,
        load: ParamsLoader,
        study: StudyConfig,
        quick: bool,
        paths: StudyPaths,
        scorer: Callable[[Params], Scorer],
        log: Callable[[str], None] = print,
    ) -> None:
        self.load, self.study, self.quick, self.paths, self.log = load, study, quick, paths, log
        self.scale = study_scale(study, quick)
        self._make_scorer = scorer
        self._scorer: Scorer | None = None
        self._teacher: TeacherFile | None = None
        self._data: ImageDataset | None = None
        self._ids: dict[str, str] = {}
        self._kappa: dict[int | None, KappaSet] = {}
        code_version()  # read now, with the sources this process imported (it is cached for every record it writes)

    # -- lazily loaded inputs ---------------------------------------------------------------

    @property
    def scorer(self) -> Scorer:
        """The scorer (built on first use)."""
        if self._scorer is None:
            self._scorer = self._make_scorer(self.base_params)
        return self._scorer

    @property
    def teacher(self) -> TeacherFile:
        """The shared teacher (loaded on first use)."""
        if self._teacher is None:
            self._teacher = load_teacher(self.paths.teacher)
        return self._teacher

    @property
    def data(self) -> ImageDataset:
        """The prepared training images (loaded on first use)."""
        if self._data is None:
            self._data = load_prepared(self.paths.data)
        return self._data

    def _id(self, key: str, path: Path) -> str:
        if key not in self._ids:
            self._ids[key] = sha256_file(path)
        return self._ids[key]

    @property
    def base_params(self) -> Params:
        """The params with the scale's overrides (sampling, scoring and the teacher's settings)."""
        return self.load(list(self.scale.overrides or ()))

    def _shape(self) -> tuple[int, int, int]:
        return self.teacher.image_shape

    def _kappa_set(self, params: Params) -> KappaSet:
        count = params.score.reference_count
        if count not in self._kappa:
            self._kappa[count] = self._load_kappa_set(count)
        return self._kappa[count]

    def _load_kappa_set(self, count: int | None) -> KappaSet:
        images = held_out_images(self.paths.data, count, self.scale.kappa_images)
        x0 = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32) / 127.5 - 1
        labels = None
        label_dim = self.teacher.label_dim
        if label_dim:
            if self.data.labels is None:
                raise CheckpointError(
                    f"{self.paths.data}: the teacher is class-conditional but the data have no labels"
                )
            start = len(self.data.images) if count is None else count
            raw = torch.from_numpy(self.data.labels[start : start + len(images)]).long()
            labels = nn.functional.one_hot(raw, label_dim).float()
        return KappaSet(x0, labels, self.scale.kappa_seed)

    # -- the plan ---------------------------------------------------------------------------

    def pieces(self) -> list[Piece]:
        """Every piece of the study, in order (:func:`~adcm.study.plan.plan_pieces`)."""
        return plan_pieces(self.load, self.study, self.quick)

    def is_done(self, piece: Piece) -> bool:
        """Whether the records already hold ``piece`` (a failed run counts as done from its failure on)."""
        if piece.kind == "shared":
            return self.paths.floor.is_file() and self.paths.teacher_record.is_file()
        record = read_record(self.paths.record(piece.arm, piece.seed))
        if record is None:
            return False
        if record.get("failed") is not None:
            return True
        return any(e.get("step") == piece.step for e in record.get("evals", []))

    def run(self, pieces: Sequence[Piece] | None = None, *, max_minutes: float | None = None) -> StudyProgress:
        """Run the pieces not yet in the records, in order; with ``max_minutes``, start no piece after that long.

        Returns:
            How many pieces ran, and which are left (run the same call again to continue).
        """
        started = time.monotonic()
        todo = [p for p in (self.pieces() if pieces is None else pieces) if not self.is_done(p)]
        for i, piece in enumerate(todo):
            if max_minutes is not None and time.monotonic() - started >= max_minutes * 60:
                self.log(f"time limit of {max_minutes:g} min reached: {len(todo) - i} pieces left")
                return StudyProgress(i, todo[i:])
            self.log(f"piece {i + 1}/{len(todo)}: {piece.describe()}")
            self.run_piece(piece)
        return StudyProgress(len(todo), [])

    def run_piece(self, piece: Piece) -> None:
        """Run one piece and write its record(s)."""
        if piece.kind == "shared":
            self._run_shared()
        else:
            self._run_point(piece)

    # -- the shared records -----------------------------------------------------------------

    def _run_shared(self) -> None:
        params = self.base_params
        scale = self.scale
        common = {
            "format": SHARED_FORMAT,
            "data_sha256": self._id("data", self.paths.data),
            "curve_images": scale.curve_images,
            "final_images": scale.final_images,
            "scorer": self.scorer.identity(),
        }
        floor_identity = {**common, "kind": "floor", "held_out_after": params.score.reference_count}
        floor = read_record(self.paths.floor)
        if floor is not None:
            _check_identity(self.paths.floor, floor, floor_identity)
        else:
            started = time.perf_counter()
            images = held_out_images(self.paths.data, params.score.reference_count, scale.final_images)
            scores = self.scorer.curve_and_final(images, scale.curve_images, True)
            floor = {**floor_identity, **scores, "seconds": round(time.perf_counter() - started, 1)}
            floor["code"] = code_version()
            write_json(self.paths.floor, floor)
            self.log(f"data floor: KID×10³ {scores['final']['kid']:.3f}, FID {scores['final']['fid']:.2f}")
        teacher = self.teacher
        process = student_process("adcm", params.process, params.processes, teacher.sigma_data)
        s = params.teacher.sampler
        teacher_identity = {
            **common,
            "kind": "teacher",
            "teacher_sha256": self._id("teacher", self.paths.teacher),
            "teacher_meta": teacher.meta,
            "process": process.name,
            "eps": process.eps,
            "t_max": process.t_max,
            "t_mids": list(scale.t_mids),
            "kappa_images": scale.kappa_images,
            "kappa_seed": scale.kappa_seed,
            "heun": {"steps": params.sample.teacher_steps, "sigma_min": s.sigma_min, "sigma_max": s.sigma_max},
        }
        existing = read_record(self.paths.teacher_record)
        if existing is not None:
            _check_identity(self.paths.teacher_record, existing, teacher_identity)
            return
        started = time.perf_counter()
        device = resolve_device(params.sample.device, "sample.device")
        probs = self.data.label_probs(teacher.label_dim)
        heun = heun_for(teacher, params.sample.teacher_steps, s.sigma_min, s.sigma_max, s.rho)
        images = generate(
            teacher.denoiser(),
            heun,
            list(range(scale.final_images)),
            shape=self._shape(),
            batch_size=params.sample.batch_size,
            device=device,
            label_probs=probs,
        )
        record: dict[str, Any] = {
            **teacher_identity,
            "teacher_network": teacher.describe_network(),
            "heun_nfe": heun.nfe,
        }
        record["heun_metrics"] = self.scorer.curve_and_final(images, scale.curve_images, True)
        net = teacher.consistency_function(process.eps, process.name).eval().requires_grad_(False)  # type: ignore[arg-type]
        record["consistency"] = evaluate_consistency(
            net,
            process,
            shape=self._shape(),
            label_probs=probs,
            images=scale.final_images,
            curve_images=scale.curve_images,
            t_mids=scale.t_mids,
            scorer=self.scorer,
            kappa=self._kappa_set(params),
            batch_size=params.sample.batch_size,
            device=device,
        )
        record["seconds"] = round(time.perf_counter() - started, 1)
        record["code"] = code_version()
        write_json(self.paths.teacher_record, record)
        heun_final = record["heun_metrics"]["final"]
        self.log(f"teacher: Heun {heun.nfe} NFE KID×10³ {heun_final['kid']:.3f}, FID {heun_final['fid']:.2f}")

    # -- one evaluation point of one run ----------------------------------------------------

    def _run_point(self, piece: Piece) -> None:
        arm = find_arm(self.study, piece.arm)
        if piece.seed not in arm_seeds(self.study, arm, self.quick):
            raise CheckpointError(f"arm {arm.name} does not run seed {piece.seed} in this study")
        params = arm_params(self.load, self.study, arm, piece.seed, self.quick)
        teacher, data, scale = self.teacher, self.data, self.scale
        device = resolve_device(params.train.device, "train.device")
        teacher_id = self._id("teacher", self.paths.teacher)
        spec = student_spec(
            params,
            teacher,
            data,
            teacher_id=teacher_id,
            data_id=self._id("data", self.paths.data),
            world_size=1,
            device=device,
            where=str(self.paths.teacher),
        )
        steps = spec.settings.total_steps
        points = eval_steps(scale, steps)
        if piece.step not in points:
            raise CheckpointError(f"{piece.describe()}: not an evaluation point of this run ({points})")
        process = student_process(params.method, params.process, params.processes, teacher.sigma_data)
        schedule = params.train.adcm.lambda_schedule if params.method == "adcm" else None
        identity = {
            "format": RUN_FORMAT,
            "arm": arm.name,
            "method": params.method,
            "lambda": params.lam if params.method == "adcm" else None,
            "lambda_schedule": None if schedule is None else [[s.start, s.lam] for s in schedule],
            "process": params.process,
            "student_process": process.name,
            "seed": params.seed,
            "budget_kimg": params.train.duration_kimg,
            "batch_size": params.train.batch_size,
            "total_steps": steps,
            "eval_steps": points,
            "eval_fractions": list(scale.eval_fractions),
            "fingerprint": spec.fingerprint,
            "teacher_sha256": teacher_id,
            "data_sha256": self._id("data", self.paths.data),
            "evaluation": {
                "curve_images": scale.curve_images,
                "final_images": scale.final_images,
                "sample_seeds": f"0 … {scale.final_images - 1} (image i from seed i)",
                "t_mids": list(scale.t_mids),
                "kappa_images": scale.kappa_images,
                "kappa_seed": scale.kappa_seed,
                "kappa_held_out_after": params.score.reference_count,
                "scorer": self.scorer.identity(),
            },
        }
        path = self.paths.record(arm.name, piece.seed)
        record = read_record(path)
        if record is None:
            record = {
                **identity,
                "teacher_network": teacher.describe_network(),
                "params": dataclasses.asdict(params),
                "evals": [],
                "pieces": [],
            }
        else:
            _check_identity(path, record, identity)
        done = {e["step"] for e in record["evals"]}
        if piece.step in done or record.get("failed") is not None:
            return
        missing = [p for p in points if p < piece.step and p not in done]
        if missing:
            raise CheckpointError(f"{path}: evaluation points {missing} come before step {piece.step}; run them first")
        checkpoint = self.paths.checkpoint(arm.name, piece.seed)
        state_step = 0
        if checkpoint.is_file():
            state = load_state(checkpoint)
            if state.get("fingerprint") != spec.fingerprint:
                raise CheckpointError(
                    f"{checkpoint}: a training state of other settings than {path} (its fingerprint differs: e.g. "
                    "the arm's overrides changed); delete it to start the run over"
                )
            state_step = int(state["step"])
            del state
        if state_step > piece.step:
            raise CheckpointError(
                f"{checkpoint}: at step {state_step}, past the evaluation point {piece.step} that {path} lacks; "
                "delete both to redo the run"
            )
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        started, wall_started = time.perf_counter(), _now()
        replay: dict[str, Any] | None = None
        last_done = max(done, default=0)
        try:
            if state_step < last_done:
                # Checkpoints are not in git: a new checkout has the record but not the training state. Training is
                # deterministic from the seed, so the run is replayed to its last recorded point, and the loss of
                # that step is compared with the recorded one (identical on the same CPU and torch build).
                self.log(
                    f"{arm.name} seed {piece.seed}: no checkpoint at step {last_done}; replaying from {state_step}"
                )
                replayed = train(
                    spec,
                    BatchSource(data.images, data.labels, teacher.label_dim, params.train.xflip, device),
                    checkpoint_path=checkpoint,
                    device=device,
                    show_progress=False,
                    stop_after_steps=last_done - state_step,
                )
                recorded = next(e for e in record["evals"] if e["step"] == last_done)["final_loss"]
                replay = {
                    "from_step": state_step,
                    "to_step": last_done,
                    "recorded_loss": recorded,
                    "replayed_loss": replayed.final_loss,
                    "identical": recorded == replayed.final_loss,
                    "seconds": round(time.perf_counter() - started, 1),
                }
                if not replay["identical"]:
                    self.log(
                        f"{arm.name} seed {piece.seed}: the replay's loss at step {last_done} is "
                        f"{replayed.final_loss!r}, "
                        f"the record's {recorded!r} (another CPU or torch build): the run continues from the replay"
                    )
                state_step = last_done
            batches = BatchSource(data.images, data.labels, teacher.label_dim, params.train.xflip, device)
            run = train(
                spec,
                batches,
                checkpoint_path=checkpoint,
                device=device,
                show_progress=False,
                stop_after_steps=piece.step - state_step,
            )
        except (TrainingError, PartitionTooLongError) as exc:
            # A diverged or unbuildable run is a result of its arm (e.g. a λ too small), not a broken study.
            record["failed"] = {"step": piece.step, "error": str(exc), "at": _now()}
            record["pieces"].append({"step": piece.step, "started_at": wall_started, "code": code_version()})
            write_json(path, record)
            self.log(f"{arm.name} seed {piece.seed}: FAILED before step {piece.step}: {exc}")
            return
        trained = time.perf_counter()
        student = student_file(params, teacher, spec, run, teacher_id)
        scores = evaluate_consistency(
            student.consistency_function(),
            student.sampling_process(),
            shape=self._shape(),
            label_probs=data.label_probs(teacher.label_dim),
            images=scale.final_images if piece.step == steps else scale.curve_images,
            curve_images=scale.curve_images,
            t_mids=scale.t_mids,
            scorer=self.scorer,
            kappa=self._kappa_set(params),
            batch_size=params.sample.batch_size,
            device=resolve_device(params.sample.device, "sample.device"),
        )
        latest = run.partitions[-1] if run.partitions else None
        record["evals"].append(
            {
                "step": run.steps,
                "fraction": piece.fraction,
                "kimg": run.kimg,
                "train_seconds": round(run.train_seconds, 1),
                "rebuild_seconds": round(run.rebuild_seconds, 1),
                "eval_seconds": round(time.perf_counter() - trained, 1),
                "final_loss": run.final_loss if np.isfinite(run.final_loss) else None,
                "skipped_steps": run.skipped_steps,
                "partition_points": None if latest is None else len(latest[1]),
                "partition_built_at": None if latest is None else latest[0],
                **scores,
            }
        )
        record["evals"].sort(key=lambda e: e["step"])
        record["partitions"] = [[it, pts] for it, pts in run.partitions]
        record["schedule_process"] = {"name": process.name, "eps": process.eps, "t_max": process.t_max}
        record["pieces"].append(
            {
                "step": piece.step,
                "started_at": wall_started,
                "wall_seconds": round(time.perf_counter() - started, 1),
                "code": code_version(),
                **({} if replay is None else {"replay": replay}),
            }
        )
        record["wall_seconds"] = round(sum(p.get("wall_seconds", 0.0) for p in record["pieces"]), 1)
        write_json(path, record)
        one = scores.get("final", scores["curve"])["1step"]
        kappas = ", ".join(f"{k}: {v['kappa']:.3f}" for k, v in scores["kappa"].items())
        self.log(
            f"{arm.name} seed {piece.seed}: {run.kimg:g} kimg, 1-step KID×10³ {one['kid']:.3f} FID {one['fid']:.2f}, "
            f"κ {kappas}"
        )

    # -- selections -------------------------------------------------------------------------

    def shared_pieces(self) -> list[Piece]:
        """The shared records' piece (``adcm study shared``)."""
        return [p for p in self.pieces() if p.kind == "shared"]

    def run_pieces(self, arm: str, seed: int) -> list[Piece]:
        """Every evaluation point of one arm × seed, in order (``adcm study run``).

        Raises:
            ParamsError: an unknown arm; CheckpointError: the arm does not run that seed at this scale.
        """
        find_arm(self.study, arm)
        pieces = [p for p in self.pieces() if p.kind == "point" and p.arm == arm and p.seed == seed]
        if arm not in {a.name for a in selected_arms(self.study, self.quick)} or not pieces:
            raise CheckpointError(f"arm {arm} with seed {seed} is not part of this study's scale")
        return pieces

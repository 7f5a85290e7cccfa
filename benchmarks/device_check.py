"""The device check: one command on a GPU machine, ≤ 8 minutes on one H100/H200, no network; one JSON and a table.

    python benchmarks/device_check.py                  # on a GPU, from the repository root
    python benchmarks/device_check.py --no-dvc-repro   # without the pipeline run
    python benchmarks/device_check.py --smoke          # tiny sizes on the CPU in seconds (the test suite runs it)

Measured, each section under its own time budget (a section that fails or runs out of time is recorded in the
JSON and the others go on; the JSON is rewritten after every section):

* **steps** — images/s of one real optimizer step (:meth:`adcm.train.loop.Trainer.step` of the RunSpecs the
  pipeline builds: draws, forwards, JVP, backward, optimizer, EMA) of diffusion training (EDM loss), ECT, ADCM
  (partition given) and sCT, for the CIFAR-10 DDPM++ (55.7M parameters, batch 128, dropout 0.13) and EDM2-S at
  64×64 (280M, class-conditional, batch 64, halved until it fits), in fp32 (TF32 off) and bf16 autocast; the
  peak memory of each; FLOPs of one step counted with ``torch.utils.flop_counter.FlopCounterMode`` and the model
  FLOP utilisation MFU = FLOPs / step time / the device's dense bf16 peak (:data:`PEAK_BF16_TFLOPS`; unknown
  device → null). Also one ECT step in bf16 with activation checkpointing (memory vs speed).
* **agreement** — bf16 vs fp32 over 20 training steps from the same start (ECT and sCT, CIFAR-10 DDPM++): the
  largest loss difference relative to the mean |loss|, and the difference of the weight updates.
* **adcm_rebuild** — one ADCM partition rebuild at λ = 0.01 with the batched builder (Trainer.rebuild), warm.
* **sampling** — 1-step and 2-step consistency sampling and the teacher's Heun (35 NFE), images/s.
* **fid_features** — Inception feature extraction (:mod:`adcm.eval.fid`, clean-fid's resize on the CPU), images/s.
* **compiled** — the bf16 steps again with ``torch.compile`` of the student (compile time recorded), and a
  check that the compiled student draws the eager target's dropout masks.
* **dvc_repro** — ``dvc repro`` of the embedded default (params.yaml as it is: devices ``auto`` → CUDA) in a
  temporary copy of the repository's files (``git ls-files``, plus ``git init``), its wall time and scores; the
  working repository's outputs are never touched. On by default on CUDA; ``--no-dvc-repro`` skips it.

The targets (one H200, bf16) are printed next to the numbers: ECT and ADCM steps of the CIFAR-10 DDPM++
≥ 2,500 img/s, sCT ≥ 1,200 img/s, MFU ≥ 30 %, the embedded default's ``dvc repro`` ≤ 2 minutes.
Not a test: nothing is asserted (the ``--smoke`` run is, in tests/test_device_check.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fnmatch
import gc
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from adcm.config import Params, load_params
from adcm.io.datasets import ImageDataset
from adcm.io.files import atomic_write_text
from adcm.io.model_files import TeacherFile
from adcm.nets.edm2 import edm2_img64_config
from adcm.nets.precond import denoiser
from adcm.processes import VEProcess, coordinates
from adcm.sampling.generate import ConsistencySampler, HeunSampler, generate
from adcm.train.batches import BatchSource
from adcm.train.fastpath import FastPath
from adcm.train.loop import Trainer
from adcm.train.progress import peak_memory_mib, reset_peak_memory
from adcm.train.runs import student_spec, teacher_spec

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = "adcm-device-check/1"

#: Dense bf16 peak FLOP/s (tensor cores, no sparsity) by a substring of ``torch.cuda.get_device_name``; the first
#: match wins. Unknown devices get no MFU.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
)

#: The targets on one H200, bf16 (issue 18).
TARGETS: dict[str, dict[str, Any]] = {
    "ddpmpp_ect_img_per_s": {"min": 2500.0, "what": "ECT step, CIFAR-10 DDPM++ batch 128, bf16 (img/s)"},
    "ddpmpp_adcm_img_per_s": {"min": 2500.0, "what": "ADCM step, CIFAR-10 DDPM++ batch 128, bf16 (img/s)"},
    "ddpmpp_sct_img_per_s": {"min": 1200.0, "what": "sCT step, CIFAR-10 DDPM++ batch 128, bf16 (img/s)"},
    "mfu": {"min": 0.30, "what": "model FLOP utilisation, best bf16 step of the CIFAR-10 DDPM++"},
    "dvc_repro_s": {"max": 120.0, "what": "`dvc repro` of the embedded default (s)"},
}

METHODS = ("diffusion", "ect", "adcm", "sct")

# EDM's CIFAR-10 DDPM++ (as benchmarks/bench.py --network cifar10), 55.73M parameters.
CIFAR10_DDPMPP: dict[str, Any] = dict(
    img_resolution=32,
    in_channels=3,
    out_channels=3,
    label_dim=0,
    augment_dim=9,
    model_channels=128,
    channel_mult=[2, 2, 2],
    channel_mult_emb=4,
    num_blocks=4,
    attn_resolutions=[16],
    dropout=0.13,
    label_dropout=0.0,
    embedding_type="positional",
    channel_mult_noise=1,
    encoder_type="standard",
    decoder_type="standard",
    resample_filter=[1, 1],
)
TINY_DDPMPP: dict[str, Any] = dict(
    CIFAR10_DDPMPP, img_resolution=8, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]
)
TINY_EDM2: dict[str, Any] = dict(
    img_resolution=8,
    img_channels=3,
    label_dim=10,
    model_channels=16,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[4],
    channels_per_head=8,
    dropout=0.0,
    use_fp16=False,
    logvar_channels=16,
)


@dataclasses.dataclass(frozen=True)
class Case:
    """One network of the check: its backbone kind and settings, the batch, the student's dropout."""

    name: str
    network: str
    kwargs: dict[str, Any]
    batch: int
    dropout: float
    halve_on_oom: bool = False

    @property
    def shape(self) -> tuple[int, int, int]:
        k = self.kwargs
        channels = k["img_channels"] if self.network == "edm2" else k["in_channels"]
        return int(channels), int(k["img_resolution"]), int(k["img_resolution"])

    @property
    def label_dim(self) -> int:
        return int(self.kwargs.get("label_dim", 0))


def cases(smoke: bool) -> list[Case]:
    """The CIFAR-10 DDPM++ at batch 128 and EDM2-S at 64×64 (tiny stand-ins with ``smoke``)."""
    if smoke:
        return [
            Case("ddpmpp-tiny", "ddpmpp", TINY_DDPMPP, 4, 0.13),
            Case("edm2-tiny", "edm2", TINY_EDM2, 4, 0.0),
        ]
    return [
        Case("ddpmpp-cifar10", "ddpmpp", CIFAR10_DDPMPP, 128, 0.13),
        Case("edm2-s-64", "edm2", edm2_img64_config("s"), 64, 0.0, halve_on_oom=True),
    ]


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a device (:data:`PEAK_BF16_TFLOPS`), None when unknown."""
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return value
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class SectionTimeoutError(Exception):
    """A section ran out of its time budget (what it had is kept)."""


class Check:
    """The report under construction, the clock, and what every section shares."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.smoke: bool = args.smoke
        self.device = self._device(args.device)
        self.start = time.perf_counter()
        self.deadline = self.start + args.budget_s
        self.device_name = (
            torch.cuda.get_device_name(self.device)
            if self.device.type == "cuda"
            else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
        )
        self.peak = peak_tflops(self.device_name) if self.device.type == "cuda" else None
        self.report: dict[str, Any] = {
            "schema": SCHEMA,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
            "smoke": self.smoke,
            "budget_s": args.budget_s,
            "targets": TARGETS,
            "sections": {},
        }
        self.section_deadline = self.deadline
        self._teachers: dict[str, TeacherFile] = {}
        #: FLOPs of one step per image, by (network, method), counted once (eager)
        self.flops: dict[tuple[str, str], float] = {}

    @staticmethod
    def _device(spec: str) -> torch.device:
        if spec == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(spec)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("error: --device cuda was asked for but CUDA is not available on this machine", file=sys.stderr)
            raise SystemExit(2)
        return device

    # -- clock and sections ------------------------------------------------------------------------------

    def left(self) -> float:
        """Seconds left to the current section."""
        return self.section_deadline - time.perf_counter()

    def need(self, seconds: float, what: str) -> None:
        """Stop the section (recorded as out of time) unless ``seconds`` are left for ``what``."""
        if self.left() < seconds:
            raise SectionTimeoutError(
                f"{what}: {max(self.left(), 0):.0f} s left of the section's budget, {seconds:.0f} s needed"
            )

    @contextlib.contextmanager
    def section(self, name: str, budget_s: float, reserve_s: float = 0.0) -> Iterator[dict[str, Any] | None]:
        """Run one section with at most ``budget_s`` seconds, leaving ``reserve_s`` of the whole budget for
        later sections; yields the section's result dict (None: no time left, skipped). Its outcome is
        recorded whatever happens, and the JSON rewritten."""
        result: dict[str, Any] = {}
        entry: dict[str, Any] = {"status": "ok", "budget_s": 0.0, "seconds": 0.0, "result": result}
        self.report["sections"][name] = entry
        now = time.perf_counter()
        self.section_deadline = min(now + budget_s, self.deadline - reserve_s)
        entry["budget_s"] = round(max(self.section_deadline - now, 0.0), 1)
        skip = self.section_deadline - now < 1.0
        if skip:
            entry["status"] = "skipped"
            entry["error"] = "no time left in the overall budget"
        try:
            yield None if skip else result
        except SectionTimeoutError as exc:
            entry["status"] = "out of time"
            entry["error"] = str(exc)
        except Exception as exc:  # one section's failure must not stop the others
            entry["status"] = "failed"
            entry["error"] = _short(exc)
            entry["traceback"] = traceback.format_exc(limit=6)[-3000:]
        finally:
            entry["seconds"] = round(time.perf_counter() - now, 1)
            self.section_deadline = self.deadline
            _free(self.device)
            self._write()
            print(
                f"[{time.perf_counter() - self.start:6.1f} s] {name}: {entry['status']} ({entry['seconds']} s)",
                flush=True,
            )

    def _write(self) -> None:
        self.report["total_seconds"] = round(time.perf_counter() - self.start, 1)
        atomic_write_text(self.args.out, json.dumps(self.report, indent=2, default=_json_default) + "\n")

    # -- building the real training steps ------------------------------------------------------------

    def params(self, case: Case, method: str, overrides: dict[str, Any] | None = None) -> Params:
        """params.yaml with the case's batch and dropout, the method, λ = 0.01, VE, the batched builder, and a
        100k-iteration run (so every schedule is at a realistic point)."""
        b = case.batch
        sets = [
            f"train.batch_size={b}",
            "train.batch_per_step=null",
            f"teacher.batch_size={b}",
            "teacher.batch_per_step=null",
            "process=ve",
            f"method={'ect' if method == 'diffusion' else method}",
            "lambda=0.01",
            f"train.dropout={case.dropout}",
            "train.adcm.partition=batched",
            f"train.duration_kimg={100_000 * b / 1000:g}",
            f"teacher.duration_kimg={100_000 * b / 1000:g}",
        ]
        sets += [f"{k}={v}" for k, v in (overrides or {}).items()]
        return load_params(self.args.params, sets)

    def data(self, case: Case) -> ImageDataset:
        rng = np.random.default_rng(0)
        n = max(4 * case.batch, 64)
        images = rng.integers(0, 256, size=(n, *case.shape), dtype=np.uint8)
        if case.label_dim:
            labels = rng.integers(0, case.label_dim, size=n).astype(np.int64)
            return ImageDataset(images, labels, "check", [str(i) for i in range(case.label_dim)])
        return ImageDataset(images, None, "check", None)

    def teacher(self, case: Case) -> TeacherFile:
        """A randomly initialised teacher of the case's network (seeded; the weights do not change the cost)."""
        if case.name not in self._teachers:
            torch.manual_seed(0)
            net = denoiser(case.kwargs, 0.5, "ve", network=case.network)  # type: ignore[arg-type]
            self._teachers[case.name] = TeacherFile(
                case.kwargs,
                0.5,
                net.state_dict(),
                {"source": "device-check"},
                network=case.network,  # type: ignore[arg-type]
            )
        return self._teachers[case.name]

    def trainer(
        self,
        case: Case,
        method: str,
        fast: FastPath,
        *,
        checkpointing: bool = False,
        overrides: dict[str, Any] | None = None,
    ) -> Trainer:
        """The pipeline's run of ``method`` (diffusion: the teacher's run on the case's network) with ``fast``."""
        params = self.params(case, method, overrides)
        teacher = self.teacher(case)
        data = self.data(case)
        if method == "diffusion":
            spec = dataclasses.replace(teacher_spec(params, data, "check"), net=teacher.denoiser())
        else:
            spec = student_spec(
                params, teacher, data, teacher_id="check", data_id="check", world_size=1, device=self.device
            )
        settings = dataclasses.replace(spec.settings, fast=fast, activation_checkpointing=checkpointing)
        spec = dataclasses.replace(spec, settings=settings)
        trainer = Trainer(spec, BatchSource(data.images, data.labels, case.label_dim, False, self.device), self.device)
        if self.device.type == "cuda":  # process-wide flags: fp32 rows are strict fp32, whatever ran before
            torch.backends.cuda.matmul.allow_tf32 = fast.tf32
            torch.backends.cudnn.allow_tf32 = fast.tf32
        if method == "adcm":  # a geometric partition of the size λ = 0.01 gives (the rebuild is its own section)
            ve = VEProcess(eps=params.processes.ve.eps, t_max=params.processes.ve.t_max)
            pts = torch.logspace(math.log10(ve.t_max), math.log10(ve.eps), 1044, dtype=torch.float64)
            trainer.objective.load_state_dict({"kind": "adcm", "seed": 0, "partitions": [(0, pts)]})
        return trainer

    def fast(self, bf16: bool, compile: bool = False) -> FastPath:
        """fp32 (TF32 off) or the bf16 path (bf16, channels_last, TF32, fused optimizer), optionally compiled;
        on the CPU through the same code (``force_cpu``)."""
        requested = FastPath(bf16=bf16, channels_last=bf16, tf32=bf16, fused_optimizer=bf16, compile=compile)
        return FastPath.for_device(requested, self.device, force_cpu=True)

    def time_steps(self, trainer: Trainer, first_step: int = 1) -> dict[str, Any]:
        """Warm-up (the first step timed apart: compilation, kernel selection), then steps until
        ``--min-seconds`` have passed (at least 2, at most 50, or 1 with ``--smoke``); the peak memory of the
        timed steps."""
        device, step = self.device, first_step
        _sync(device)
        t0 = time.perf_counter()
        trainer.step(step)
        _sync(device)
        first_s = time.perf_counter() - t0
        step += 1
        if not self.smoke:
            trainer.step(step)
            step += 1
        reset_peak_memory(device)
        min_steps, max_steps = (1, 1) if self.smoke else (2, 50)
        _sync(device)
        t0 = time.perf_counter()
        n = 0
        while n < min_steps or (time.perf_counter() - t0 < self.args.min_seconds and n < max_steps):
            trainer.step(step + n)
            n += 1
            if device.type == "cuda" and n == min_steps:
                _sync(device)
        _sync(device)
        per_step = (time.perf_counter() - t0) / n
        return {
            "first_step_s": round(first_s, 3),
            "timed_steps": n,
            "step_ms": round(per_step * 1000, 3),
            "img_per_s": round(trainer.local_batch / per_step, 1),
            "peak_memory_mib": _round(peak_memory_mib(device)),
        }

    def count_flops(self, trainer: Trainer, step: int = 1) -> int:
        """FLOPs of one training step (matmuls, convolutions, attention: ``FlopCounterMode``)."""
        with FlopCounterMode(display=False) as counter:
            trainer.step(step)
        return int(counter.get_total_flops())

    def mfu(self, flops: int | None, step_ms: float) -> float | None:
        if flops is None or self.peak is None or step_ms <= 0:
            return None
        return round(flops / (step_ms / 1000) / (self.peak * 1e12), 4)


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


# --------------------------------------------------------------------------------------------------------------
# Sections


def section_environment(check: Check, result: dict[str, Any]) -> None:
    result.update(
        device=check.device_name,
        device_type=check.device.type,
        peak_bf16_tflops=check.peak,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
    )
    if check.device.type == "cuda":
        props = torch.cuda.get_device_properties(check.device)
        result["memory_gib"] = round(props.total_memory / 2**30, 1)
        result["capability"] = f"{props.major}.{props.minor}"
        result["bf16_supported"] = torch.cuda.is_bf16_supported()
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        result["git_commit"] = commit.stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=20)
        result["git_dirty"] = bool(dirty.stdout.strip())


def _step_row(check: Check, case: Case, method: str, mode: str) -> dict[str, Any]:
    """Time one (network, method, mode); on CUDA out of memory, halve the batch where the case allows it."""
    bf16, compiled, ckpt = mode != "fp32", mode.endswith("compile"), mode.endswith("checkpointing")
    key = (case.name, method)
    case_now = case
    while True:
        trainer: Trainer | None = None
        try:
            trainer = check.trainer(case_now, method, check.fast(bf16, compiled), checkpointing=ckpt)
            row: dict[str, Any] = {"network": case.name, "method": method, "mode": mode, "batch": case_now.batch}
            if check.flops.get(key) is None and not compiled:  # counted eagerly (inductor kernels are not seen)
                check.flops[key] = check.count_flops(trainer) / case_now.batch
            row.update(check.time_steps(trainer, first_step=2))
            if compiled:
                row["compile_s"] = row["first_step_s"]
            per_image = check.flops.get(key)
            row["flops_per_step"] = None if per_image is None else int(per_image * case_now.batch)
            row["mfu"] = check.mfu(row["flops_per_step"], row["step_ms"])
            if compiled and method == "ect":
                row["compiled_vs_eager"] = _compiled_vs_eager(check, trainer)
            return row
        except Exception as exc:
            if not (_is_oom(exc) and case_now.halve_on_oom and case_now.batch > 1):
                raise
            case_now = dataclasses.replace(case_now, batch=case_now.batch // 2)
        finally:
            trainer = None
            _free(check.device)


def _compiled_vs_eager(check: Check, trainer: Trainer) -> dict[str, Any]:
    """The compiled student and the eager network on the same input and seed (bf16 as trained): with the same
    dropout masks they differ by rounding only (``masks_match``: relative difference < 0.05)."""
    device = check.device
    gen = torch.Generator().manual_seed(7)
    # the training batch shape, grad mode and autocast: the graph compiled for training, no recompilation
    x0, labels = trainer.data.sample(trainer.local_batch, gen)
    t = torch.full((x0.shape[0],), 1.0, device=device)
    x = x0 + t.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen).to(device)
    outs = []
    for fn in (trainer.student, trainer.net):
        torch.manual_seed(11)
        with torch.autocast(device.type, torch.bfloat16, enabled=trainer.spec.settings.fast.bf16):
            outs.append(fn(x, t, labels).detach().float())
    trainer.optimizer.zero_grad(set_to_none=True)
    rel = float((outs[0] - outs[1]).abs().max() / outs[1].abs().max().clamp_min(1e-12))
    dropout = max(
        (m.dropout for m in trainer.net.modules() if isinstance(getattr(m, "dropout", None), float)), default=0.0
    )
    return {"max_rel_diff": rel, "masks_match": rel < 0.05, "dropout": dropout}


def section_steps(
    check: Check, result: dict[str, Any], modes: tuple[str, ...], methods: tuple[str, ...] = METHODS
) -> None:
    """The step table for ``modes`` over both networks and ``methods`` (rows appended as they finish; a row is
    started only while the time it may need is left)."""
    rows: list[dict[str, Any]] = result.setdefault("rows", [])
    per_row = 3.0 if check.smoke else (15.0 if "compile" not in modes[0] else 60.0)
    for case in cases(check.smoke):
        for mode in modes:
            for method in methods:
                check.need(per_row, f"{case.name} {method} {mode}")
                error = None
                try:
                    rows.append(_step_row(check, case, method, mode))
                except SectionTimeoutError:
                    raise
                except Exception as exc:  # recorded per row
                    error = _short(exc)
                if error is not None:  # outside the handler, so that the failed step's tensors can be freed
                    row = {"network": case.name, "method": method, "mode": mode, "batch": case.batch, "error": error}
                    rows.append(row)
                    _free(check.device)
                check._write()
    result["rows"] = rows


def section_checkpointing(check: Check, result: dict[str, Any]) -> None:
    """One ECT step of the first network in bf16 with activation checkpointing: memory and speed."""
    case = cases(check.smoke)[0]
    check.need(3.0 if check.smoke else 15.0, "activation checkpointing")
    rows = check.report["sections"]["steps"]["result"].setdefault("rows", [])
    row = _step_row(check, case, "ect", "bf16+checkpointing")
    rows.append(row)
    result.update(row)


def _train_steps(trainer: Trainer, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    losses = []
    for k in range(steps):
        outcome = trainer.step(k)
        losses.append(float(outcome.loss))
    weights = {
        k: v.detach().float().cpu().clone() for k, v in trainer.net.state_dict().items() if v.is_floating_point()
    }
    return losses, weights


def section_agreement(check: Check, result: dict[str, Any]) -> None:
    """bf16 (autocast only) vs fp32 (TF32 off) over ``--agreement-steps`` steps from the same weights and draws
    (batch ≤ 32 on a GPU: twenty strict-fp32 steps at 128 would take most of the section's budget)."""
    case = cases(check.smoke)[0]
    case = dataclasses.replace(case, batch=case.batch if check.smoke else min(case.batch, 32))
    steps = check.args.agreement_steps
    for method in ("ect", "sct"):
        check.need(3.0 if check.smoke else 20.0, f"agreement {method}")
        init: dict[str, torch.Tensor] | None = None
        runs = []
        for bf16 in (False, True):
            fast = FastPath.for_device(FastPath(bf16=bf16), check.device, force_cpu=True)
            trainer = check.trainer(case, method, fast)
            if init is None:
                init = {
                    k: v.detach().float().cpu().clone()
                    for k, v in trainer.net.state_dict().items()
                    if v.is_floating_point()
                }
            runs.append(_train_steps(trainer, steps))
            del trainer
            _free(check.device)
        assert init is not None
        (loss32, w32), (loss16, w16) = runs
        l32, l16 = torch.tensor(loss32, dtype=torch.float64), torch.tensor(loss16, dtype=torch.float64)
        diff = torch.cat([(w16[k] - w32[k]).flatten() for k in w32]).double().norm()
        update = torch.cat([(w32[k] - init[k]).flatten() for k in w32]).double().norm()
        result[method] = {
            "steps": steps,
            "batch": case.batch,
            "max_abs_loss_diff_over_mean_abs_loss": float((l16 - l32).abs().max() / l32.abs().mean()),
            "update_difference": float(diff / update) if update > 0 else None,
            "loss_fp32": [round(v, 6) for v in loss32],
            "loss_bf16": [round(v, 6) for v in loss16],
        }


def section_rebuild(check: Check, result: dict[str, Any]) -> None:
    """One ADCM partition rebuild at λ = 0.01 with the batched builder, after a warm-up rebuild."""
    case = cases(check.smoke)[0]
    extra = {"train.adcm.partition_batch_size": 4} if check.smoke else {}
    trainer = check.trainer(case, "adcm", check.fast(False), overrides=extra)
    objective = trainer.objective
    params = check.params(case, "adcm", extra)
    times = []
    for iteration in (1, 2):
        check.need(2.0, "ADCM rebuild")
        _sync(check.device)
        t0 = time.perf_counter()
        objective.rebuild(iteration, trainer._frozen_fn, trainer._draw_x0, trainer.net)
        _sync(check.device)
        times.append(time.perf_counter() - t0)
    result.update(
        lam=0.01,
        builder=params.train.adcm.partition,
        partition_times=params.train.adcm.partition_times,
        partition_batch_size=params.train.adcm.partition_batch_size,
        points=int(objective.partitions[-1][1].numel()),
        first_s=round(times[0], 3),
        seconds=round(times[1], 3),
        network=case.name,
    )


def section_sampling(check: Check, result: dict[str, Any]) -> None:
    """1-step, 2-step (t_mid of ADCM) and the teacher's Heun 35 NFE, images/s (fp32, eval mode)."""
    case = cases(check.smoke)[0]
    params = check.params(case, "adcm")
    ve = VEProcess(eps=params.processes.ve.eps, t_max=params.processes.ve.t_max)
    teacher = check.teacher(case)
    student = teacher.consistency_function(ve.eps).to(check.device).eval()
    heun_net = teacher.denoiser().to(check.device)
    n = case.batch
    samplers = {
        "1step": (student, ConsistencySampler(ve)),
        "2step": (student, ConsistencySampler(ve, (params.sample.t_mid.adcm,))),
        "heun35": (heun_net, HeunSampler(coordinates("ve"), params.teacher.sampler.num_steps, ve.eps, ve.t_max)),
    }
    for name, (net, sampler) in samplers.items():
        check.need(2.0, f"sampling {name}")
        seconds = []
        for _ in range(1 if check.smoke else 3):
            _sync(check.device)
            t0 = time.perf_counter()
            generate(net, sampler, list(range(n)), shape=case.shape, batch_size=n, device=check.device)
            _sync(check.device)
            seconds.append(time.perf_counter() - t0)
        result[name] = {"img_per_s": round(n / statistics.median(seconds[-2:]), 1), "batch": n, "nfe": sampler.nfe}


def section_fid(check: Check, result: dict[str, Any]) -> None:
    """Inception features (clean-fid mode "clean": the CPU resize to 299×299, then the network), images/s."""
    from adcm.eval.fid import build_extractor, image_features, resolve_inception_weights

    weights, identity = resolve_inception_weights(None)
    extractor = build_extractor(weights, check.device)
    n, batch = (2, 2) if check.smoke else (512, 128)
    images = np.random.default_rng(0).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    image_features(images[: min(batch, n)], extractor, batch, check.device)  # warm-up
    check.need(2.0, "FID features")
    _sync(check.device)
    t0 = time.perf_counter()
    image_features(images, extractor, batch, check.device)
    _sync(check.device)
    result.update(img_per_s=round(n / (time.perf_counter() - t0), 1), images=n, batch=batch, extractor=identity)


def section_dvc_repro(check: Check, result: dict[str, Any]) -> None:
    """``dvc repro`` of the embedded default in a temporary copy of the repository's files (working repo untouched)."""
    params = load_params(check.args.params)
    source = Path(params.prepare.source)
    if not source.is_absolute():
        source = ROOT / source
    if not source.exists():
        raise FileNotFoundError(
            f"the embedded default's dataset {source} (prepare.source) is missing on this machine; "
            "install Debian's dataset-fashion-mnist or copy it there"
        )
    bin_dir = Path(sys.executable).parent
    dvc = shutil.which("dvc", path=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    if dvc is None:
        raise FileNotFoundError("dvc is not installed next to this Python (scripts/install.sh --dev)")
    listed, how = _repo_files()
    with tempfile.TemporaryDirectory(prefix="adcm-device-check-") as tmp:
        copy_root = Path(tmp) / "repo"
        copied = 0
        for rel in listed:
            src = ROOT / rel
            if not src.is_file():
                continue  # deleted in the working tree
            dst = copy_root / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            copied += 1
        result.update(files=copied, file_list=how)
        env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
        try:
            subprocess.run(["git", "init", "-q"], cwd=copy_root, check=True, timeout=60)
        except (OSError, subprocess.SubprocessError):  # no git here: DVC without an SCM
            subprocess.run([dvc, "config", "core.no_scm", "true"], cwd=copy_root, env=env, check=True, timeout=120)
        check.need(30.0, "dvc repro")
        timeout = check.left() - 5
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [dvc, "repro", "--force"],  # every stage, whatever a copied file might say
            cwd=copy_root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            result.update(wall_s=round(time.perf_counter() - t0, 1), log_tail=out[-3000:])
            raise SectionTimeoutError(f"dvc repro did not finish within {timeout:.0f} s") from None
        wall = time.perf_counter() - t0
        result.update(wall_s=round(wall, 1), returncode=proc.returncode, log_tail=out[-3000:])
        for name in ("train", "score", "teacher"):
            path = copy_root / "metrics" / f"{name}.json"
            if path.is_file():
                result[f"metrics_{name}"] = json.loads(path.read_text())
        if proc.returncode != 0:
            raise RuntimeError(f"dvc repro exited with {proc.returncode}: {out.strip().splitlines()[-1:]}")


def _repo_files() -> tuple[list[Path], str]:
    """The repository's files (relative paths) for the pipeline copy, and how they were listed: git's tracked
    and untracked-but-not-ignored files; without git, every file except the environment, git and DVC
    internals and the outputs dvc.yaml declares."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
        return [Path(os.fsdecode(raw)) for raw in out.split(b"\0") if raw], "git ls-files"
    except (OSError, subprocess.SubprocessError):
        pass
    import yaml

    declared: set[Path] = set()
    templated: list[str] = []  # a foreach stage's outputs, e.g. samples/${key}.npz: matched as samples/*.npz
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for stage in (pipeline.get("stages") or {}).values():
        body = stage.get("do", stage)
        for group in ("outs", "metrics", "plots"):
            for item in body.get(group) or []:
                out = str(item if isinstance(item, str) else next(iter(item)))
                if "${" in out:
                    templated.append(re.sub(r"\$\{[^}]*\}", "*", out))
                else:
                    declared.add(Path(out))
    skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
    files = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if any(part in skip for part in rel.parts) or rel.parts[:2] in ((".dvc", "cache"), (".dvc", "tmp")):
            continue
        output = any(rel == d or d in rel.parents for d in declared) or any(
            fnmatch.fnmatchcase(rel.as_posix(), pattern) for pattern in templated
        )
        if path.is_file() and not output:
            files.append(rel)
    return files, "walk (no git)"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


# --------------------------------------------------------------------------------------------------------------
# Summary and table


def _best(rows: list[dict[str, Any]], network: str, method: str, key: str = "img_per_s") -> float | None:
    values = [
        r[key]
        for r in rows
        if r.get("network") == network
        and r.get("method") == method
        and r.get("mode", "").startswith("bf16")
        and "checkpointing" not in r.get("mode", "")
        and r.get(key) is not None
    ]
    return max(values) if values else None


def summarise(check: Check) -> dict[str, Any]:
    """Each target with the measured value (the best bf16 row, with or without compile) and whether it is met
    (None off CUDA or when not measured)."""
    sections = check.report["sections"]
    rows = list(sections.get("steps", {}).get("result", {}).get("rows", []))
    rows += sections.get("compiled", {}).get("result", {}).get("rows", [])
    first = cases(check.smoke)[0].name
    measured = {
        "ddpmpp_ect_img_per_s": _best(rows, first, "ect"),
        "ddpmpp_adcm_img_per_s": _best(rows, first, "adcm"),
        "ddpmpp_sct_img_per_s": _best(rows, first, "sct"),
        "mfu": max((v for m in METHODS if (v := _best(rows, first, m, "mfu")) is not None), default=None),
        "dvc_repro_s": sections.get("dvc_repro", {}).get("result", {}).get("wall_s")
        if sections.get("dvc_repro", {}).get("status") == "ok"
        else None,
    }
    summary = {}
    for key, target in TARGETS.items():
        value = measured[key]
        met = None
        if value is not None and check.device.type == "cuda" and not check.smoke:
            met = value >= target["min"] if "min" in target else value <= target["max"]
        summary[key] = {**target, "measured": value, "met": met}
    return summary


def print_table(check: Check) -> None:
    rep = check.report
    sections = rep["sections"]
    env = sections.get("environment", {}).get("result", {})
    peak = f"{check.peak:g} TFLOP/s dense bf16" if check.peak else "unknown peak (no MFU)"
    print()
    print(f"device check — {env.get('device', check.device_name)}, torch {torch.__version__}, {peak}")
    rows = list(sections.get("steps", {}).get("result", {}).get("rows", []))
    rows += sections.get("compiled", {}).get("result", {}).get("rows", [])
    targets = {("ect", True): 2500, ("adcm", True): 2500, ("sct", True): 1200}
    first = cases(check.smoke)[0].name
    print(
        f"  {'network':<15} {'method':<9} {'mode':<19} {'batch':>5} {'img/s':>9} {'target':>8} {'ms/step':>9} "
        f"{'peak MiB':>9} {'TFLOP/step':>10} {'MFU':>6}"
    )
    for r in rows:
        if "error" in r:
            print(f"  {r['network']:<15} {r['method']:<9} {r['mode']:<19} {r['batch']:>5}  {r['error']}")
            continue
        target = targets.get((r["method"], r["mode"].startswith("bf16") and "checkpointing" not in r["mode"]))
        target_s = f"≥{target}" if target and r["network"] == first else ""
        flops = f"{r['flops_per_step'] / 1e12:.3f}" if r.get("flops_per_step") else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        mem = f"{r['peak_memory_mib']:.0f}" if r.get("peak_memory_mib") is not None else "-"
        print(
            f"  {r['network']:<15} {r['method']:<9} {r['mode']:<19} {r['batch']:>5} {r['img_per_s']:>9.1f} "
            f"{target_s:>8} {r['step_ms']:>9.2f} {mem:>9} {flops:>10} {mfu:>6}"
        )
    agreement = sections.get("agreement", {}).get("result", {})
    for method, a in agreement.items():
        print(
            f"  bf16 vs fp32, {method.upper()} over {a['steps']} steps: max |Δloss|/mean|loss| "
            f"{a['max_abs_loss_diff_over_mean_abs_loss']:.2e}, weight-update difference {a['update_difference']:.2e}"
        )
    rb = sections.get("adcm_rebuild", {}).get("result", {})
    if rb:
        print(
            f"  ADCM partition rebuild, λ = 0.01, {rb['builder']} ({rb['partition_times']} times × "
            f"{rb['partition_batch_size']}): {rb['seconds']:.2f} s, |T| = {rb['points']}"
        )
    sp = sections.get("sampling", {}).get("result", {})
    if sp:
        print("  sampling img/s: " + ", ".join(f"{k} {v['img_per_s']:.1f}" for k, v in sp.items()))
    fid = sections.get("fid_features", {}).get("result", {})
    if fid:
        print(f"  Inception features: {fid['img_per_s']:.1f} img/s (batch {fid['batch']})")
    comp = [r for r in sections.get("compiled", {}).get("result", {}).get("rows", []) if "compiled_vs_eager" in r]
    for r in comp:
        c = r["compiled_vs_eager"]
        print(
            f"  compiled vs eager student ({r['network']}, dropout {c['dropout']}): max rel. diff "
            f"{c['max_rel_diff']:.2e}, dropout masks match: {c['masks_match']}"
        )
    dvc = sections.get("dvc_repro", {})
    if dvc:
        wall = dvc.get("result", {}).get("wall_s")
        print(
            f"  dvc repro (embedded default, temporary copy): {dvc['status']}"
            + (f", {wall:.0f} s (target ≤ 120 s)" if wall is not None else "")
        )
    print("  targets (one H200, bf16):")
    for key, t in rep.get("summary", {}).items():
        value, pct = t["measured"], key == "mfu"
        bound = f"≤ {t['max']:g}" if "max" in t else (f"≥ {100 * t['min']:.0f} %" if pct else f"≥ {t['min']:g}")
        shown = "not measured" if value is None else (f"{100 * value:.1f} %" if pct else f"{value:g}")
        verdict = {True: "met", False: "MISSED", None: ""}[t["met"]]
        if t["met"] is None and value is not None:
            verdict = "(not judged: not a GPU run)"
        print(f"    {t['what']}: {shown} (target {bound}) {verdict}")
    for name, entry in sections.items():
        if entry["status"] != "ok":
            print(f"  section {name}: {entry['status']} — {entry.get('error', '')}")
    print(f"  total {rep.get('total_seconds', 0):.0f} s; JSON: {check.args.out}")


# --------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("reports/bench/device-check.json"))
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    ap.add_argument("--smoke", action="store_true", help="tiny networks and batches, seconds, no dvc repro")
    ap.add_argument(
        "--dvc-repro",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run `dvc repro` of the embedded default in a temporary copy (default: on CUDA, not with --smoke)",
    )
    ap.add_argument(
        "--budget-s", type=float, default=None, help="the whole check's time budget (default 450; smoke 900)"
    )
    ap.add_argument("--min-seconds", type=float, default=1.0, help="timed seconds per step configuration")
    ap.add_argument("--agreement-steps", type=int, default=None, help="steps of the bf16-vs-fp32 runs (20; smoke 4)")
    args = ap.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 900.0 if args.smoke else 450.0  # smoke: generous, a loaded test machine must not skip
    if args.agreement_steps is None:
        args.agreement_steps = 4 if args.smoke else 20
    check = Check(args)
    if args.dvc_repro is None:
        args.dvc_repro = check.device.type == "cuda" and not args.smoke
    torch.manual_seed(0)
    s = args.smoke
    dvc_reserve = 150.0 if args.dvc_repro else 0.0
    later = dvc_reserve + 90.0  # time kept for the compiled steps and the pipeline run
    plan: list[tuple[str, float, float, Callable[[dict[str, Any]], None]]] = [
        ("environment", 30, 0, lambda r: section_environment(check, r)),
        ("steps", 300 if s else 130, later, lambda r: section_steps(check, r, ("fp32", "bf16"))),
        ("checkpointing", 60 if s else 12, later, lambda r: section_checkpointing(check, r)),
        ("agreement", 120 if s else 25, later, lambda r: section_agreement(check, r)),
        ("adcm_rebuild", 60 if s else 12, later, lambda r: section_rebuild(check, r)),
        ("sampling", 60 if s else 12, later, lambda r: section_sampling(check, r)),
        ("fid_features", 60 if s else 15, later, lambda r: section_fid(check, r)),
        # torch.compile: its compile times are the least predictable; it gets what is left before the pipeline run
        (
            "compiled",
            120 if s else 400,
            dvc_reserve,
            (lambda r: _smoke_compile(check, r))
            if s
            else (lambda r: section_steps(check, r, ("bf16+compile",), ("ect", "adcm", "sct", "diffusion"))),
        ),
    ]
    if args.dvc_repro:
        plan.append(("dvc_repro", 200, 0, lambda r: section_dvc_repro(check, r)))
    for name, budget, reserve, run in plan:
        with check.section(name, budget, reserve) as result:
            if result is not None:
                run(result)
    check.report["summary"] = summarise(check)
    check._write()
    print_table(check)
    return 0


def _smoke_compile(check: Check, result: dict[str, Any]) -> None:
    """With ``--smoke``: the compiled ECT row of the tiny DDPM++ with Dynamo's ``eager`` backend (the graph capture
    of the real compile, without inductor's C++ build, which takes minutes on a cold cache on the CPU; the
    tests compile the training step through AOTAutograd and inductor, tests/train/test_fastpath.py)."""
    real = torch.compile
    torch.compile = lambda module, **kw: real(module, backend="eager", **kw)  # type: ignore[assignment]
    try:
        case = cases(True)[0]
        rows = result.setdefault("rows", [])
        rows.append(_step_row(check, case, "ect", "bf16+compile"))
        result["backend"] = "eager"
    finally:
        torch.compile = real  # type: ignore[assignment]


if __name__ == "__main__":
    sys.exit(main())

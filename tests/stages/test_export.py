"""A teacher trained here, exported as an EDM snapshot, comes back through `teacher.source: file` unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_params, write_params
from typer.testing import CliRunner

from adcm.config import parse_params
from adcm.errors import CheckpointError
from adcm.io.datasets import write_prepared
from adcm.io.files import sha256_file
from adcm.io.model_files import TeacherFile, load_teacher, save_teacher
from adcm.nets.precond import denoiser
from adcm.stages.cli import app
from adcm.train.runs import network_kwargs_for

runner = CliRunner()


def _tiny_teacher(seed: int) -> TeacherFile:
    kwargs = network_kwargs_for(parse_params(tiny_params()).teacher.network, 8, 1, 0)
    torch.manual_seed(seed)
    return TeacherFile(kwargs, 0.5, denoiser(kwargs, 0.5).state_dict(), {"source": "train"})


def test_export_then_import_round_trips_and_checks_the_hash(tmp_path: Path) -> None:
    from conftest import synthetic_dataset

    original = _tiny_teacher(0)
    save_teacher(tmp_path / "teacher.pt", original)
    pkl = tmp_path / "teacher.pkl"
    result = runner.invoke(app, ["export", "--teacher", str(tmp_path / "teacher.pt"), "--out", str(pkl)])
    assert result.exit_code == 0, result.output
    digest = sha256_file(pkl)
    assert digest in result.output
    data = tmp_path / "dataset.npz"
    write_prepared(synthetic_dataset(), data, tmp_path / "dataset.json")

    def teacher_stage(sha: str) -> object:
        params = write_params(
            tmp_path / "params.yaml",
            tiny_params({"teacher.source": "file", "teacher.file": str(pkl), "teacher.sha256": sha}),
        )
        return runner.invoke(
            app,
            [
                "teacher",
                "--params",
                str(params),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "imported.pt"),
                "--grid",
                str(tmp_path / "grid.png"),
                "--metrics",
                str(tmp_path / "teacher.json"),
                "--checkpoint-dir",
                str(tmp_path / "ckpt"),
                "--log-dir",
                str(tmp_path / "live"),
                "--no-progress",
            ],
        )

    wrong = teacher_stage("0" * 64)
    assert wrong.exit_code == 2 and "SHA-256" in wrong.output and not (tmp_path / "imported.pt").exists()
    result = teacher_stage(digest)
    assert result.exit_code == 0, result.output
    imported = load_teacher(tmp_path / "imported.pt")
    assert imported.process == "ve" and imported.meta["pickle_sha256"] == digest
    for name, value in original.state_dict.items():
        assert torch.equal(imported.state_dict[name], value), name


def test_the_same_weights_give_the_same_file_and_pytorch_reads_it(tmp_path: Path) -> None:
    """Storage payloads are keyed by index, not by memory address: a re-trained teacher is recognised by its SHA-256."""
    import io
    import pickle

    from adcm.io.edm_export import save_edm_snapshot

    teacher = _tiny_teacher(0)
    save_edm_snapshot(teacher, tmp_path / "a.pkl")
    clone = TeacherFile(
        teacher.network_kwargs, 0.5, {k: v.clone() for k, v in teacher.state_dict.items()}, dict(teacher.meta)
    )
    save_edm_snapshot(clone, tmp_path / "b.pkl")  # other tensors (other addresses), same values
    save_edm_snapshot(_tiny_teacher(1), tmp_path / "c.pkl")
    save_teacher(tmp_path / "teacher.pt", teacher)  # through a file: equal strings, other objects than the literals
    save_edm_snapshot(load_teacher(tmp_path / "teacher.pt"), tmp_path / "d.pkl")
    assert (tmp_path / "a.pkl").read_bytes() == (tmp_path / "b.pkl").read_bytes()
    assert (tmp_path / "a.pkl").read_bytes() == (tmp_path / "d.pkl").read_bytes()
    assert sha256_file(tmp_path / "a.pkl") != sha256_file(tmp_path / "c.pkl")

    class Unpickler(pickle.Unpickler):  # EDM's loader, its class reconstruction replaced by the recorded state
        def find_class(self, module: str, name: str) -> object:
            if (module, name) == ("torch_utils.persistence", "_reconstruct_persistent_obj"):
                return lambda meta: meta["state"]
            return super().find_class(module, name)

    ema = Unpickler(io.BytesIO((tmp_path / "a.pkl").read_bytes())).load()["ema"]
    tensors = {}

    def walk(state: dict, prefix: str) -> None:
        for name, value in {**state["_parameters"], **state["_buffers"]}.items():
            if value is not None:
                tensors[prefix + name] = value
        for name, child in state["_modules"].items():
            walk(child if isinstance(child, dict) else child.__dict__, f"{prefix}{name}.")

    walk(ema, "")
    assert tensors.keys() == teacher.state_dict.keys()
    for name, value in teacher.state_dict.items():
        assert torch.equal(tensors[name], value), name


def test_a_storage_payload_of_another_layout_is_refused() -> None:
    import io

    from adcm.io.edm_export import _rekeyed_payload

    storage = torch.arange(4, dtype=torch.float32)._typed_storage()
    buffer = io.BytesIO()
    torch.save(storage, buffer, _use_new_zipfile_serialization=False)
    payload = buffer.getvalue()
    key = str(storage._untyped_storage._cdata).encode()
    renamed = _rekeyed_payload(payload, storage.nbytes(), key, b"0")
    assert key not in renamed and len(renamed) == len(payload) - 2 * (len(key) - 1)
    assert torch.load(io.BytesIO(renamed), weights_only=False).tolist() == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(CheckpointError, match="layout this writer does not know"):
        _rekeyed_payload(payload, storage.nbytes(), b"123", b"0")

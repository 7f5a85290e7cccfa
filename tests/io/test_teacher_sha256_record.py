"""`teacher.sha256_record`: a downloaded teacher's SHA-256 recorded on first use and enforced afterwards.

The "server" is a local ``file://`` URL serving a tiny EDM snapshot written by :func:`save_edm_snapshot`;
replacing the served file plays a changed or tampered download.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_params, write_params
from typer.testing import CliRunner

from adcm.config import NetworkConfig, TeacherConfig, load_params
from adcm.errors import CheckpointError, DownloadError, ParamsError
from adcm.io.edm_export import save_edm_snapshot
from adcm.io.model_files import TeacherFile, load_teacher, save_teacher
from adcm.io.teacher_import import import_teacher, read_sha256_record
from adcm.nets.precond import denoiser
from adcm.stages.cli import app
from adcm.train.runs import network_kwargs_for

KWARGS = network_kwargs_for(
    NetworkConfig(
        model_channels=8,
        channel_mult=(1, 2),
        channel_mult_emb=2,
        num_blocks=1,
        attn_resolutions=(4,),
        dropout=0.0,
        class_conditional=False,
        adaptive_double_norm=False,
    ),
    8,
    1,
    0,
)


def snapshot(path: Path, seed: int) -> Path:
    """A tiny DDPM++ teacher with weights from ``seed``, written as an EDM snapshot at ``path``."""
    torch.manual_seed(seed)
    net = denoiser(KWARGS, 0.5, "ve")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_edm_snapshot(TeacherFile(dict(KWARGS), 0.5, net.state_dict(), {"source": "test"}), path)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def url_config(tmp_path: Path, served: Path, **changes: object) -> TeacherConfig:
    base = load_params(ROOT / "params.yaml").teacher
    fields = {
        "source": "url",
        "url": served.as_uri(),
        "sha256": None,
        "sha256_record": str(tmp_path / "teachers" / "tiny.sha256"),
        "download_path": str(tmp_path / "downloads" / "tiny.pkl"),
        **changes,
    }
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


def test_first_download_records_and_later_ones_are_checked(tmp_path: Path) -> None:
    served = snapshot(tmp_path / "server" / "tiny.pkl", seed=0)
    cfg = url_config(tmp_path, served)
    record = Path(str(cfg.sha256_record))
    assert not record.exists()
    teacher = import_teacher(cfg, show_progress=False)
    assert record.read_text() == f"{sha256(served)}  tiny.pkl\n"  # sha256sum's format, written atomically
    assert read_sha256_record(record) == sha256(served)
    assert teacher.meta["pickle_sha256"] == sha256(served)
    assert sorted(p.name for p in record.parent.iterdir()) == ["tiny.sha256"]  # no temporary file left
    # Later runs: the kept download matches the record, nothing is fetched (the server may be gone).
    served.unlink()
    again = import_teacher(cfg, show_progress=False)
    assert again.meta["pickle_sha256"] == sha256(Path(cfg.download_path))


def test_a_changed_download_is_refused_and_nothing_is_kept(tmp_path: Path) -> None:
    served = snapshot(tmp_path / "server" / "tiny.pkl", seed=0)
    cfg = url_config(tmp_path, served)
    import_teacher(cfg, show_progress=False)
    record = Path(str(cfg.sha256_record))
    recorded = record.read_text()
    download = Path(cfg.download_path)
    download.unlink()  # a fresh machine: the record is committed, the download is not
    snapshot(served, seed=1)  # the URL now serves other bytes
    with pytest.raises(DownloadError) as info:
        import_teacher(cfg, show_progress=False)
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == 2
    assert sha256(served) in message and recorded.split()[0] in message and str(record) in message
    assert not download.exists() and record.read_text() == recorded  # the record is never rewritten
    # A tampered kept download is fetched again, the new bytes refused the same way; no temporary file stays.
    download.write_bytes(b"tampered")
    with pytest.raises(DownloadError, match="recorded in"):
        import_teacher(cfg, show_progress=False)
    assert [p.name for p in download.parent.iterdir()] == ["tiny.pkl"] and download.read_bytes() == b"tampered"


def test_the_first_use_fetches_even_over_an_existing_download(tmp_path: Path) -> None:
    """Without a record the SHA-256 recorded is the one of what the URL served, not of a file lying there."""
    served = snapshot(tmp_path / "server" / "tiny.pkl", seed=0)
    cfg = url_config(tmp_path, served)
    Path(cfg.download_path).parent.mkdir(parents=True)
    Path(cfg.download_path).write_bytes(b"placed by hand")
    import_teacher(cfg, show_progress=False)
    assert read_sha256_record(Path(str(cfg.sha256_record))) == sha256(served) == sha256(Path(cfg.download_path))


def test_a_pinned_sha256_takes_precedence_and_writes_no_record(tmp_path: Path) -> None:
    served = snapshot(tmp_path / "server" / "tiny.pkl", seed=0)
    cfg = url_config(tmp_path, served, sha256=sha256(served))
    import_teacher(cfg, show_progress=False)
    assert not Path(str(cfg.sha256_record)).exists()
    with pytest.raises(DownloadError, match="does not match"):
        import_teacher(url_config(tmp_path / "other", served, sha256="0" * 64), show_progress=False)


def test_an_imported_teacher_file_is_the_same_bytes_every_time(tmp_path: Path) -> None:
    """The study identifies its teacher by the file's SHA-256: two imports of the same snapshot, written under two
    names, must be the same bytes (no temporary name, time or path inside)."""
    served = snapshot(tmp_path / "server" / "tiny.pkl", seed=0)
    cfg = url_config(tmp_path, served, sha256=sha256(served))
    save_teacher(tmp_path / "a" / "teacher.pt", import_teacher(cfg, show_progress=False))
    save_teacher(tmp_path / "b" / "other.pt", import_teacher(cfg, show_progress=False))
    assert sha256(tmp_path / "a" / "teacher.pt") == sha256(tmp_path / "b" / "other.pt")


@pytest.mark.parametrize(
    ("content", "needle"),
    [(b"", "an empty file"), (b"not-a-hash  tiny.pkl\n", "'not-a-hash'"), (b"0" * 5000, "over 4 KiB")],
)
def test_a_malformed_record_is_a_one_line_error(tmp_path: Path, content: bytes, needle: str) -> None:
    served = snapshot(tmp_path / "server" / "tiny.pkl", seed=0)
    cfg = url_config(tmp_path, served)
    record = Path(str(cfg.sha256_record))
    record.parent.mkdir(parents=True)
    record.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"teacher\.sha256_record") as info:
        import_teacher(cfg, show_progress=False)
    assert needle in str(info.value) and str(record) in str(info.value) and info.value.exit_code == 2
    assert not Path(cfg.download_path).exists()  # refused before anything is fetched


def test_params_need_a_sha256_or_a_record_for_url(tmp_path: Path) -> None:
    data = tiny_params({"teacher.source": "url", "teacher.sha256": None, "teacher.sha256_record": None})
    with pytest.raises(ParamsError, match=r"teacher\.sha256: .*or null together with teacher\.sha256_record"):
        load_params(write_params(tmp_path / "a.yaml", data))
    data = tiny_params(
        {"teacher.source": "url", "teacher.sha256": None, "teacher.sha256_record": "data/downloads/edm-teacher.pkl"}
    )
    with pytest.raises(ParamsError, match=r"teacher\.sha256_record: expected a file other than"):
        load_params(write_params(tmp_path / "b.yaml", data))
    data["teacher"]["sha256_record"] = "data/teachers/edm.sha256"
    assert load_params(write_params(tmp_path / "c.yaml", data)).teacher.sha256_record == "data/teachers/edm.sha256"


def test_teacher_stage_records_then_refuses_a_changed_download(tmp_path: Path) -> None:
    served = snapshot(tmp_path / "server" / "tiny.pkl", seed=0)
    record = tmp_path / "teachers" / "tiny.sha256"
    data = tiny_params(
        {
            "teacher.source": "url",
            "teacher.url": served.as_uri(),
            "teacher.sha256": None,
            "teacher.sha256_record": str(record),
            "teacher.download_path": str(tmp_path / "downloads" / "tiny.pkl"),
        }
    )
    params = write_params(tmp_path / "params.yaml", data)
    out = tmp_path / "teacher.pt"
    args = ["teacher", "--params", str(params), "--out", str(out), "--grid", str(tmp_path / "grid.png")]
    args += ["--metrics", str(tmp_path / "t.json"), "--checkpoint-dir", str(tmp_path / "c")]
    args += ["--log-dir", str(tmp_path / "l"), "--no-progress"]
    runner = CliRunner()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert read_sha256_record(record) == sha256(served) == load_teacher(out).meta["pickle_sha256"]
    (tmp_path / "downloads" / "tiny.pkl").unlink()
    snapshot(served, seed=1)
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(record) in lines[0], result.output

"""The uploader writes only where it was told at start (--allow-dst), never where a peer asks:
refused jobs create, delete and journal nothing; planted journal records are not replayed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ckpt_uploader.allowed import AllowedDestinations, DestinationRefused
from ckpt_uploader.client import UploaderError
from ckpt_uploader.stores import open_store
from tests.ckpt_uploader.conftest import write_checkpoint
from tests.conftest import run_cli


@pytest.mark.parametrize(
    "dst, allowed",
    [
        ("local:/data/ckpt/run1/100", True),
        ("/data/ckpt/run1", True),
        ("local:/data/ckpt/run10/100", False),  # a sibling sharing the text prefix
        ("local:/data/ckpt/run1/../run2/100", False),
        ("local:/data/elsewhere", False),
        ("boto3:s3://bucket/runs/a/7", True),
        ("s3://bucket/runs/a", True),
        ("boto3:s3://bucket/runs/ab/7", False),
        ("boto3:s3://bucket/other", False),
        ("boto3:s3://bucket2/runs/a/7", False),
        ("boto3:s3://bucket.127.0.0.1:9000/runs/a/7", False),  # another endpoint, same bucket name
        ("boto3:s3://minio.10.0.0.1:9000/x/1", True),
        ("boto3:s3://minio.10.0.0.2:9000/x/1", False),
    ],
)
def test_destination_matching_is_by_meaning_not_text(dst, allowed):
    policy = AllowedDestinations(
        ["local:/data/ckpt/run1", "boto3:s3://bucket/runs/a", "boto3:s3://minio.10.0.0.1:9000"]
    )
    if allowed:
        policy.check(dst)
    else:
        with pytest.raises(DestinationRefused, match="outside the destinations"):
            policy.check(dst)


def test_a_symlink_out_of_the_allowed_folder_is_outside(tmp_path):
    (tmp_path / "allowed").mkdir()
    (tmp_path / "secret").mkdir()
    (tmp_path / "allowed" / "link").symlink_to(tmp_path / "secret")
    policy = AllowedDestinations([str(tmp_path / "allowed")])
    policy.check(f"local:{tmp_path / 'allowed' / 'real' / '1'}")
    with pytest.raises(DestinationRefused):
        policy.check(f"local:{tmp_path / 'allowed' / 'link' / '1'}")


@pytest.mark.server
def test_a_standalone_uploader_without_allowed_destinations_refuses_to_start(tmp_path):
    result = run_cli("ckpt_uploader", "serve", "--spool", str(tmp_path / "spool"), check=False, timeout=60)
    assert result.returncode == 2 and "--allow-dst" in result.stderr, result.stderr
    assert "does not let its clients choose" in result.stderr
    bad = run_cli(
        "ckpt_uploader",
        "serve",
        "--spool",
        str(tmp_path / "spool"),
        "--allow-dst",
        "petrel://x/y",
        check=False,
        timeout=60,
    )
    assert bad.returncode == 2 and "--allow-dst" in bad.stderr and "unknown scheme" in bad.stderr


@pytest.mark.server
def test_a_job_outside_is_refused_and_nothing_is_created_or_deleted(
    s3_server, s3_store_env, start_uploader, tmp_path
):
    spool, journal = tmp_path / "spool", tmp_path / "journal.jsonl"
    allowed_folder = tmp_path / "ckpts"
    other_run = tmp_path / "other-run" / "snapshot" / "0"
    other_run.mkdir(parents=True)
    (other_run / "7.step").write_text("{}")  # another run's marker: once deleted by such a job
    bucket = s3_server.make_bucket("allow-dst")
    foreign = open_store(f"boto3:s3://{bucket}/someone-else/3")
    foreign.put_bytes("3.step", b"{}")
    files = write_checkpoint(spool, "job", {"model.pt": 1000})
    uploader = start_uploader(
        spool, journal, allow_dst=[f"local:{allowed_folder}", f"boto3:s3://{bucket}/mine"]
    )
    refused = [
        f"local:{other_run}",
        f"local:{tmp_path / 'new-folder' / '1'}",
        f"local:{allowed_folder}/../other-run/snapshot/0",
        f"boto3:s3://{bucket}/someone-else/3",
        f"boto3:s3://{bucket}/mine-too/3",
        "boto3:s3://another-bucket/mine/3",
    ]
    with uploader.client() as client:
        for dst in refused:
            with pytest.raises(UploaderError) as error:
                client.submit("job", "job", dst, files, "9.step")
            assert "outside the destinations" in str(error.value) and str(allowed_folder) in str(error.value)
        assert client.status()["jobs"] == []
        client.submit("job", "job", f"local:{allowed_folder}/9", files, "9.step")
        assert client.wait("job", timeout_s=30)["state"] == "done"
    assert (other_run / "7.step").exists()
    assert not (tmp_path / "new-folder").exists()
    assert foreign.list_keys() == ["3.step"]
    assert (allowed_folder / "9" / "9.step").exists()
    submits = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [r["job"]["dst"] for r in submits if r["event"] == "submit"] == [f"local:{allowed_folder}/9"]


@pytest.mark.server
def test_a_planted_journal_record_outside_is_not_replayed(s3_server, start_uploader, tmp_path):
    spool, journal = tmp_path / "spool", tmp_path / "journal.jsonl"
    spool.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.mkdir()
    planted = write_checkpoint(spool, "planted", {"evil": 10})
    mine = write_checkpoint(spool, "mine", {"model.pt": 10})
    records = [
        {"event": "submit", "job": _job("planted", f"local:{victim}", planted)},
        {"event": "submit", "job": _job("mine", f"local:{tmp_path / 'ckpts' / '1'}", mine)},
    ]
    journal.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.chmod(journal, 0o600)
    uploader = start_uploader(spool, journal, allow_dst=[f"local:{tmp_path / 'ckpts'}"])
    with uploader.client() as client:
        assert client.wait("mine", timeout_s=30)["state"] == "done"
        assert [job["job_id"] for job in client.status()["jobs"]] == ["mine"]
    assert list(victim.iterdir()) == []
    assert (spool / "planted" / "evil").exists()  # left for an uploader allowed there
    assert (tmp_path / "ckpts" / "1" / "1.step").exists()


def _job(job_id: str, dst: str, files: list[dict]) -> dict:
    return {"job_id": job_id, "src": job_id, "dst": dst, "files": files, "marker": "1.step"}


def test_a_private_uploader_is_allowed_its_runs_folders_only():
    from train_kernel.checkpoint.manager import upload_destinations
    from train_kernel.config.loader import config_from_text

    config = config_from_text(
        "JOB_NAME = 't'\n"
        "model = dict(num_layers=1, hidden_size=8, num_attention_heads=2, vocab_size=16)\n"
        "data = dict(seq_len=8, micro_bsz=1, micro_num=1, total_steps=2)\n"
        "ckpt = dict(enable_save_ckpt=True, save_ckpt_folder='local:/data/run1', async_upload=True)\n"
    )
    assert upload_destinations(config.ckpt) == ["local:/data/run1", "local:/data/run1/snapshot"]


def test_internlms_shared_staging_folder_becomes_the_users_own():
    from train_kernel.checkpoint.manager import spool_folder

    assert spool_folder("/dev/shm/internlm_tmp_ckpt/") == Path(f"/dev/shm/internlm_tmp_ckpt-{os.getuid()}")
    assert spool_folder("/dev/shm/mine") == Path("/dev/shm/mine")

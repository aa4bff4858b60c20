"""`ckpt-uploader`: the checkpoint upload service (serve), its job list (status), CURVE keys (keygen)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import click

from ckpt_uploader.allowed import AllowedDestinations
from ckpt_uploader.client import UploaderClient, UploaderError
from ckpt_uploader.curve import CurveError, create_keys
from ckpt_uploader.jobs import TransferOptions
from ckpt_uploader.journal import JournalError
from ckpt_uploader.server import ServeOptions
from ckpt_uploader.server import serve as run_server
from ckpt_uploader.stores import DEFAULT_PART_SIZE_BYTES, RetryPolicy
from ckpt_uploader.uri import StorageURIError


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Upload checkpoint folders from a spool to S3 or a folder, fed over ZeroMQ."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@main.command()
@click.option(
    "--bind",
    default="tcp://127.0.0.1:5557",
    show_default=True,
    help=(
        "ZeroMQ endpoint; 'tcp://127.0.0.1:*' picks a free port (printed on stdout). "
        "Bind beyond loopback only with --curve-keys."
    ),
)
@click.option(
    "--spool",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help=(
        "Folder the trainer writes checkpoints into (<spool>/<job-id>/); "
        "nothing outside it is ever read or deleted."
    ),
)
@click.option(
    "--allow-dst",
    "allow_dst",
    multiple=True,
    metavar="URI_PREFIX",
    help=(
        "Required, repeatable: a folder (local:/path or a plain path) or S3 prefix "
        "(boto3:s3://bucket[.endpoint]/prefix) that jobs may write under. A job for any other "
        "destination is refused before anything is created or deleted."
    ),
)
@click.option(
    "--journal",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help=(
        "Job journal (JSONL, fsynced); default <spool>/.ckpt-uploader-journal.jsonl. "
        "Restart on the same journal to finish acknowledged jobs."
    ),
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="Files in flight per job; S3 parts in flight (all files together): twice as many.",
)
@click.option(
    "--curve-keys",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    default=None,
    help="Folder from `ckpt-uploader keygen`: require CURVE (authenticated, encrypted) clients.",
)
@click.option(
    "--part-mb",
    type=click.IntRange(5, 5120),
    default=DEFAULT_PART_SIZE_BYTES >> 20,
    show_default=True,
    help="Multipart part size in MiB.",
)
@click.option(
    "--checksum",
    type=click.Choice(["sha256", "crc32"]),
    default="crc32",
    show_default=True,
    help="S3 checksum sent with every part and read back (crc32: boto3's default, cheaper for the "
    "endpoint). Every file's sha256 is checked against the manifest either way.",
)
@click.option(
    "--retry-mode",
    type=click.Choice(["standard", "adaptive"]),
    default=lambda: RetryPolicy.from_env().mode,
    show_default="standard, or AWS_RETRY_MODE",
    help="botocore's retry mode for every S3 call (adaptive also slows down when S3 throttles).",
)
@click.option(
    "--retry-attempts",
    type=click.IntRange(1, 100),
    default=lambda: RetryPolicy.from_env().attempts,
    show_default="10, or AWS_MAX_ATTEMPTS",
    help="Attempts per S3 call, the first included (botocore backs off up to 20 s between them).",
)
@click.option(
    "--outage-deadline",
    default="24h",
    show_default=True,
    metavar="DURATION",
    help="How long a job keeps being retried while S3 stays unreachable or failing (e.g. 90s, 30m, "
    "24h); the checkpoint stays in the spool meanwhile, and `status` shows the job as retrying.",
)
@click.option(
    "--stop-wait",
    default="30s",
    show_default=True,
    metavar="DURATION",
    help="On SIGTERM / SIGINT: how long unfinished jobs may still run (new ones are refused); what "
    "is left then is listed in the log and resumes on the next start on the same journal.",
)
@click.option(
    "--outage-pause",
    default="2,60",
    hidden=True,
    help="Tests: first and longest pause (seconds) between attempts of a job during an outage.",
)
@click.option(
    "--allow-remote",
    is_flag=True,
    help="Allow binding beyond loopback without CURVE (trusted networks only).",
)
@click.option(
    "--part-delay", type=float, default=0.0, hidden=True, help="Tests: sleep this long before each part."
)
@click.option(
    "--parent-pid", type=int, default=None, hidden=True, help="Embedded mode: exit when this parent is gone."
)
def serve(
    bind: str,
    spool: Path,
    allow_dst: tuple[str, ...],
    journal: Path | None,
    workers: int,
    curve_keys: Path | None,
    part_mb: int,
    checksum: str,
    retry_mode: str,
    retry_attempts: int,
    outage_deadline: str,
    stop_wait: str,
    outage_pause: str,
    allow_remote: bool,
    part_delay: float,
    parent_pid: int | None,
) -> None:
    """Run the uploader until SIGTERM / Ctrl-C (then --stop-wait for the jobs in flight); unfinished
    jobs resume on the next start on the same journal."""
    if not allow_dst:
        # A peer must never choose where we write: without a list, any sender could make us
        # create folders, delete markers and write files anywhere this user may.
        raise click.UsageError(
            "give --allow-dst URI_PREFIX (repeatable): the folders or S3 prefixes jobs may write to; "
            "the uploader does not let its clients choose where it writes"
        )
    try:
        AllowedDestinations(allow_dst)
    except StorageURIError as error:
        raise click.BadParameter(str(error), param_hint="--allow-dst") from None
    host = bind.split("://", 1)[-1].rsplit(":", 1)[0]
    if (
        bind.startswith("tcp://")
        and host not in ("127.0.0.1", "localhost", "[::1]")
        and not (curve_keys or allow_remote)
    ):
        raise click.BadParameter(
            f"{bind} is reachable from other machines; add --curve-keys (or --allow-remote)",
            param_hint="--bind",
        )
    transfer = TransferOptions(
        workers=workers,
        part_size_bytes=part_mb << 20,
        checksum_algorithm=checksum.upper(),
        part_delay_s=part_delay,
        retry=RetryPolicy(retry_mode, retry_attempts),
        outage_deadline_s=parse_duration(outage_deadline, "--outage-deadline"),
        outage_pause_s=tuple(float(x) for x in outage_pause.split(",", 1)),
    )
    try:
        run_server(
            ServeOptions(
                bind=bind,
                spool=spool,
                allowed_destinations=allow_dst,
                journal=journal,
                curve_keys=curve_keys,
                transfer=transfer,
                parent_pid=parent_pid,
                stop_wait_s=parse_duration(stop_wait, "--stop-wait"),
            )
        )
    except (CurveError, JournalError, OSError) as error:
        raise click.ClickException(str(error)) from None
    except Exception as error:
        if type(error).__module__.startswith("zmq"):
            raise click.ClickException(f"cannot serve on {bind}: {error}") from None
        raise


def parse_duration(text: str, option: str) -> float:
    """Seconds in '90', '90s', '30m', '24h' or '2d'."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: expected a duration such as 90s, 30m or 24h", param_hint=option
        ) from None
    if seconds < 0:
        raise click.BadParameter(f"{text!r}: expected a duration >= 0", param_hint=option)
    return seconds


@main.command()
@click.option("--address", default="tcp://127.0.0.1:5557", show_default=True, help="The uploader's endpoint.")
@click.option("--job-id", default=None, help="One job (default: all).")
@click.option(
    "--curve-server-key",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="The uploader's server.key.",
)
@click.option(
    "--curve-client-key",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="This client's client.key_secret.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the raw status as JSON.")
def status(
    address: str,
    job_id: str | None,
    curve_server_key: str | None,
    curve_client_key: str | None,
    as_json: bool,
) -> None:
    """List the uploader's jobs and their progress."""
    try:
        with UploaderClient(
            address, timeout_s=5, curve_server_key=curve_server_key, curve_client_key=curve_client_key
        ) as client:
            result = client.status(job_id)
    except (UploaderError, CurveError) as error:
        raise click.ClickException(str(error)) from None
    jobs = [result] if job_id else result["jobs"]
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    if not jobs:
        click.echo("no jobs")
    for job in jobs:
        done_mib, total_mib = job["bytes_done"] / 2**20, job["bytes_total"] / 2**20
        line = f"{job['job_id']}\t{job['state']}\t{done_mib:,.1f}/{total_mib:,.1f} MiB\t{job['dst']}"
        if job["state"] == "retrying":
            line += (
                f"\tattempt {job['attempts']} failed; retried until "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(job['retry_until']))}"
            )
        click.echo(line + (f"\terror: {job['error']}" if job["error"] else ""))


@main.command()
@click.argument("folder", type=click.Path(path_type=Path, file_okay=False))
def keygen(folder: Path) -> None:
    """Create CURVE keys in FOLDER: server.key(_secret), client.key(_secret), authorized/client.key."""
    try:
        create_keys(folder)
    except CurveError as error:
        raise click.ClickException(str(error)) from None
    click.echo(
        f"serve with --curve-keys {folder}; give clients {folder / 'server.key'} and "
        f"{folder / 'client.key_secret'}"
    )


if __name__ == "__main__":
    main()

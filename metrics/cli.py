"""`metrics-sidecar`: forwards a run folder's metrics.jsonl to MLflow."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from metrics.mlflow_run import Aborted
from metrics.redact import TrackingUri, scrub_output
from metrics.sidecar import RunDirMissing, Sidecar
from metrics.supervisor import STOP_SIGNALS


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Forward the trainer's metric records to an MLflow tracking server (or a sqlite:/// store)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@main.command()
@click.option(
    "--run-dir",
    required=True,
    type=click.Path(path_type=Path),
    help="The trainer's run folder (holds metrics.jsonl).",
)
@click.option(
    "--tracking-uri",
    required=True,
    envvar="MLFLOW_TRACKING_URI",
    help=(
        "MLflow tracking URI: http://host:port, or sqlite:///path/mlflow.db (no server). Default: "
        "$MLFLOW_TRACKING_URI. A URI with credentials belongs in that variable, not on the "
        "command line (which every user of the host can read); so do MLFLOW_TRACKING_USERNAME, "
        "MLFLOW_TRACKING_PASSWORD and MLFLOW_TRACKING_TOKEN, which MLflow reads itself."
    ),
)
@click.option(
    "--experiment",
    default=None,
    help="MLflow experiment for a new run (default: llm-pretrain); a resumed run stays where it is.",
)
@click.option(
    "--follow/--once",
    default=True,
    show_default=True,
    help="Keep tailing the file until stopped (SIGTERM), or drain it once and exit.",
)
@click.option(
    "--poll-s",
    type=float,
    default=0.2,
    show_default=True,
    help="Seconds between looks at the file when it has nothing new.",
)
@click.option(
    "--parent-pid", type=int, default=None, help="Drain and exit when this process (the trainer) is gone."
)
@click.option(
    "--drain-timeout-s",
    type=float,
    default=120.0,
    show_default=True,
    help=(
        "After a stop request, give up (exit 1) if MLflow stays unreachable this long; "
        "the next start continues."
    ),
)
def run(
    run_dir: Path,
    tracking_uri: str,
    experiment: str | None,
    follow: bool,
    poll_s: float,
    parent_pid: int | None,
    drain_timeout_s: float,
) -> None:
    """Forward RUN_DIR/metrics.jsonl to MLflow, each step exactly once, across restarts of this
    process, of MLflow and of the training run. SIGTERM: forward what the file holds, exit 0."""
    uri = TrackingUri.parse(tracking_uri)
    scrub_output(uri.scrub)  # before anything could print the URI
    source = click.get_current_context().get_parameter_source("tracking_uri")
    if uri.secrets and source is ParameterSource.COMMANDLINE:
        logging.getLogger(__name__).warning(
            "the tracking URI on the command line carries credentials, which any user of this host "
            "can read (ps): pass it in MLFLOW_TRACKING_URI instead"
        )
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    sidecar = Sidecar(
        run_dir,
        tracking_uri,
        experiment,
        poll_s=poll_s,
        parent_pid=parent_pid,
        drain_timeout_s=drain_timeout_s,
    )
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda *_: sidecar.request_stop())
    if hasattr(signal, "pthread_sigmask"):
        # Started by the trainer's supervisor with these blocked: a stop sent meanwhile arrives now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        sidecar.run(follow=follow)
    except RunDirMissing as exc:
        raise click.ClickException(str(exc)) from None
    except Aborted as exc:
        click.echo(
            f"metrics-sidecar: {exc}; forwarding resumes where MLflow's data ends on the next start", err=True
        )
        sys.exit(1)


def _die_with_parent(parent_pid: int) -> None:
    """Linux: the kernel sends SIGTERM (drain, then exit) when the parent dies; elsewhere the
    sidecar's loop notices that its parent pid changed."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:
            pass


if __name__ == "__main__":
    main()

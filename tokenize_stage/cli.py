"""`tokenize-stage`: raw text folders -> token shards."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

from tokenize_stage.demo_corpus import build_demo_corpus
from tokenize_stage.merge import MergeError, merge_shard_manifests
from tokenize_stage.readers import DEFAULT_MAX_LINE_BYTES
from tokenize_stage.runner import StageError, StageOptions, StageReport, run_stage
from tokenize_stage.sources import DEFAULT_CHUNK_BYTES, InputError
from tokenize_stage.text_tokenizers import TokenizerError


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Tokenize raw text (jsonl / txt / parquet, one folder per data type) into Arrow token shards."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )


@main.command()
@click.option(
    "--input",
    "input_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder of type folders (en/, cn/, code/, ...).",
)
@click.option(
    "--output",
    "output_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder for the token shards and manifest.json.",
)
@click.option(
    "--tokenizer",
    "tokenizer_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="SentencePiece .model or Hugging Face tokenizer.json; default: byte-level.",
)
@click.option("--workers", type=int, default=None, help="Worker processes (default: all cores).")
@click.option(
    "--text-key", default="content", show_default=True, help="jsonl field / parquet column holding the text."
)
@click.option(
    "--whole-file", is_flag=True, help="A .txt file is one document (default: one line per document)."
)
@click.option(
    "--strict", is_flag=True, help="Stop at the first bad line instead of counting and reporting it."
)
@click.option(
    "--bos-token", default=None, help="Name of the BOS token when the tokenizer file does not make it clear."
)
@click.option(
    "--eos-token", default=None, help="Name of the EOS token when the tokenizer file does not make it clear."
)
@click.option("--no-bos", is_flag=True, help="Do not add BOS to each document.")
@click.option("--no-eos", is_flag=True, help="Do not add EOS to each document.")
@click.option(
    "--num-shards",
    type=int,
    default=1,
    show_default=True,
    help="Machines the inputs are split over (e.g. a Slurm array's size).",
)
@click.option(
    "--shard-index",
    type=int,
    default=None,
    help="This machine's shard, 0-based (default: $SLURM_ARRAY_TASK_ID or 0).",
)
@click.option(
    "--chunk-mb",
    type=int,
    default=DEFAULT_CHUNK_BYTES >> 20,
    show_default=True,
    help="Work unit size within large files; change it only for a new output folder.",
)
@click.option(
    "--max-line-mb",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_LINE_BYTES >> 20,
    show_default=True,
    help="A longer line is rejected (listed with file:line) and never held in memory whole.",
)
@click.option(
    "--sft",
    is_flag=True,
    help="Chat / instruction jsonl (messages, prompt/response or alpaca fields): prompt tokens are "
    "stored negated and never trained on.",
)
@click.option(
    "--chat-template",
    type=click.Choice(["auto", "default", "tokenizer"]),
    default="auto",
    show_default=True,
    help="With --sft: the tokenizer's chat_template (tokenizer_config.json beside it), InternLM's "
    "<|User|>:/<|Bot|>: default, or auto (the tokenizer's when it has one).",
)
@click.option("--no-progress", is_flag=True, help="No progress bar (logs only).")
def run(
    input_dir: Path,
    output_dir: Path,
    tokenizer_path: str | None,
    workers: int | None,
    text_key: str,
    whole_file: bool,
    strict: bool,
    bos_token: str | None,
    eos_token: str | None,
    no_bos: bool,
    no_eos: bool,
    num_shards: int,
    shard_index: int | None,
    chunk_mb: int,
    max_line_mb: int,
    sft: bool,
    chat_template: str,
    no_progress: bool,
) -> None:
    """Tokenize every input under INPUT; re-running resumes, skipping finished inputs."""
    if shard_index is None:
        shard_index = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0")) if num_shards > 1 else 0
    if chunk_mb < 1:
        raise click.BadParameter("must be at least 1", param_hint="--chunk-mb")
    if sft and (whole_file or text_key != "content"):
        # Conversations are read from their own fields, one per jsonl line: these would do nothing.
        raise click.UsageError("--sft reads one conversation per jsonl line: drop --text-key / --whole-file")
    if not sft and chat_template != "auto":
        raise click.UsageError("--chat-template applies to --sft data only")
    options = StageOptions(
        input=input_dir,
        output=output_dir,
        tokenizer_path=tokenizer_path,
        bos_token=bos_token,
        eos_token=eos_token,
        add_bos=not no_bos,
        add_eos=not no_eos,
        text_key=text_key,
        whole_file=whole_file,
        strict=strict,
        max_line_bytes=max_line_mb << 20,
        workers=workers or os.cpu_count() or 1,
        chunk_bytes=chunk_mb << 20,
        num_shards=num_shards,
        shard_index=shard_index,
        show_progress=not no_progress,
        sft=sft,
        chat_template=chat_template,
    )
    try:
        report = run_stage(options)
    except (StageError, InputError, TokenizerError) as error:
        raise click.ClickException(str(error)) from None
    _print_report(report)
    if report.failed_files:
        raise click.ClickException(
            f"{len(report.failed_files)} input(s) failed (listed above); everything else is finished. "
            "Fix or move them away and run the same command again: only they are redone."
        )


@main.command()
@click.argument("output_dir", type=click.Path(path_type=Path, file_okay=False, exists=True))
def merge(output_dir: Path) -> None:
    """Join the shard manifests of a multi-machine run in OUTPUT_DIR into manifest.json."""
    try:
        target = merge_shard_manifests(output_dir)
    except MergeError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"wrote {target}")


@main.command("demo-corpus")
@click.option(
    "--output",
    "output_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Raw-text folder to write (code/ and en/).",
)
@click.option("--max-mb", type=int, default=8, show_default=True, help="Text per data type, in MiB.")
def demo_corpus(output_dir: Path, max_mb: int) -> None:
    """Write a demo corpus from this Python's standard library (sources as code, docstrings as en)."""
    summary = build_demo_corpus(output_dir, max_mb << 20)
    click.echo(
        f"demo corpus in {output_dir}: "
        f"code {summary.code_documents:,} documents ({summary.code_bytes / 2**20:.1f} MiB), "
        f"en {summary.en_documents:,} documents ({summary.en_bytes / 2**20:.1f} MiB)"
    )


def _print_report(report: StageReport) -> None:
    rate = report.seconds or 1e-9
    click.echo(
        f"tokenized {report.files_done} file(s) ({report.files_skipped} already done): "
        f"{report.documents:,} documents, {report.tokens:,} tokens, {report.input_bytes / 2**20:,.1f} MiB "
        f"in {report.seconds:.1f} s ({report.documents / rate:,.0f} docs/s, "
        f"{report.tokens / rate:,.0f} tokens/s, {report.input_bytes / 2**20 / rate:,.1f} MB/s)"
    )
    if report.rejected:
        click.echo(f"rejected {report.rejected:,} line(s); the first ones:")
        for sample in report.reject_samples:
            click.echo(f"  {sample}")
        click.echo("  (every rejected line is listed in <output>/<type>/<file>.rejects.jsonl)")
    for name in report.empty_files:
        click.echo(f"empty file (no documents): {name}")
    for name in report.ignored_files:
        click.echo(f"ignored (not .jsonl/.txt/.parquet[.gz|.zst] inside a type folder): {name}")
    for name, reason in report.failed_files.items():
        click.echo(f"FAILED {name}: {reason}", err=True)
    if report.manifest_path is not None:
        click.echo(f"manifest: {report.manifest_path}")


if __name__ == "__main__":
    main()

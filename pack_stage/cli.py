"""`pack-stage`: click commands only (parse, call, print)."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from pack_stage.inspect_row import render_row, summary
from pack_stage.internlm_folder import InternLMDataError, is_internlm_folder
from pack_stage.pack import DEFAULT_SEED, PackConfig, PackError, pack
from pack_stage.schema import PackedDataError, PackManifest
from pack_stage.sources import SourceError
from pack_stage.writer import OutputError
from tokenize_stage.schema import ManifestError, TokenizerError, load_tokenizer

# User errors: shown as one message, without a traceback.
USER_ERRORS = (
    PackError,
    PackedDataError,
    SourceError,
    OutputError,
    ManifestError,
    TokenizerError,
    InternLMDataError,
)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Pack token shards into fixed-length rows for training (InternLM's packed dataset)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@main.command()
@click.option(
    "--input",
    "input_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Token folder (tokenize-stage output), or a folder of InternLM's *.bin / *.bin.meta files.",
)
@click.option(
    "--output",
    "output_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder for the packed shards.",
)
@click.option("--seq-len", required=True, type=int, help="Tokens per sequence; no segment is longer.")
@click.option(
    "--micro-bsz",
    required=True,
    type=int,
    help="Sequences per packed row: packed_length = micro_bsz * seq_len.",
)
@click.option(
    "--pack-sample-into-one",
    is_flag=True,
    help="Fixed segments of seq_len that cross documents (InternLM's PackedDatasetWithoutCuSeqlen).",
)
@click.option(
    "--min-length",
    default=0,
    show_default=True,
    type=int,
    help="Drop documents with fewer tokens (empty ones are always dropped).",
)
@click.option(
    "--valid-fraction",
    default=0.0,
    show_default=True,
    type=float,
    help="Fraction of documents for the valid split, in [0, 1).",
)
@click.option(
    "--seed",
    default=DEFAULT_SEED,
    show_default=True,
    type=int,
    help="Seed of the valid split choice and the shuffle.",
)
@click.option("--no-shuffle", is_flag=True, help="Keep the token manifest's document order.")
@click.option("--overwrite", is_flag=True, help="Replace a previous pack output in --output.")
@click.option(
    "--rows-per-part", default=None, type=int, help="Rows per part file [default: about 1 GiB per part]."
)
@click.option(
    "--tokenizer",
    "tokenizer_path",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="For InternLM *.bin input: the tokenizer it was made with, recorded for inspect and export.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def run(
    input_dir: Path,
    output_dir: Path,
    seq_len: int,
    micro_bsz: int,
    pack_sample_into_one: bool,
    min_length: int,
    valid_fraction: float,
    seed: int,
    no_shuffle: bool,
    overwrite: bool,
    rows_per_part: int | None,
    tokenizer_path: Path | None,
    no_progress: bool,
) -> None:
    """Pack the token folder --input into --output."""
    config = PackConfig(
        input=input_dir,
        output=output_dir,
        seq_len=seq_len,
        micro_bsz=micro_bsz,
        pack_sample_into_one=pack_sample_into_one,
        min_length=min_length,
        valid_fraction=valid_fraction,
        seed=seed,
        shuffle=not no_shuffle,
        overwrite=overwrite,
        rows_per_part=rows_per_part,
    )
    try:
        tokenizer = load_tokenizer(tokenizer_path).identity if tokenizer_path else None
        if tokenizer is not None and not is_internlm_folder(input_dir):
            raise click.UsageError("--tokenizer is for InternLM *.bin input; token folders name their own")
        manifest = pack(config, progress=not no_progress, tokenizer=tokenizer)
    except USER_ERRORS as error:
        raise click.ClickException(str(error)) from error
    click.echo(summary(manifest))


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--split", default="train", show_default=True, help="Split to show a row of.")
@click.option("--row", default=0, show_default=True, type=int, help="Row to decode.")
def inspect(folder: Path, split: str, row: int) -> None:
    """Print a pack's summary and one row decoded to text, segment by segment."""
    try:
        click.echo(summary(PackManifest.load(folder)))
        click.echo()
        click.echo(render_row(folder, split, row))
    except USER_ERRORS as error:
        raise click.ClickException(str(error)) from error


if __name__ == "__main__":
    main()

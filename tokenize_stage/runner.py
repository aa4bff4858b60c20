"""The stage's orchestration: plan, skip what is done, tokenize the rest in parallel, finish files
as their last unit completes, write the manifest when everything is in."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import queue
import shutil
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from tokenize_stage.durable import durable_replace, fsync_folder, write_json_atomic
from tokenize_stage.progress import StageProgress
from tokenize_stage.readers import DEFAULT_MAX_LINE_BYTES
from tokenize_stage.schema import FORMAT, MANIFEST_NAME, FileEntry, token_dtype_for
from tokenize_stage.sft import ChatTemplateError, template_identity
from tokenize_stage.shards import (
    PARTS_DIR,
    STATE_DIR,
    finalize_file,
    finished_unit,
    lines_before_unit,
    manifest_totals,
    prepare_parts,
    rejects_rel,
    state_path,
)
from tokenize_stage.sources import (
    DEFAULT_CHUNK_BYTES,
    InputError,
    InputFile,
    WorkUnit,
    assign_to_shard,
    discover_inputs,
    plan_units,
    type_ids_for,
)
from tokenize_stage.text_tokenizers import Tokenizer, load_tokenizer
from tokenize_stage.worker import (
    StrictReject,
    UnitStats,
    WorkerConfig,
    init_pool_worker,
    init_worker,
    run_unit,
)

log = logging.getLogger(__name__)


class StageError(RuntimeError):
    """A failure the user must act on; the message says what and where."""


@dataclass(frozen=True)
class StageOptions:
    input: Path
    output: Path
    tokenizer_path: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos: bool = True
    add_eos: bool = True
    text_key: str = "content"
    whole_file: bool = False
    strict: bool = False
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    workers: int = 1
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    num_shards: int = 1
    shard_index: int = 0
    show_progress: bool = True
    sft: bool = False  # chat / instruction jsonl with prompt tokens masked (tokenize_stage.sft)
    chat_template: str = "auto"  # auto | default | tokenizer


@dataclass
class StageReport:
    manifest_path: Path | None
    files_done: int = 0
    files_skipped: int = 0
    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    rejected: int = 0
    reject_samples: list[str] = field(default_factory=list)
    empty_files: list[str] = field(default_factory=list)
    ignored_files: list[str] = field(default_factory=list)
    failed_files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def shard_manifest_name(index: int, count: int) -> str:
    return f"manifest.shard-{index:05d}-of-{count:05d}.json"


def run_stage(options: StageOptions) -> StageReport:
    started = time.monotonic()
    output = options.output.resolve()
    all_files, ignored, broken = discover_inputs(options.input)
    if broken and options.strict:
        rel, reason = next(iter(broken.items()))
        raise StageError(f"{options.input.resolve() / rel}: {reason} (--strict)")
    if not all_files and not broken:
        raise StageError(
            f"no .jsonl/.txt/.parquet files under type folders of {options.input.resolve()} "
            "(expected <input>/<type>/..., e.g. <input>/en/part-0.jsonl)"
        )
    types = type_ids_for(sorted({f.data_type for f in all_files}))
    files = all_files
    if options.num_shards > 1:
        files = assign_to_shard(all_files, options.num_shards, options.shard_index)
    tokenizer = load_tokenizer(options.tokenizer_path, options.bos_token, options.eos_token)
    _check_special_tokens(tokenizer, options)
    header = _manifest_header(tokenizer, types, options)
    output.mkdir(parents=True, exist_ok=True)
    manifest_path = output / (
        MANIFEST_NAME
        if options.num_shards == 1
        else shard_manifest_name(options.shard_index, options.num_shards)
    )
    done = _load_finished(output, manifest_path, header, files)
    _set_manifest_aside(manifest_path, output)  # from here until the end the folder is incomplete
    _drop_stale_outputs(output, all_files)

    report = StageReport(manifest_path=None)
    report.ignored_files = ignored
    report.failed_files.update(broken)
    todo = [f for f in files if f.rel not in done]
    report.files_skipped = len(files) - len(todo)
    config = WorkerConfig(
        options.tokenizer_path,
        options.bos_token,
        options.eos_token,
        options.add_bos,
        options.add_eos,
        options.text_key,
        options.whole_file,
        options.strict,
        options.max_line_bytes,
        options.sft,
        options.chat_template,
    )
    entries = _tokenize_files(output, todo, config, options, report)
    done.update(entries)
    if report.failed_files:
        report.seconds = time.monotonic() - started
        return report

    manifest = dict(header)
    manifest["files"] = {rel: done[rel].to_json() for rel in sorted(done)}
    manifest["totals"] = manifest_totals(manifest["files"].values())
    if options.num_shards > 1:
        manifest["shard"] = {
            "index": options.shard_index,
            "count": options.num_shards,
            "assigned": [f.rel for f in files],
        }
    write_json_atomic(manifest_path, manifest)
    (output / STATE_DIR / manifest_path.name).unlink(missing_ok=True)
    shutil.rmtree(output / PARTS_DIR, ignore_errors=True)
    if options.num_shards == 1:
        shutil.rmtree(output / STATE_DIR, ignore_errors=True)
    for entry in done.values():
        if entry.documents == 0 and entry.size == 0:
            report.empty_files.append(entry.path)
    report.manifest_path = manifest_path
    report.seconds = time.monotonic() - started
    return report


def _check_special_tokens(tokenizer: Tokenizer, options: StageOptions) -> None:
    identity = tokenizer.identity
    for wanted, token_id, flag in (
        (options.add_bos, identity.bos_id, "bos"),
        (options.add_eos, identity.eos_id, "eos"),
    ):
        if wanted and token_id is None:
            raise StageError(
                f"tokenizer {identity.path} has no {flag.upper()} token that the stage recognises: "
                f"name it with --{flag}-token TOKEN, or pass --no-{flag}"
            )


def _manifest_header(tokenizer: Tokenizer, types: dict[str, int], options: StageOptions) -> dict:
    identity = tokenizer.identity
    return {
        "format": FORMAT,
        "tokenizer": identity.to_json(),
        "token_dtype": str(token_dtype_for(identity.vocab_size, options.sft)),
        "types": types,
        "settings": {
            "text_key": options.text_key,
            "whole_file": options.whole_file,
            "add_bos": options.add_bos,
            "add_eos": options.add_eos,
            "chunk_bytes": options.chunk_bytes,
            # Only when changed: folders made before the limit existed stay resumable.
            **(
                {"max_line_bytes": options.max_line_bytes}
                if options.max_line_bytes != DEFAULT_MAX_LINE_BYTES
                else {}
            ),
            **({"sft": _sft_settings(options)} if options.sft else {}),
        },
    }


def _sft_settings(options: StageOptions) -> dict:
    try:
        return template_identity(options.chat_template, options.tokenizer_path)
    except ChatTemplateError as error:
        raise StageError(str(error)) from None


def _load_finished(
    output: Path, manifest_path: Path, header: dict, files: list[InputFile]
) -> dict[str, FileEntry]:
    """Entries of inputs already finished and unchanged, from an earlier complete or partial run.
    Refuses an output folder made with other settings: mixing them would corrupt the corpus."""
    settings_path = output / STATE_DIR / "settings.json"
    earlier: dict[str, dict] = {}
    # The manifest of a complete folder, else the one a run stopped before its end had set aside.
    for previous_path in (manifest_path, output / STATE_DIR / manifest_path.name):
        if previous_path.is_file():
            previous = json.loads(previous_path.read_text())
            _check_same_settings(previous, header, previous_path)
            earlier.update(previous["files"])
            break
    if settings_path.is_file():
        _check_same_settings(json.loads(settings_path.read_text()), header, settings_path)
    elif any(output.iterdir()) and not manifest_path.is_file():
        others = [p.name for p in output.iterdir() if p.name not in (STATE_DIR, PARTS_DIR)]
        if others and not any(n.startswith("manifest") for n in others):
            raise StageError(f"output folder {output} is not empty and holds no tokenize-stage output")
    settings_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(settings_path, header)
    by_rel = {f.rel: f for f in files}
    done: dict[str, FileEntry] = {}
    for file in files:
        record = state_path(output, file)
        data = json.loads(record.read_text()) if record.is_file() else earlier.get(file.rel)
        if data is None:
            continue
        entry = FileEntry.from_json(file.rel, data)
        current = by_rel[file.rel]
        if (entry.size, entry.mtime_ns) == (current.size, current.mtime_ns) and (
            output / entry.shard
        ).is_file():
            done[file.rel] = entry
    return done


def _set_manifest_aside(manifest_path: Path, output: Path) -> None:
    """Moves the manifest into .state/ rather than deleting it: the folder stops looking complete,
    and the entries of the finished inputs survive a run stopped before it writes a new one.
    Deleted, they were lost, and a run adding one input, killed, made the next redo every input."""
    if manifest_path.is_file():
        durable_replace(manifest_path, output / STATE_DIR / manifest_path.name)
        fsync_folder(output)  # the name gone from the output folder, so it cannot come back complete


def _check_same_settings(previous: dict, header: dict, where: Path) -> None:
    for key in ("format", "tokenizer", "token_dtype", "settings"):
        if previous.get(key) != header[key]:
            raise StageError(
                f"{where} was made with {key}={json.dumps(previous.get(key))}, this run has "
                f"{key}={json.dumps(header[key])}: use another --output folder, or delete this one"
            )


def _drop_stale_outputs(output: Path, files: list[InputFile]) -> None:
    """Shards of inputs that are gone are removed, so the folder mirrors the input; so are the
    temporary files of a run that was killed while writing (`*.tmp-<pid>`)."""
    for path in output.rglob("*.tmp-*"):
        if path.is_file() and path.name.rsplit(".tmp-", 1)[-1].isdigit():
            path.unlink()
    current = {f.shard_rel for f in files} | {rejects_rel(f) for f in files}
    for pattern in ("*.arrow", "*.rejects.jsonl"):
        for path in output.rglob(pattern):
            rel = path.relative_to(output).as_posix()
            if rel.startswith((PARTS_DIR, STATE_DIR)) or rel in current:
                continue
            path.unlink()
            log.warning("removed %s: its input no longer exists", rel)


def _tokenize_files(
    output: Path, files: list[InputFile], config: WorkerConfig, options: StageOptions, report: StageReport
) -> dict[str, FileEntry]:
    units_by_file: dict[str, list[WorkUnit]] = {}
    stats_by_file: dict[str, dict[int, UnitStats]] = {}
    pending: list[WorkUnit] = []
    for file in files:
        try:
            units = plan_units(file, options.chunk_bytes, options.whole_file)
            with open(file.path, "rb"):
                pass  # an unreadable file is reported now, not after hours of work
        except (InputError, OSError) as error:
            report.failed_files[file.rel] = str(error)
            if options.strict:
                raise StageError(f"{file.path}: {error}") from error
            continue
        prepare_parts(output, file, options.chunk_bytes)
        units_by_file[file.rel] = units
        stats_by_file[file.rel] = {}
        for unit in units:
            previous = finished_unit(output, unit)
            if previous is not None:
                stats_by_file[file.rel][unit.index] = previous
            else:
                pending.append(unit)

    entries: dict[str, FileEntry] = {}
    total_bytes = sum(u.end - u.start if u.file.fmt != "parquet" else 0 for u in pending)
    total_bytes += sum(f.size for f in files if f.fmt == "parquet" and f.rel in units_by_file)
    progress = StageProgress(total_bytes, enabled=options.show_progress)

    def on_unit_done(unit: WorkUnit, stats: UnitStats) -> None:
        rel = unit.file.rel
        stats_by_file[rel][unit.index] = stats
        if len(stats_by_file[rel]) == len(units_by_file[rel]):
            ordered = [stats_by_file[rel][u.index] for u in units_by_file[rel]]
            entry = finalize_file(output, unit.file, units_by_file[rel], ordered)
            entries[rel] = entry
            report.files_done += 1
            report.documents += entry.documents
            report.tokens += entry.tokens
            report.input_bytes += entry.size
            report.rejected += entry.rejected
            for line, reason in _first_rejects(ordered, unit.file, 10 - len(report.reject_samples)):
                report.reject_samples.append(f"{unit.file.path}:{line}: {reason}")

    # Files whose units were all finished before (a crash during finalisation) finish now.
    for file in files:
        rel = file.rel
        if rel in units_by_file and len(stats_by_file[rel]) == len(units_by_file[rel]) and units_by_file[rel]:
            last = units_by_file[rel][-1]
            on_unit_done(last, stats_by_file[rel][last.index])

    try:
        _execute(pending, output, config, options, progress, on_unit_done, report)
    finally:
        progress.close()
    return entries


def _first_rejects(stats: list[UnitStats], file: InputFile, limit: int) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    offset = 0
    for unit_stats in stats:
        for line, reason in unit_stats.rejects:
            if len(found) >= limit:
                return found
            found.append((offset + line, reason))
        offset += unit_stats.lines
    return found


def _execute(
    pending: list[WorkUnit],
    output: Path,
    config: WorkerConfig,
    options: StageOptions,
    progress: StageProgress,
    on_unit_done: Callable[[WorkUnit, UnitStats], None],
    report: StageReport,
) -> None:
    parts_dir = output / PARTS_DIR
    if not pending:
        return
    if options.workers <= 1:
        updates: queue.Queue = queue.Queue()
        init_worker(config, updates)  # type: ignore[arg-type]
        for unit in pending:
            stats = _guarded(lambda u=unit: run_unit(u, parts_dir), unit, options, report)
            progress.drain(updates)
            if stats is not None:
                on_unit_done(unit, stats)
        return
    # spawn, not fork: a forked copy of a process that already ran Rust/OpenMP thread pools can
    # deadlock, and spawn behaves the same on every platform.
    context = multiprocessing.get_context("spawn")
    updates = context.Queue()
    with ProcessPoolExecutor(
        options.workers,
        mp_context=context,
        initializer=init_pool_worker,
        initargs=(config, updates, os.getpid()),
    ) as pool:
        futures: dict[Future, WorkUnit] = {pool.submit(run_unit, unit, parts_dir): unit for unit in pending}
        try:
            while futures:
                finished, _ = wait(list(futures), timeout=0.2, return_when=FIRST_COMPLETED)
                progress.drain(updates)
                for future in finished:
                    unit = futures.pop(future)
                    stats = _guarded(future.result, unit, options, report)
                    if stats is not None:
                        on_unit_done(unit, stats)
            progress.drain(updates)
        except BaseException:
            # Ctrl-C or a --strict error: do not wait for the units in flight.
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _guarded(
    call: Callable[[], UnitStats], unit: WorkUnit, options: StageOptions, report: StageReport
) -> UnitStats | None:
    """Runs one unit; a bad line under --strict or an unreadable file becomes a StageError naming
    file:line; without --strict a file that fails is recorded and the run goes on."""
    try:
        return call()
    except StrictReject as reject:
        line = lines_before_unit(reject.unit) + reject.local_line
        raise StageError(f"{reject.unit.file.path}:{line}: {reject.reason} (--strict)") from None
    except Exception as error:  # gzip, zstd, parquet and OS errors all mean "this file failed"
        message = f"{type(error).__name__}: {error}"
        if options.strict:
            raise StageError(f"{unit.file.path}: {message}") from error
        report.failed_files.setdefault(unit.file.rel, message)
        return None

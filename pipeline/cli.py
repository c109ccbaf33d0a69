"""``quarry``: batch speech transcription on Ray.

Thin on purpose: parse arguments, load the config, call plan.run_job, report.
"""

from __future__ import annotations

import logging
import os
import re
import sys

import click

from .config import load_config
from .errors import CannotRun, ExitCode
from .scrub import install_log_scrubber, redact_text, register_secret, register_secrets_in

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "AZURE_STORAGE_KEY",
              "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS",
              "HF_TOKEN", "RAY_AUTH_TOKEN")
"""Environment variables whose values are credentials: scrubbed from anything this process prints."""


def _version() -> str:
    """The installed distribution's version (quarry-speech), or a plain statement that it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("quarry-speech")
    except PackageNotFoundError:
        return "unknown (run from a source tree: the quarry-speech distribution is not installed)"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), "--version", prog_name="quarry", message="%(prog)s %(version)s")
@click.option("-v", "--verbose", is_flag=True, help="Log progress and Ray's own messages.")
def main(verbose: bool) -> None:
    """Quarry transcribes (or translates) every recording in a manifest and scores WER where
    references exist. Results are Parquet files under OUTPUT/transcripts/ plus OUTPUT/summary.json.
    """
    # Credentials never reach a log line or a message: every record this process logs is
    # scrubbed (URIs' user-info and tokens, and the job's own credentials wherever they appear).
    install_log_scrubber()
    register_secret(*(os.environ.get(name) for name in SECRET_ENV))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("quarry").setLevel(logging.INFO)


@main.command()
@click.option("--manifest", metavar="URI",
              help="JSONL, CSV or Parquet manifest at any fsspec URL (local path, s3://, file://, memory://). "
                   "Columns: audio (required), id, reference, language, task, target_language, keywords; "
                   "others are carried through.")
@click.option("--audio", "audio_pattern", metavar="URI",
              help="Instead of a manifest: every audio object under this prefix, or matching this glob "
                   "(quote it), e.g. 's3://archive/calls/2026-11-*/*.wav'. The list is written to "
                   "OUTPUT/inputs.jsonl.")
@click.option("--skip-done-in", metavar="URI",
              help="With --audio: leave out objects that earlier runs under this folder committed (e.g. the "
                   "parent of nightly run_date=... outputs), also runs that crashed or stopped early. Rows that "
                   "failed with a transient status (fetch_error, inference_error) are tried again.")
@click.option("--output", required=True, metavar="URI", help="Output folder or prefix (local or s3://).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="YAML job config; without it the embedded default (local Ray, offline CPU engine) applies.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override any config key, e.g. --set engine.name=whisper --set engine.model=base. Repeatable.")
@click.option("--overwrite", is_flag=True,
              help="Delete results already at OUTPUT first. Without it, a rerun of the same job resumes "
                   "(rows already written are skipped) and another job's output is refused.")
def run(manifest: str | None, audio_pattern: str | None, skip_done_in: str | None, output: str,
        config_path: str | None, overrides: tuple[str, ...], overwrite: bool) -> None:
    """Transcribe every row of MANIFEST (or every object under --audio) into OUTPUT.

    A rerun to the same OUTPUT resumes: rows already written are not done again.

    Exit status: 0 when the job completed (even with some failed rows, each carrying its reason);
    1 when failed rows exceed output.max_failed_fraction; 2 when the job could not run.
    """
    from .claim import claim_output
    from .plan import run_job

    if bool(manifest) == bool(audio_pattern):
        raise click.UsageError("give exactly one of --manifest and --audio")
    if skip_done_in and not audio_pattern:
        raise click.UsageError("--skip-done-in goes with --audio")
    try:
        cfg = load_config(config_path, overrides)
        register_secrets_in(cfg.storage.options)
        if manifest:
            result = run_job(cfg, manifest, output, overwrite=overwrite)
        else:
            from .discover import discover

            with claim_output(output, cfg.storage.options) as claim:  # before inputs.jsonl is written there
                found = discover(audio_pattern, output, skip_done_in=skip_done_in,
                                 storage_options=cfg.storage.options)
                click.echo(f"found {found.n_found} audio objects, {found.n_done_before} done by earlier runs, "
                           f"{found.n_todo} to do", err=True)
                # the listed objects may be read, not whatever the output's store holds
                result = run_job(cfg.reading_from(found.root), found.manifest_uri, output, overwrite=overwrite,
                                 claim=claim)
    except Exception as e:  # noqa: BLE001 - an engine that cannot start surfaces here through Ray
        _fail_from(e)
    click.echo(redact_text("\n".join([*result.summary.lines(),
                                      f"transcripts: {result.summary_uri.rsplit('/', 1)[0]}/transcripts/",
                                      f"summary: {result.summary_uri}"])))
    if not result.ok:
        _budget_exceeded(result.summary)
        sys.exit(ExitCode.FAILED)


@main.command()
@click.option("--manifest", required=True, metavar="URI", help="A small manifest of clips to measure on.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), metavar="FILE", help="YAML job config.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override any config key. Repeatable.")
@click.option("--batch-sizes", default="8", show_default=True, help="Comma-separated engine batch sizes.")
@click.option("--replicas", default="1", show_default=True,
              help="Comma-separated actor counts for pipeline runs (empty: the engine alone only).")
@click.option("--engines", default="", metavar="NAME[=MODEL],...",
              help="Compare these engines on the same clips, e.g. whisper,transformers (default: the configured one).")
def bench(manifest: str, config_path: str | None, overrides: tuple[str, ...], batch_sizes: str, replicas: str,
          engines: str) -> None:
    """Measure RTFx of the engine alone and of the whole pipeline on the same clips, side by side.

    Prints a table; the wall/engine column is the pipeline's overhead (job wall / engine-only wall).
    """
    from .bench import engine_configs, format_table, run_bench

    try:
        cfg = load_config(config_path, overrides)
        register_secrets_in(cfg.storage.options)
        sizes = [int(x) for x in batch_sizes.split(",") if x]
        counts = [int(x) for x in replicas.split(",") if x]
        names = [x for x in engines.split(",") if x.strip()]
        chosen = engine_configs(cfg, names)
    except (CannotRun, ValueError) as e:  # pydantic's ValidationError is a ValueError
        _fail(str(e))
    click.echo(", ".join(f"engine {e.name} / {e.model}" for e in chosen) + f" on {manifest}")
    click.echo(format_table(run_bench(cfg, manifest, sizes, counts, names)))


def _root_cause(error: BaseException) -> BaseException:
    """The error worth showing: an EngineUnavailable anywhere in the chain, including one that
    Ray reports only as text (an actor whose constructor raised dies with ActorDiedError)."""
    from .engines import EngineUnavailable

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, EngineUnavailable):
            return seen
        found = re.search(r"EngineUnavailable: (.+)", str(seen))
        if found:
            return EngineUnavailable(found.group(1).strip())
        seen = seen.__cause__ or seen.__context__
    return getattr(error, "cause", None) or error


def _fail(message: str) -> None:
    click.echo(redact_text(f"quarry: {message.splitlines()[0] if message else 'error'}"), err=True)
    sys.exit(ExitCode.CANNOT_RUN)


def _fail_from(error: Exception) -> None:
    """Exit 2 with one line: the error itself when the job cannot run, else its root cause."""
    if isinstance(error, CannotRun):
        _fail(str(error))
    cause = _root_cause(error)
    _fail(f"job failed: {type(cause).__name__}: {cause}")


def _budget_exceeded(summary) -> None:
    click.echo(f"quarry: failed rows {summary.n_failed}/{summary.n_input} exceed max_failed_fraction "
               f"{summary.max_failed_fraction}", err=True)


# --- quarry report / quarry export: read a finished output; they never start Ray ------------------


@main.command("report")
@click.argument("output")
@click.option("--group-by", "group_by", multiple=True, metavar="COLUMN",
              help="Also break the error rate down by this transcript column, e.g. a carried-through manifest "
                   "column such as dataset or speaker. Repeatable.")
@click.option("--worst", default=20, show_default=True, type=click.IntRange(min=0), metavar="N",
              help="How many of the highest-error rows to show, aligned word by word against their reference.")
def report_command(output: str, group_by: tuple[str, ...], worst: int) -> None:
    """Write OUTPUT/report.html: one self-contained page about a job's results.

    It holds the headline figures (rows, ok and failed, audio hours, RTFx), corpus WER / CER per
    language from summed counts, the error rate by each --group-by column, failures by reason,
    a duration histogram, throughput over time, the worst rows with reference and hypothesis
    aligned (substitutions, deletions, insertions coloured), and the job's configuration.
    The page has no scripts and loads nothing from the network; open it in any browser.

    OUTPUT is the folder a `quarry run --output` wrote (local or s3://).
    """
    from .report import write_report

    try:
        click.echo(write_report(output, group_by=list(group_by), worst=worst))
    except (CannotRun, OSError) as e:
        _fail(str(e))


@main.command("export")
@click.argument("output")
@click.option("--format", "fmt", required=True, type=click.Choice(["lhotse", "nemo", "hf"]),
              help="lhotse: a cuts manifest (JSONL, for CutSet.from_jsonl). nemo: a NeMo ASR manifest (JSONL with "
                   "audio_filepath, duration, text, lang). hf: a Parquet file for datasets.load_dataset('parquet', "
                   "...) with an Audio column of paths.")
@click.option("--dest", required=True, metavar="URI",
              help="File to write (local or s3://). A JSONL destination ending in .gz is gzipped.")
@click.option("--min-avg-logprob", type=float, metavar="X",
              help="Keep rows whose avg_logprob (the engine's confidence) is at least X, e.g. -0.5.")
@click.option("--min-duration", "min_duration_s", type=float, metavar="SECONDS", help="Keep rows at least this long.")
@click.option("--max-duration", "max_duration_s", type=float, metavar="SECONDS", help="Keep rows at most this long.")
@click.option("--language", "languages", multiple=True, metavar="CODE",
              help="Keep rows whose text is in this language (the target language for translations). Repeatable.")
def export_command(output: str, fmt: str, dest: str, min_avg_logprob: float | None, min_duration_s: float | None,
                   max_duration_s: float | None, languages: tuple[str, ...]) -> None:
    """Export the transcribed rows of OUTPUT for a training or labelling tool.

    Only rows with status ok are exported; the options narrow them further. Audio is not copied:
    every format points at the audio URIs the job read. Prints how many rows went where.
    """
    from .exports import export

    try:
        result = export(output, fmt, dest, min_avg_logprob=min_avg_logprob, min_duration_s=min_duration_s,
                        max_duration_s=max_duration_s, languages=list(languages) or None)
    except (CannotRun, OSError) as e:
        _fail(str(e))
    click.echo(f"{result.count} rows -> {result.path}")


# --- quarry job: the ready-made jobs in jobs/ (pipeline/jobs/) ----------------------------------


@main.command("job")
@click.argument("job_yaml", type=click.Path(dir_okay=False), metavar="JOB_YAML")
@click.option("--date", "run_date", metavar="YYYY-MM-DD",
              help="nightly-archive: the run's date, its output partition run_date=YYYY-MM-DD (default: today, UTC).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a key of the job's quarry config, e.g. --set engine.replicas=4. Repeatable.")
@click.option("--overwrite", is_flag=True,
              help="Start the job's output over (nightly-archive: this date's) instead of resuming it.")
def job_command(job_yaml: str, run_date: str | None, overrides: tuple[str, ...], overwrite: bool) -> None:
    """Run a job defined in JOB_YAML (kind: nightly-archive, call-center or dataset-labeling).

    Paths in the job file are relative to its folder. A rerun resumes. Prints a one-screen summary.

    Exit status: 0 when the job completed; 1 when the nightly canary's WER regressed past its
    margin (the figures are printed) or failed rows exceed output.max_failed_fraction; 2 when the
    job could not run.
    """
    from .jobs import run_job_file

    try:
        outcome = run_job_file(job_yaml, run_date=run_date, overrides=overrides, overwrite=overwrite,
                               echo=lambda text: click.echo(redact_text(text)))
    except Exception as e:  # noqa: BLE001 - an engine that cannot start surfaces here through Ray
        _fail_from(e)
    if outcome.exit_code:
        canary = getattr(outcome, "canary", None)
        if canary is not None and not canary.passed:
            click.echo(f"quarry: canary gate failed: {canary.line().splitlines()[-1].strip()}", err=True)
        if not outcome.summary.ok:
            _budget_exceeded(outcome.summary)
        sys.exit(outcome.exit_code)


if __name__ == "__main__":
    main()

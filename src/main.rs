use std::process::ExitCode;

use clap::Parser;
use classifier::cli::Args;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

fn main() -> ExitCode {
    classifier::tune_allocator();
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if classifier::serve::args::is_serve(&argv) {
        return serve(&argv[1..]);
    }
    let args = match Args::try_parse_from(&argv) {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors.
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    if let Some(kind) = args.generate {
        return match classifier::cli::generate(kind, &mut std::io::stdout().lock()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: cannot write: {e}");
                ExitCode::from(2)
            }
        };
    }
    init_logging(args.quiet, args.verbose);
    let settings = match classifier::cli::Settings::resolve(&args) {
        Ok(settings) => settings,
        Err(e) => {
            tracing::error!("{e:#}");
            return ExitCode::from(2);
        }
    };
    guard_panics();
    // Decodes, model preparation and file reads run on the blocking pool
    // (inference on the engine's own threads). Every thread that allocates
    // gets its own malloc arena, which keeps what it once held: tokio's
    // default of 512 threads let the peak grow with --concurrency (500 MB
    // over the corpus from local files), and `threads + 1` threads kept it
    // lowest at the same speed on two CPUs (see BENCHMARKS.md).
    let Some(runtime) = runtime(settings.engine.threads + 1) else { return ExitCode::from(2) };
    let mut stdout = std::io::stdout();
    let outcome = runtime.block_on(classifier::cli::run::run(&settings, &mut stdout));
    // Results are out: do not wait for decodes of a run that stopped early.
    runtime.shutdown_background();
    match outcome {
        Ok(summary) if summary.failed == 0 || summary.stdout_closed => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(2)
        }
    }
}

/// `classifier serve ...`: `args` starts at `serve`. Exits 0 once drained
/// after SIGTERM or ctrl-c, 2 on a usage error or a model that cannot load.
fn serve(args: &[std::ffi::OsString]) -> ExitCode {
    use classifier::serve::{ServeArgs, ServeSettings};
    let args = match ServeArgs::try_parse_from(args) {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    init_logging(args.quiet, args.verbose);
    let settings = match ServeSettings::resolve(&args) {
        Ok(settings) => settings,
        Err(e) => {
            tracing::error!("{e:#}");
            return ExitCode::from(2);
        }
    };
    guard_panics();
    // As for the command line (below); each model has its own pool.
    let threads = settings.models.iter().map(|m| m.engine.threads).sum::<usize>();
    let Some(runtime) = runtime(threads + 1) else { return ExitCode::from(2) };
    let outcome = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(settings.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", settings.listen))?;
        classifier::serve::serve(listener, &settings, classifier::serve::shutdown_signal()).await
    });
    runtime.shutdown_background();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(2)
        }
    }
}

/// Panics caught while tract reads an untrusted model become errors with
/// their own message; any other panic is a bug and is shown as usual.
fn guard_panics() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !classifier::model::panic_is_guarded() {
            default_hook(info);
        }
    }));
}

fn runtime(blocking_threads: usize) -> Option<tokio::runtime::Runtime> {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().max_blocking_threads(blocking_threads).build();
    match runtime {
        Ok(runtime) => Some(runtime),
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            None
        }
    }
}

/// Logs go to stderr, stdout carries results only. `-v` adds a line with the
/// busy and idle time of every span as it closes.
fn init_logging(quiet: bool, verbose: u8) {
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn,classifier=info",
        (false, 1) => "info,classifier=debug",
        (false, _) => "debug,classifier=trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| classifier::cli::progress::Stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_span_events(FmtSpan::CLOSE)
        .with_target(false)
        .init();
}

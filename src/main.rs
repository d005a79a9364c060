use std::process::ExitCode;

use clap::Parser;
use classifier::cli::Args;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

fn main() -> ExitCode {
    classifier::tune_allocator();
    let args = match Args::try_parse() {
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
    init_logging(&args);
    let settings = match classifier::cli::Settings::resolve(&args) {
        Ok(settings) => settings,
        Err(e) => {
            tracing::error!("{e:#}");
            return ExitCode::from(2);
        }
    };
    // Panics caught while tract reads an untrusted model become errors with
    // their own message; any other panic is a bug and is shown as usual.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !classifier::model::panic_is_guarded() {
            default_hook(info);
        }
    }));
    // Decodes, model preparation and file reads run on the blocking pool
    // (inference on the engine's own threads). Every thread that allocates
    // gets its own malloc arena, which keeps what it once held: tokio's
    // default of 512 threads let the peak grow with --concurrency (500 MB
    // over the corpus from local files), and `threads + 1` threads kept it
    // lowest at the same speed on two CPUs (see BENCHMARKS.md).
    let blocking_threads = settings.engine.threads + 1;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().max_blocking_threads(blocking_threads).build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
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

/// Logs go to stderr, stdout carries results only. `-v` adds a line with the
/// busy and idle time of every span as it closes.
fn init_logging(args: &Args) {
    let default = match (args.quiet, args.verbose) {
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

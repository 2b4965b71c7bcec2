//! `proxy-server`: parse flags, validate, run. Everything else is in the library.

use std::io::Write;

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = proxy_server::config::Args::parse();
    let _log = args.log.init();
    let config = match proxy_server::Config::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            // Not eprintln!: it panics when stderr is a broken pipe.
            let _ = writeln!(std::io::stderr(), "proxy-server: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let shutdown = konnectivity_runtime::shutdown::Shutdown::new().on_signals();
    match proxy_server::run(config, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Not eprintln!: it panics when stderr is a broken pipe.
            let _ = writeln!(std::io::stderr(), "proxy-server: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

//! `opsctl`: flags in, [`opsctl::run`], an exit code out; errors go to stderr with the
//! server's own text.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = opsctl::cli::Cli::parse();
    match opsctl::run(cli) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("opsctl: {e}");
            std::process::ExitCode::from(e.exit_code())
        }
    }
}

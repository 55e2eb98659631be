//! `drover`: the coordinator daemon and operator CLI. Everything lives in the library; this
//! parses the command line, sets up logging and maps errors to exit codes.

use clap::Parser;
use drover::cli::{run::run, Cli, Command};

fn main() {
    let cli = Cli::parse();
    let default_log = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    drover::logging::init("drover", default_log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("drover: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(cli)) {
        eprintln!("drover: {}", e.message);
        std::process::exit(e.code);
    }
}

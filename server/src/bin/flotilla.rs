//! `flotilla`: the operator CLI.

fn main() -> std::process::ExitCode {
    flotilla_proto::install_crypto_provider();
    flotilla_proto::telemetry::init_or_exit("warn");
    let done = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(flotilla_server::cli::main()));
    match done {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", flotilla_proto::exit::error_text(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

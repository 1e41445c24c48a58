//! `flotilla`: the operator CLI.

#[tokio::main]
async fn main() {
    flotilla_proto::install_crypto_provider();
    flotilla_proto::telemetry::init("warn");
    if let Err(e) = flotilla_server::cli::main().await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

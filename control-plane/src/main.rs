//! `graylane`: the control-plane daemon (`serve`) and its CLI.

use clap::Parser;
use graylane_control_plane::cli::{self, Cli, Verb};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Verb::Serve { config } = &cli.command {
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info".into()),
            )
            .init();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            stop.cancel();
        });
        graylane_control_plane::serve::serve(config.clone(), shutdown).await?;
        return Ok(());
    }
    match cli::run(cli).await {
        Ok(out) => {
            print!("{out}");
            Ok(())
        }
        Err(e) => {
            eprintln!("graylane: {e}");
            std::process::exit(1);
        }
    }
}

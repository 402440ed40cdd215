//! `graylane-oci`: writes the filter's OCI image layout (`make oci`) and checks one.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "graylane-oci",
    version,
    about = "graylane's filter as an OCI image layout (Istio Wasm image, compat variant)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build the layout from a .wasm.
    Build {
        #[arg(long)]
        wasm: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
        tag: String,
        /// tar mtime; defaults to $SOURCE_DATE_EPOCH, else 0.
        #[arg(long, env = "SOURCE_DATE_EPOCH", default_value_t = 0)]
        mtime: u64,
    },
    /// Unexport the Proxy-Wasm callbacks graylane's filter never implements (bodies,
    /// trailers, on_done), so Envoy does not enter the VM for them on every request. Rewrites
    /// the file in place (through a temporary file and a rename); running it again changes
    /// nothing.
    Trim {
        wasm: PathBuf,
        /// Only check: fail if the file still exports any of those callbacks.
        #[arg(long)]
        check: bool,
    },
    /// Check a layout as Istio would read the image: media types, digests, plugin.wasm.
    Verify {
        dir: PathBuf,
        #[arg(long)]
        tag: Option<String>,
        /// Also require plugin.wasm to equal this file.
        #[arg(long)]
        wasm: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Build {
            wasm,
            out,
            tag,
            mtime,
        } => {
            let bytes =
                std::fs::read(&wasm).with_context(|| format!("reading {}", wasm.display()))?;
            let opts = graylane_oci::Options {
                tag: tag.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
                mtime,
            };
            let image = graylane_oci::build(&bytes, &opts)?;
            image.write(&out)?;
            println!("wrote {} (tag {tag})", out.display());
            println!(
                "  manifest    {}   WasmPlugin sha256 for oci:// URLs: {}",
                image.digest(),
                image.digest().hex()
            );
            println!(
                "  plugin.wasm {}   WasmPlugin sha256 for http:// URLs: {}",
                image.wasm_sha256,
                image.wasm_sha256.hex()
            );
        }
        Command::Trim { wasm, check } => {
            let bytes =
                std::fs::read(&wasm).with_context(|| format!("reading {}", wasm.display()))?;
            let (trimmed, removed) = graylane_oci::trim::trim_exports(
                &bytes,
                &graylane_oci::trim::UNUSED_HTTP_CALLBACKS,
            )
            .with_context(|| format!("trimming {}", wasm.display()))?;
            if removed.is_empty() {
                println!("{}: already trimmed", wasm.display());
            } else if check {
                anyhow::bail!(
                    "{}: still exports {} (run graylane-oci trim on it, as make wasm does)",
                    wasm.display(),
                    removed.join(", ")
                );
            } else {
                let tmp = wasm.with_extension(format!("wasm.trimming.{}", std::process::id()));
                std::fs::write(&tmp, &trimmed)
                    .with_context(|| format!("writing {}", tmp.display()))?;
                std::fs::rename(&tmp, &wasm)
                    .with_context(|| format!("replacing {}", wasm.display()))?;
                println!(
                    "{}: unexported {} ({} -> {} bytes)",
                    wasm.display(),
                    removed.join(", "),
                    bytes.len(),
                    trimmed.len()
                );
            }
        }
        Command::Verify { dir, tag, wasm } => {
            let pulled = graylane_oci::read(&dir, tag.as_deref())?;
            if let Some(w) = wasm {
                let want = std::fs::read(&w).with_context(|| format!("reading {}", w.display()))?;
                anyhow::ensure!(
                    want == pulled.wasm,
                    "{}: plugin.wasm differs from {}",
                    dir.display(),
                    w.display()
                );
            }
            println!(
                "ok  {}: manifest {}, plugin.wasm {} bytes ({})",
                dir.display(),
                pulled.manifest_digest,
                pulled.wasm.len(),
                graylane_oci::Digest::of(&pulled.wasm)
            );
        }
    }
    Ok(())
}

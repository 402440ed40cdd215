//! `make demo`'s backends: `demo-backend <name> <port> [<name> <port> ...]` answers every
//! request on `127.0.0.1:<port>` with body `<name>` and header `x-upstream: <name>` (GET `/echo`
//! shows the request headers it received), until killed. Several pairs serve several
//! backends from one process (`make bench` does, so that splitting traffic between clusters
//! does not also split it between processes competing for the same cores).
//! (The demo's signed gray cookie comes from the control plane: `graylane gray-cookie`.)

use std::net::SocketAddr;

use anyhow::{bail, Context};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        pairs if !pairs.is_empty() && pairs.len() % 2 == 0 => {
            let mut upstreams = Vec::new();
            for pair in pairs.chunks(2) {
                let [name, port] = pair else { continue };
                let port: u16 = port.parse().with_context(|| format!("port {port:?}"))?;
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                let upstream = graylane_e2e::Upstream::start_at(name, addr)
                    .with_context(|| format!("listening on {addr}"))?;
                eprintln!("demo-backend {name}: listening on {}", upstream.url());
                upstreams.push(upstream);
            }
            graylane_e2e::runtime().block_on(tokio::signal::ctrl_c())?;
            drop(upstreams);
            Ok(())
        }
        _ => bail!("usage: demo-backend <name> <port> [<name> <port> ...]"),
    }
}

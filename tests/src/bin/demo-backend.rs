//! `make demo`'s backends: `demo-backend <name> <port> [<name> <port> ...]` answers every
//! request on `127.0.0.1:<port>` with body `<name>` and header `x-upstream: <name>` (GET `/echo`
//! shows the request headers it received), until killed. Several pairs serve several
//! backends from one process (`make bench` does, so that splitting traffic between clusters
//! does not also split it between processes competing for the same cores).
//!
//! `demo-backend sign-cookie <key> <tenant> <ttl-seconds>` prints a signed `tenantGray`
//! cookie value for the demo's curl examples.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["sign-cookie", key, tenant, ttl] => {
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
            let ttl: u64 = ttl.parse().context("ttl-seconds")?;
            let tenant = graylane_strategy::parse_id(tenant.as_bytes())
                .with_context(|| format!("tenant id {tenant:?}"))?;
            println!(
                "{}",
                graylane_strategy::cookie::sign(key.as_bytes(), &tenant, now + ttl)
            );
            Ok(())
        }
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
        _ => bail!("usage: demo-backend <name> <port> [<name> <port> ...] | demo-backend sign-cookie <key> <tenant> <ttl-seconds>"),
    }
}

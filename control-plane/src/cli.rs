//! The CLI verbs of `graylane`, talking to the admin API.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use graylane_strategy::id::IdList;
use graylane_strategy::{Id, PercentBy, State};
use serde_json::{json, Value};

use crate::edit::{parse_ids, parse_interval};

#[derive(Debug, Parser)]
#[command(
    name = "graylane",
    version,
    about = "graylane: gray and blue-green releases behind Envoy"
)]
pub struct Cli {
    /// The control plane's admin API.
    #[arg(
        long,
        global = true,
        env = "GRAYLANE_SERVER",
        default_value = "http://127.0.0.1:9901"
    )]
    pub server: String,
    /// Bearer token (read or write role).
    #[arg(long, global = true, env = "GRAYLANE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(subcommand)]
    pub command: Verb,
}

#[derive(Debug, Subcommand)]
pub enum Verb {
    /// Run the control plane.
    Serve {
        #[arg(long, short)]
        config: std::path::PathBuf,
    },
    /// Services, clusters, states and versions.
    Status,
    /// Set a cluster's state: R, Y or G.
    SetState {
        service: String,
        cluster: String,
        state: String,
    },
    /// Add or remove whitelist ids and intervals.
    Whitelist {
        #[command(subcommand)]
        action: WhitelistVerb,
    },
    /// Set a cluster's percentage (or `off`).
    Percent {
        service: String,
        cluster: String,
        value: String,
        #[arg(long, default_value = "request")]
        by: String,
    },
    /// Which cluster serves a request, and why.
    Explain {
        service: String,
        #[arg(long)]
        tenant: Option<String>,
        /// name=value, repeatable.
        #[arg(long)]
        cookie: Vec<String>,
        /// name=value, repeatable.
        #[arg(long)]
        header: Vec<String>,
        #[arg(long)]
        caller_lane: Option<String>,
    },
    /// Versions, newest first.
    History {
        #[arg(long, default_value_t = 20)]
        limit: u64,
    },
    /// What changed between two versions.
    Diff { from: u64, to: u64 },
    /// Make a new version equal to an earlier one.
    Revert { version: u64 },
    /// The operation log.
    Operations {
        #[arg(long, default_value_t = 20)]
        limit: u64,
    },
    /// Print a signed gray cookie value for a tenant (uses the service's key from the API).
    SignCookie {
        service: String,
        tenant: String,
        #[arg(long, default_value_t = 86_400)]
        ttl: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum WhitelistVerb {
    Add(WhitelistArgs),
    Remove(WhitelistArgs),
}

#[derive(Debug, clap::Args)]
pub struct WhitelistArgs {
    pub service: String,
    pub cluster: String,
    /// Comma-separated ids: 1,2,acme
    #[arg(long)]
    pub ids: Option<String>,
    /// LOW-HIGH, repeatable.
    #[arg(long)]
    pub interval: Vec<String>,
    /// Set `all` (true or false).
    #[arg(long)]
    pub all: Option<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach {server}: {source}")]
    Connect {
        server: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{status}: {message}{}", field.as_ref().map(|f| format!(" (field {f})")).unwrap_or_default())]
    Api {
        status: u16,
        message: String,
        field: Option<String>,
    },
}

struct Client {
    http: reqwest::Client,
    server: String,
    token: Option<String>,
}

impl Client {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, Error> {
        let url = format!("{}{path}", self.server.trim_end_matches('/'));
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|source| Error::Connect {
            server: self.server.clone(),
            source,
        })?;
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status >= 400 {
            return Err(Error::Api {
                status,
                message: value["message"]
                    .as_str()
                    .map_or_else(|| value.to_string(), str::to_string),
                field: value["field"].as_str().map(str::to_string),
            });
        }
        Ok(value)
    }
}

fn kv(list: &[String], what: &str) -> Result<serde_json::Map<String, Value>, Error> {
    let mut m = serde_json::Map::new();
    for item in list {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| Error::Usage(format!("--{what} {item:?}: expected name=value")))?;
        m.insert(k.to_string(), Value::String(v.to_string()));
    }
    Ok(m)
}

fn written(v: &Value) -> String {
    let mut s = if v["changed"].as_bool() == Some(false) {
        format!("no change (version {})", v["version"])
    } else {
        format!("version {}", v["version"])
    };
    for line in v["summary"].as_array().into_iter().flatten() {
        s.push_str(&format!("\n  {}", line.as_str().unwrap_or_default()));
    }
    s.push('\n');
    s
}

fn ago(at: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let d = now.saturating_sub(at);
    match d {
        0..=59 => format!("{d}s ago"),
        60..=3599 => format!("{}m ago", d / 60),
        3600..=86_399 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86_400),
    }
}

/// Runs one verb (not `serve`); returns what to print.
pub async fn run(cli: Cli) -> Result<String, Error> {
    let c = Client {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|source| Error::Connect {
                server: cli.server.clone(),
                source,
            })?,
        server: cli.server.clone(),
        token: cli.token.clone(),
    };
    use reqwest::Method as M;
    match cli.command {
        Verb::Serve { .. } => Err(Error::Usage("serve is not a client verb".into())),
        Verb::Status => {
            let v = c.call(M::GET, "/v1/status", None).await?;
            let mut out = format!("version {}\n", v["version"]);
            if let Some(e) = v.get("config_error").filter(|e| !e.is_null()) {
                out.push_str(&format!(
                    "CONFIG ERROR (running version kept): {}:{}: {}: {}\n",
                    e["file"].as_str().unwrap_or_default(),
                    e["location"][0],
                    e["field"].as_str().unwrap_or_default(),
                    e["message"].as_str().unwrap_or_default()
                ));
            }
            out.push_str(&format!(
                "{:<16} {:<10} {:<24} {:<5} {:>6} {:>8} {:>9} {:>5} {:>9} {:>8}\n",
                "SERVICE",
                "CLUSTER",
                "ENVOY CLUSTER",
                "STATE",
                "WEIGHT",
                "IDS",
                "INTERVALS",
                "ALL",
                "PERCENT",
                "HEALTHY"
            ));
            for s in v["services"].as_array().into_iter().flatten() {
                for cl in s["clusters"].as_array().into_iter().flatten() {
                    let pct = cl["percent"]["value"]
                        .as_f64()
                        .map_or("-".to_string(), |p| format!("{p}%"));
                    let healthy = cl["healthy"]
                        .as_u64()
                        .map_or("?".to_string(), |h| h.to_string());
                    out.push_str(&format!(
                        "{:<16} {:<10} {:<24} {:<5} {:>6} {:>8} {:>9} {:>5} {:>9} {:>8}\n",
                        s["name"].as_str().unwrap_or_default(),
                        cl["key"].as_str().unwrap_or_default(),
                        cl["envoy_cluster"].as_str().unwrap_or_default(),
                        cl["status"].as_str().unwrap_or_default(),
                        cl["weight"],
                        cl["ids"],
                        cl["intervals"],
                        cl["all"],
                        pct,
                        healthy
                    ));
                }
            }
            for (k, src) in v["sources"].as_object().into_iter().flatten() {
                out.push_str(&format!(
                    "discovery {k}: {}\n",
                    if src["stale"].as_bool() == Some(true) {
                        format!("STALE ({})", src["error"].as_str().unwrap_or_default())
                    } else {
                        "ok".into()
                    }
                ));
            }
            Ok(out)
        }
        Verb::SetState {
            service,
            cluster,
            state,
        } => {
            let state: State = state.parse().map_err(Error::Usage)?;
            let v = c
                .call(
                    M::PUT,
                    &format!("/v1/services/{service}/clusters/{cluster}/state"),
                    Some(json!({"state": state})),
                )
                .await?;
            Ok(written(&v))
        }
        Verb::Whitelist { action } => {
            let (args, verb) = match action {
                WhitelistVerb::Add(a) => (a, "add"),
                WhitelistVerb::Remove(a) => (a, "remove"),
            };
            let ids = match &args.ids {
                Some(t) => parse_ids(t).map_err(|e| Error::Usage(format!("--ids: {e}")))?,
                None => IdList::default(),
            };
            let intervals = args
                .interval
                .iter()
                .map(|t| parse_interval(t).map_err(|e| Error::Usage(format!("--interval: {e}"))))
                .collect::<Result<Vec<_>, _>>()?;
            let mut body = json!({"ids": ids, "intervals": intervals});
            if let Some(a) = args.all {
                body["all"] = json!(a);
            }
            let v = c
                .call(
                    M::POST,
                    &format!(
                        "/v1/services/{}/clusters/{}/whitelist/{verb}",
                        args.service, args.cluster
                    ),
                    Some(body),
                )
                .await?;
            Ok(written(&v))
        }
        Verb::Percent {
            service,
            cluster,
            value,
            by,
        } => {
            let percent = if value == "off" {
                Value::Null
            } else {
                let v: f64 = value
                    .trim_end_matches('%')
                    .parse()
                    .map_err(|_| Error::Usage(format!("{value:?} is not a percentage (or off)")))?;
                let by = match by.as_str() {
                    "request" => PercentBy::Request,
                    "tenant" => PercentBy::Tenant,
                    other => {
                        return Err(Error::Usage(format!("--by {other:?}: request or tenant")))
                    }
                };
                json!({"value": v, "by": by})
            };
            let v = c
                .call(
                    M::PUT,
                    &format!("/v1/services/{service}/clusters/{cluster}/percent"),
                    Some(json!({"percent": percent})),
                )
                .await?;
            Ok(written(&v))
        }
        Verb::Explain {
            service,
            tenant,
            cookie,
            header,
            caller_lane,
        } => {
            let body = json!({"tenant": tenant, "cookies": kv(&cookie, "cookie")?,
                "headers": kv(&header, "header")?, "caller_lane": caller_lane});
            let v = c
                .call(
                    M::POST,
                    &format!("/v1/services/{service}/explain"),
                    Some(body),
                )
                .await?;
            let d = &v["decision"];
            Ok(format!(
                "{service} (version {}): -> {} (Envoy cluster {}, lane {})\n  reason: {}\n  {}\n",
                v["version"],
                d["cluster"].as_str().unwrap_or("none"),
                d["envoy_cluster"].as_str().unwrap_or("none"),
                d["lane"].as_str().unwrap_or("-"),
                d["reason"].as_str().unwrap_or_default(),
                d["detail"].as_str().unwrap_or_default()
            ))
        }
        Verb::History { limit } => {
            let v = c
                .call(M::GET, &format!("/v1/history?limit={limit}"), None)
                .await?;
            let mut out = format!(
                "{:>8}  {:<10} {:<14} CHANGES\n",
                "VERSION", "WHEN", "AUTHOR"
            );
            for r in v["versions"].as_array().into_iter().flatten() {
                let changes: Vec<&str> = r["summary"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                out.push_str(&format!(
                    "{:>8}  {:<10} {:<14} {}\n",
                    r["version"],
                    ago(r["at"].as_u64().unwrap_or(0)),
                    r["author"].as_str().unwrap_or_default(),
                    changes.join("; ")
                ));
            }
            Ok(out)
        }
        Verb::Diff { from, to } => {
            let v = c
                .call(M::GET, &format!("/v1/diff?from={from}&to={to}"), None)
                .await?;
            let lines: Vec<&str> = v["changes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            Ok(if lines.is_empty() {
                format!("versions {from} and {to} are the same\n")
            } else {
                lines.iter().map(|l| format!("{l}\n")).collect()
            })
        }
        Verb::Revert { version } => {
            let v = c
                .call(M::POST, "/v1/revert", Some(json!({"version": version})))
                .await?;
            Ok(written(&v))
        }
        Verb::Operations { limit } => {
            let v = c
                .call(M::GET, &format!("/v1/operations?limit={limit}"), None)
                .await?;
            let mut out = format!(
                "{:<10} {:<14} {:>7} {:>7}  WHAT\n",
                "WHEN", "WHO", "BEFORE", "AFTER"
            );
            for o in v["operations"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "{:<10} {:<14} {:>7} {:>7}  {}\n",
                    ago(o["at"].as_u64().unwrap_or(0)),
                    o["who"].as_str().unwrap_or_default(),
                    o["version_before"],
                    o["version_after"]
                        .as_u64()
                        .map_or("-".into(), |v| v.to_string()),
                    o["what"].as_str().unwrap_or_default()
                ));
            }
            Ok(out)
        }
        Verb::SignCookie {
            service,
            tenant,
            ttl,
        } => {
            let v = c
                .call(M::GET, &format!("/v1/services/{service}"), None)
                .await?;
            let key = v["strategy"]["gray_cookie"]["key"]
                .as_str()
                .ok_or_else(|| {
                    Error::Usage(format!("service {service} has no signed gray_cookie key"))
                })?;
            let id = graylane_strategy::parse_id(tenant.as_bytes())
                .ok_or_else(|| Error::Usage(format!("{tenant:?} is not a valid tenant id")))?;
            let _: &Id = &id;
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            Ok(format!(
                "{}\n",
                graylane_strategy::cookie::sign(key.as_bytes(), &id, now + ttl)
            ))
        }
    }
}

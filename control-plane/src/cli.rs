//! The CLI verbs of `graylane`, talking to the admin API through the typed client.

use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use comfy_table::{presets, Table};
use graylane_strategy::id::IdList;
use graylane_strategy::{PercentBy, PercentSpec, State};

use crate::api::types::{ExplainRequest, PercentChange, WhitelistChange, Written};
use crate::client::{self, Client};
use crate::edit::{parse_ids, parse_interval, Edit};

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
    /// Bearer token (role read, write or issuer).
    #[arg(long, global = true, env = "GRAYLANE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM file of the CA that signed an `https://` server's certificate (`tls` in
    /// graylane.yaml), when no public CA did.
    #[arg(long, global = true, env = "GRAYLANE_CA_CERT")]
    pub ca_cert: Option<std::path::PathBuf>,
    /// Accept a version that leaves a service no cluster able to take default traffic.
    #[arg(long, global = true)]
    pub force: bool,
    /// Edits (set-state, whitelist, percent): make no version; start a preview of the edited
    /// strategy instead (see `graylane preview`).
    #[arg(long, global = true)]
    pub dry_run: bool,
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
    /// Release procedures: gray upgrade, switch, rollback (docs/releases.md).
    Release {
        #[command(subcommand)]
        verb: ReleaseVerb,
    },
    /// What the data plane saw for one service: per cluster over 10 s, 60 s and since start
    /// (requests, responses by class, latency), per Envoy node.
    Traffic { service: String },
    /// Every service and cluster, live: state, share of traffic, requests/s, 5xx, p99,
    /// healthy endpoints, filters current/total (Ctrl-C stops).
    Top {
        /// Print once and exit (for scripts and tests).
        #[arg(long)]
        once: bool,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 2)]
        interval: u64,
    },
    /// Dry run of a candidate strategy on live traffic: the filters evaluate it beside the live
    /// one (which keeps routing) and count what would move. `preview web --file c.yaml`
    /// starts one; `preview web` shows it; `preview web apply` makes it the next version;
    /// `preview web discard` drops it. Edit commands take `--dry-run` to preview an edit.
    Preview(PreviewArgs),
    /// Apply graylane.yaml again, merged with the API's edits; with --file-wins its values win
    /// the fields changed in both places (shown by `status`).
    Reload {
        #[arg(long)]
        file_wins: bool,
    },
    /// Versions, newest first.
    History {
        #[arg(long, default_value_t = 20)]
        limit: u64,
    },
    /// What changed between two versions.
    Diff { from: u64, to: u64 },
    /// Make a new version equal to an earlier one (with `--service`: only that service goes
    /// back to what it was then; the others stay as they are).
    Revert {
        version: u64,
        #[arg(long)]
        service: Option<String>,
    },
    /// The operation log.
    Operations {
        #[arg(long, default_value_t = 20)]
        limit: u64,
    },
    /// A tenant's gray cookie, as the auth service gets it (token of role issuer): signed
    /// `tenantGray=1...` if the tenant is in the service's gray whitelist, else `tenantGray=0`.
    GrayCookie { service: String, tenant: String },
    /// Make a new Ed25519 key pair for gray cookies: the private key for graylane.yaml's
    /// `cookie_keys` (printed, or written to --out with mode 0600), the public key as the
    /// strategy's `gray_cookie.keys` entry.
    Keygen {
        /// The key id cookies carry (letters, digits, '-', '_'); default k<YYYYMMDD>.
        #[arg(long)]
        id: Option<String>,
        /// Write the private key to this new file (mode 0600) instead of printing it.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Print the control plane's Kubernetes resources and the filter's WasmPlugin (for
    /// `kubectl apply -f -`).
    Install(Box<crate::install::Args>),
    /// Print configuration for another system: an nginx include file (docs/nginx.md), or Istio
    /// DestinationRules and VirtualServices routing by the filter's header (docs/istio.md).
    Render {
        #[command(subcommand)]
        target: crate::render::Target,
    },
}

#[derive(Debug, Subcommand)]
pub enum WhitelistVerb {
    Add(WhitelistArgs),
    Remove(WhitelistArgs),
}

#[derive(Debug, Subcommand)]
pub enum ReleaseVerb {
    /// Start a release: `gray-upgrade`, `switch`, `one-by-one` or `rollback` to the cluster
    /// `--to`.
    Start(Box<ReleaseStart>),
    /// Where a service's release is: steps, what it waits for, its log.
    Status {
        service: String,
    },
    /// Every service's current or last release.
    List,
    /// A service's past releases, newest first.
    History {
        service: String,
    },
    /// Let the release make its next step (with `approval` gates).
    Approve(ReleaseAct),
    Pause(ReleaseAct),
    Resume(ReleaseAct),
    /// Stop the release and restore the strategy from before it.
    Abort(ReleaseAct),
    /// The way back: while a release runs, as `abort`; after one succeeded, a `rollback`
    /// release to the cluster it replaced (kept R for this).
    Rollback(ReleaseAct),
}

#[derive(Debug, clap::Args)]
pub struct ReleaseStart {
    pub service: String,
    /// gray-upgrade, switch, one-by-one or rollback.
    pub procedure: String,
    /// The cluster to move to (rollback: the old cluster to bring back).
    #[arg(long)]
    pub to: String,
    /// The cluster serving now (default: the only G cluster).
    #[arg(long)]
    pub from: Option<String>,
    /// gray-upgrade: these tenants first (comma-separated ids).
    #[arg(long)]
    pub ids: Option<String>,
    /// gray-upgrade: shares in order, e.g. 1,5,25,50 (the default); `ids,1,5` says the
    /// `--ids` step comes first (it always does).
    #[arg(long)]
    pub steps: Option<String>,
    /// gray-upgrade: the shares are of tenants (the default: a tenant stays on one version) or
    /// of requests.
    #[arg(long, default_value = "tenant")]
    pub by: String,
    /// Seconds to wait after each step once every filter has it (default 0). Gates a release
    /// does not set come from the service's `releases:` defaults in graylane.yaml.
    #[arg(long)]
    pub bake: Option<u64>,
    /// Stop before each step until `release approve`.
    #[arg(long)]
    pub approval: bool,
    /// Healthy endpoints the new cluster needs before traffic (default: the stable one's).
    #[arg(long)]
    pub min_healthy: Option<usize>,
    /// Seconds every filter has to take each step before the release pauses (default 60).
    #[arg(long)]
    pub converge: Option<u64>,
    /// Swap without checking that the stable cluster's traffic has moved away (by default
    /// it must have had no request for 10 s, by the filters' traffic reports).
    #[arg(long)]
    pub no_drain_check: bool,
    /// Abort by itself when more than this share (%) of the new cluster's requests fail
    /// (5xx or no response) over the last 10 s of a step.
    #[arg(long)]
    pub max_error_percent: Option<f64>,
    /// Abort by itself when the new cluster's p99 latency over the last 10 s is above this
    /// many times the stable cluster's.
    #[arg(long)]
    pub max_p99_ratio: Option<f64>,
    /// Requests each cluster needs over the last 10 s before the latency gate judges (default
    /// 50).
    #[arg(long)]
    pub min_requests: Option<u64>,
    /// Seconds an instance driver's scale may take to show in the healthy counts before the
    /// release pauses (default 300).
    #[arg(long)]
    pub scale_timeout: Option<u64>,
    /// After each step that sends the new cluster traffic, wait until it has had at least this
    /// many requests over the last 10 s (by the filters' reports) before the next step.
    #[arg(long)]
    pub min_target_requests: Option<u64>,
    /// Why (kept in the logs).
    #[arg(long, default_value = "")]
    pub reason: String,
}

#[derive(Debug, clap::Args)]
pub struct PreviewArgs {
    pub service: String,
    /// show (default), apply or discard.
    pub action: Option<String>,
    /// Start a preview of this candidate strategy (YAML or JSON, as a service's strategy in
    /// graylane.yaml).
    #[arg(long)]
    pub file: Option<std::path::PathBuf>,
    /// Evaluate one request in this many (1: every request).
    #[arg(long, default_value_t = 1)]
    pub every: u32,
    /// Seconds until the preview ends by itself.
    #[arg(long, default_value_t = crate::preview::DEFAULT_EXPIRES_SECS)]
    pub expires: u64,
    /// Why (kept in the logs).
    #[arg(long, default_value = "")]
    pub why: String,
    /// Wait this many seconds, then show what the filters counted.
    #[arg(long)]
    pub wait: Option<u64>,
}

#[derive(Debug, clap::Args)]
pub struct ReleaseAct {
    pub service: String,
    /// Why (kept in the logs).
    #[arg(long, default_value = "")]
    pub why: String,
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
    #[error(transparent)]
    Api(#[from] client::Error),
    #[error(transparent)]
    Install(#[from] crate::install::Error),
    #[error(transparent)]
    Render(#[from] crate::render::istio::Error),
}

fn kv(list: &[String], what: &str) -> Result<std::collections::BTreeMap<String, String>, Error> {
    list.iter()
        .map(|item| {
            item.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| Error::Usage(format!("--{what} {item:?}: expected name=value")))
        })
        .collect()
}

fn written(w: &Written) -> String {
    let mut s = if w.changed {
        format!("version {}", w.version)
    } else {
        format!("no change (version {})", w.version)
    };
    for line in &w.summary {
        s.push_str(&format!("\n  {line}"));
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

/// A plain table (no borders), as `kubectl get` prints.
pub(crate) fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING);
    t.set_header(header.iter().copied());
    t
}

pub(crate) fn lines(t: &Table) -> String {
    let mut out: String = t.lines().map(|l| format!("{}\n", l.trim_end())).collect();
    if out.is_empty() {
        out.push('\n');
    }
    out
}

async fn release(c: &Client, verb: ReleaseVerb) -> Result<String, Error> {
    use crate::release::{Action, GatesSpec, Procedure, Start};
    let act = |a: ReleaseAct, action: Action| async move {
        Ok(release_view(
            &c.release_action(&a.service, action, &a.why).await?,
            false,
        ))
    };
    match verb {
        ReleaseVerb::Start(a) => {
            let procedure = match a.procedure.as_str() {
                "gray-upgrade" => Procedure::GrayUpgrade,
                "switch" => Procedure::Switch,
                "one-by-one" => Procedure::OneByOne,
                "rollback" => Procedure::Rollback,
                other => {
                    return Err(Error::Usage(format!(
                        "procedure {other:?}: gray-upgrade, switch, one-by-one or rollback"
                    )))
                }
            };
            let ids = match &a.ids {
                Some(t) => Some(parse_ids(t).map_err(|e| Error::Usage(format!("--ids: {e}")))?),
                None => None,
            };
            let percents = match &a.steps {
                Some(t) => Some(
                    t.split(',')
                        .enumerate()
                        .filter(|(i, p)| !(*i == 0 && p.trim() == "ids"))
                        .map(|(_, p)| {
                            p.trim().trim_end_matches('%').parse::<f64>().map_err(|_| {
                                Error::Usage(format!("--steps: {p:?} is not a percentage"))
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                ),
                None => None,
            };
            if a.steps.as_deref().is_some_and(|t| t.starts_with("ids")) && ids.is_none() {
                return Err(Error::Usage(
                    "--steps ids,...: the ids step needs --ids (the tenants to send first)".into(),
                ));
            }
            let by = match a.by.as_str() {
                "tenant" => PercentBy::Tenant,
                "request" => PercentBy::Request,
                other => return Err(Error::Usage(format!("--by {other:?}: tenant or request"))),
            };
            let start = Start {
                procedure,
                to: a.to,
                from: a.from,
                ids,
                intervals: Vec::new(),
                percents,
                by: Some(by),
                gates: GatesSpec {
                    converge_secs: a.converge,
                    bake_secs: a.bake,
                    approval: a.approval.then_some(true),
                    min_healthy: a.min_healthy,
                    drained: a.no_drain_check.then_some(false),
                    max_error_percent: a.max_error_percent,
                    max_p99_ratio: a.max_p99_ratio,
                    min_requests: a.min_requests,
                    scale_secs: a.scale_timeout,
                    min_target_requests: a.min_target_requests,
                },
                reason: a.reason,
            };
            Ok(release_view(
                &c.start_release(&a.service, &start).await?,
                false,
            ))
        }
        ReleaseVerb::Status { service } => Ok(release_view(&c.release(&service).await?, true)),
        ReleaseVerb::List => {
            let v = c.releases().await?;
            let mut t = table(&["SERVICE", "ID", "PROCEDURE", "FROM", "TO", "STEP", "STATE"]);
            for r in &v.releases {
                t.add_row(vec![
                    r.service.clone(),
                    r.id.to_string(),
                    r.procedure.to_string(),
                    r.stable.clone(),
                    r.target.clone(),
                    format!("{}/{}", r.at.min(r.steps.len()), r.steps.len()),
                    state_word(&r.status),
                ]);
            }
            Ok(lines(&t))
        }
        ReleaseVerb::History { service } => {
            let v = c.release_history(&service).await?;
            let mut t = table(&[
                "ID",
                "STARTED",
                "PROCEDURE",
                "FROM",
                "TO",
                "STEP",
                "STATE",
                "BY",
                "WHY",
            ]);
            for r in &v.releases {
                t.add_row(vec![
                    r.id.to_string(),
                    ago(r.started_at / 1000),
                    r.procedure.to_string(),
                    r.stable.clone(),
                    r.target.clone(),
                    format!("{}/{}", r.at.min(r.steps.len()), r.steps.len()),
                    state_word(&r.status),
                    r.started_by.clone(),
                    r.reason.clone(),
                ]);
            }
            Ok(lines(&t))
        }
        ReleaseVerb::Approve(a) => act(a, Action::Approve).await,
        ReleaseVerb::Pause(a) => act(a, Action::Pause).await,
        ReleaseVerb::Resume(a) => act(a, Action::Resume).await,
        ReleaseVerb::Abort(a) => act(a, Action::Abort).await,
        ReleaseVerb::Rollback(a) => act(a, Action::Rollback).await,
    }
}

/// Fields changed in the file and through the API, as `status` and `reload` print them.
fn conflicts(list: &[crate::merge::Conflict]) -> String {
    let mut out = String::new();
    for k in list {
        out.push_str(&format!(
            "CONFLICT {}: the file says {}, the API set {} (kept; `graylane reload --file-wins` takes the file's)\n",
            k.field, k.file, k.live
        ));
    }
    out
}

/// `--dry-run` of an edit: a preview of the edited strategy.
async fn dry_run(c: &Client, service: &str, edit: Edit) -> Result<String, Error> {
    let start = crate::preview::Start {
        edit: Some(edit),
        ..crate::preview::Start::default()
    };
    let v = c.start_preview(service, &start).await?;
    Ok(preview_view(&v))
}

async fn preview(c: &Client, a: PreviewArgs) -> Result<String, Error> {
    let service = a.service.clone();
    let mut out = String::new();
    match (a.action.as_deref(), &a.file) {
        (None | Some("start"), Some(path)) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Error::Usage(format!("--file {}: {e}", path.display())))?;
            let strategy = graylane_strategy::parse_yaml(&text)
                .map_err(|e| Error::Usage(format!("{}: {e}", path.display())))?;
            let start = crate::preview::Start {
                strategy: Some(strategy),
                every: Some(a.every),
                expires_secs: Some(a.expires),
                why: a.why,
                ..crate::preview::Start::default()
            };
            let v = c.start_preview(&service, &start).await?;
            if a.wait.is_none() {
                return Ok(preview_view(&v));
            }
            out.push_str(&format!("preview {} of {service} started\n", v.id));
        }
        (None | Some("show"), None) => {}
        (Some("apply"), None) => {
            let applied = c.apply_preview(&service).await?;
            return Ok(format!(
                "{}{}",
                preview_view(&applied.preview),
                written(&applied.written)
            ));
        }
        (Some("discard"), None) => return Ok(preview_view(&c.discard_preview(&service).await?)),
        (Some(other), _) => {
            return Err(Error::Usage(format!(
                "preview {service} {other}: show, apply or discard (start with --file)"
            )))
        }
    }
    if let Some(secs) = a.wait {
        tokio::time::sleep(std::time::Duration::from_secs(secs)).await;
    }
    out.push_str(&preview_view(&c.preview(&service).await?));
    Ok(out)
}

/// A preview as `graylane preview` prints it.
fn preview_view(v: &crate::preview::View) -> String {
    let status = crate::writer::preview_status_word(&v.status);
    let mut out = format!(
        "preview {} of {} (from version {}): {status}, started by {} {}\n",
        v.id,
        v.service,
        v.base_version,
        v.who,
        ago(v.created_at)
    );
    if v.base_version != v.live_version && v.status == crate::preview::Status::Running {
        out.push_str(&format!(
            "the live strategy has moved to version {} since: apply would undo that change\n",
            v.live_version
        ));
    }
    out.push_str("changes:\n");
    for c in &v.changes {
        out.push_str(&format!("  {c}\n"));
    }
    out.push_str(&format!("{}\n", v.summary));
    if !v.pairs.is_empty() {
        let mut t = table(&["FROM", "TO", "REQUESTS", "TENANTS", "EXAMPLES"]);
        for p in &v.pairs {
            let moves = p.from != p.to;
            let tenants = match (moves, p.tenants_exact) {
                (false, _) => "-".to_string(),
                (true, true) => p.tenants.to_string(),
                (true, false) => format!("~{}", p.tenants),
            };
            t.add_row(vec![
                p.from.clone().unwrap_or_else(|| "(503)".into()),
                p.to.clone().unwrap_or_else(|| "(503)".into()),
                p.requests.to_string(),
                tenants,
                p.examples.join(","),
            ]);
        }
        out.push_str(&lines(&t));
    }
    if v.status == crate::preview::Status::Running {
        out.push_str(&format!(
            "nodes reporting: {}; then `graylane preview {s} apply` or `graylane preview {s} \
             discard`\n",
            v.nodes,
            s = v.service
        ));
    }
    out
}

fn state_word(s: &crate::release::Status) -> String {
    use crate::release::Status;
    match s {
        Status::Running => "running".into(),
        Status::Paused { why } => format!("paused: {why}"),
        Status::Succeeded => "succeeded".into(),
        Status::Aborted { why, .. } => format!("aborted: {why}"),
    }
}

/// A release as `release status` prints it: the plan with a marker at the current step, what
/// it waits for, each gate holding it with what it measures, and (`with_log`) its log; the
/// actions print it without the log.
fn release_view(r: &crate::release::Release, with_log: bool) -> String {
    let mut out = format!(
        "release {} of {}: {} from {} to {} ({})\n",
        r.id,
        r.service,
        r.procedure,
        r.stable,
        r.target,
        state_word(&r.status)
    );
    if !r.waiting.is_empty() {
        out.push_str(&format!("waiting: {}\n", r.waiting));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    for g in &r.gates_now {
        out.push_str(&format!("gate: {}\n", g.describe(now)));
    }
    let mut t = table(&["", "STEP", "WHAT"]);
    for (i, step) in r.steps.iter().enumerate() {
        let mark = match i.cmp(&r.at) {
            std::cmp::Ordering::Less => "done",
            std::cmp::Ordering::Equal if r.status.is_active() => "->",
            _ => "",
        };
        t.add_row(vec![
            mark.to_string(),
            (i + 1).to_string(),
            step.describe(&r.target, &r.stable),
        ]);
    }
    out.push_str(&lines(&t));
    if !with_log {
        return out;
    }
    out.push_str("log:\n");
    for l in &r.log {
        out.push_str(&format!("  {} {}\n", ago(l.at / 1000), l.text));
    }
    out
}

fn parse_state(s: &str) -> Result<State, Error> {
    s.parse().map_err(Error::Usage)
}

fn parse_percent(value: &str, by: &str) -> Result<Option<PercentSpec>, Error> {
    if value == "off" {
        return Ok(None);
    }
    let v: f64 = value
        .trim_end_matches('%')
        .parse()
        .map_err(|_| Error::Usage(format!("{value:?} is not a percentage (or off)")))?;
    let by = match by {
        "request" => PercentBy::Request,
        "tenant" => PercentBy::Tenant,
        other => return Err(Error::Usage(format!("--by {other:?}: request or tenant"))),
    };
    Ok(Some(PercentSpec {
        value: v,
        by,
        salt: 0,
    }))
}

/// One frame of `graylane top`.
async fn top_once(c: &Client) -> Result<String, Error> {
    let list = c.services().await?;
    let mut rows = Vec::new();
    for s in list.services {
        let t = c.traffic(&s.name).await?;
        rows.push((s, t));
    }
    Ok(crate::top::top(&rows))
}

/// Runs one verb (not `serve`); returns what to print.
pub async fn run(cli: Cli) -> Result<String, Error> {
    let ca = match &cli.ca_cert {
        Some(p) => Some(
            std::fs::read(p)
                .map_err(|e| Error::Usage(format!("--ca-cert {}: {e}", p.display())))?,
        ),
        None => None,
    };
    let c = Client::with_ca(&cli.server, cli.token.clone(), ca.as_deref())?.forced(cli.force);
    match cli.command {
        Verb::Serve { .. } => Err(Error::Usage("serve is not a client verb".into())),
        Verb::Render {
            target: crate::render::Target::Nginx(args),
        } => crate::render::nginx::render(&args).map_err(|e| Error::Usage(e.to_string())),
        Verb::Status => {
            let v = c.status().await?;
            let mut out = format!("version {}\n", v.version);
            if let Some(e) = &v.config_error {
                out.push_str(&format!("CONFIG ERROR (running version kept): {e}\n"));
            }
            out.push_str(&conflicts(&v.config_conflicts));
            let mut t = table(&[
                "SERVICE",
                "CLUSTER",
                "ENVOY CLUSTER",
                "STATE",
                "WEIGHT",
                "IDS",
                "INTERVALS",
                "ALL",
                "PERCENT",
                "HEALTHY",
            ]);
            for s in &v.services {
                for cl in &s.clusters {
                    t.add_row(vec![
                        s.name.clone(),
                        cl.key.clone(),
                        cl.envoy_cluster.clone(),
                        cl.status.to_string(),
                        cl.weight.to_string(),
                        cl.ids.to_string(),
                        cl.intervals.to_string(),
                        cl.all.to_string(),
                        cl.percent
                            .as_ref()
                            .map_or("-".to_string(), |p| format!("{}%", p.value)),
                        cl.healthy.map_or("?".to_string(), |h| h.to_string()),
                    ]);
                }
            }
            out.push_str(&lines(&t));
            for (k, src) in &v.sources {
                let state = match (src.stale, src.synced) {
                    (true, _) => format!("STALE ({})", src.error.as_deref().unwrap_or_default()),
                    (false, false) => "syncing".to_string(),
                    (false, true) => "ok".to_string(),
                };
                out.push_str(&format!("discovery {k}: {state}\n"));
            }
            for r in v.istio.iter().flatten() {
                let applied = r
                    .applied_version
                    .map_or("none yet".to_string(), |a| format!("version {a}"));
                let state = match &r.error {
                    Some(e) => format!("FAILING ({} failures; retrying): {e}", r.failures),
                    None if r.applied_version == Some(r.version) => "in step".to_string(),
                    None => "applying".to_string(),
                };
                out.push_str(&format!(
                    "istio routes {}: version {}, applied {applied}, {} objects sent: {state}\n",
                    r.service, r.version, r.objects_applied
                ));
            }
            Ok(out)
        }
        Verb::SetState {
            service,
            cluster,
            state,
        } if cli.dry_run => {
            let edit = Edit::SetState {
                cluster,
                state: parse_state(&state)?,
            };
            dry_run(&c, &service, edit).await
        }
        Verb::SetState {
            service,
            cluster,
            state,
        } => {
            let w = c
                .set_state(&service, &cluster, parse_state(&state)?)
                .await?;
            Ok(written(&w))
        }
        Verb::Whitelist { action } => {
            let (args, add) = match action {
                WhitelistVerb::Add(a) => (a, true),
                WhitelistVerb::Remove(a) => (a, false),
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
            if cli.dry_run {
                let edit = Edit::Whitelist {
                    cluster: args.cluster,
                    add,
                    ids,
                    intervals,
                    all: args.all,
                };
                return dry_run(&c, &args.service, edit).await;
            }
            let change = WhitelistChange {
                ids,
                intervals,
                all: args.all,
            };
            let w = c
                .whitelist(&args.service, &args.cluster, add, &change)
                .await?;
            Ok(written(&w))
        }
        Verb::Percent {
            service,
            cluster,
            value,
            by,
        } => {
            let percent = parse_percent(&value, &by)?;
            if cli.dry_run {
                let edit = Edit::SetPercent { cluster, percent };
                return dry_run(&c, &service, edit).await;
            }
            let change = PercentChange { percent };
            Ok(written(&c.set_percent(&service, &cluster, &change).await?))
        }
        Verb::Explain {
            service,
            tenant,
            cookie,
            header,
            caller_lane,
        } => {
            let caller_lane = caller_lane
                .map(|l| match l.as_str() {
                    "gray" | "grey" => Ok(graylane_strategy::Lane::Gray),
                    "prod" => Ok(graylane_strategy::Lane::Prod),
                    other => Err(Error::Usage(format!(
                        "--caller-lane {other:?}: gray or prod"
                    ))),
                })
                .transpose()?;
            let req = ExplainRequest {
                tenant,
                cookies: kv(&cookie, "cookie")?,
                headers: kv(&header, "header")?,
                caller_lane,
                draw: 0,
            };
            let v = c.explain(&service, &req).await?;
            let d = &v.decision;
            Ok(format!(
                "{service} (version {}): -> {} (Envoy cluster {}, lane {})\n  reason: {}\n  {}\n",
                v.version,
                d.cluster.as_deref().unwrap_or("none"),
                d.envoy_cluster.as_deref().unwrap_or("none"),
                d.lane.map_or("-", |l| l.as_str()),
                d.reason,
                d.detail
            ))
        }
        Verb::History { limit } => {
            let v = c.history(limit).await?;
            let mut t = table(&["VERSION", "WHEN", "AUTHOR", "CHANGES"]);
            for r in &v.versions {
                t.add_row(vec![
                    r.version.to_string(),
                    ago(r.at),
                    r.author.clone(),
                    r.summary.join("; "),
                ]);
            }
            Ok(lines(&t))
        }
        Verb::Diff { from, to } => {
            let v = c.diff(from, to).await?;
            Ok(if v.changes.is_empty() {
                format!("versions {from} and {to} are the same\n")
            } else {
                v.changes.iter().map(|l| format!("{l}\n")).collect()
            })
        }
        Verb::Traffic { service } => {
            let (summary, t) = (
                c.service_summary(&service).await?,
                c.traffic(&service).await?,
            );
            Ok(crate::top::traffic(&summary, &t))
        }
        Verb::Top { once, interval } => {
            if once {
                return top_once(&c).await;
            }
            loop {
                let text = top_once(&c).await?;
                // Clear the screen and draw again, as top(1) does.
                print!("\x1b[2J\x1b[H{text}");
                let _ = std::io::Write::flush(&mut std::io::stdout());
                tokio::time::sleep(std::time::Duration::from_secs(interval.max(1))).await;
            }
        }
        Verb::Revert { version, service } => Ok(written(&c.revert(version, service).await?)),
        Verb::Reload { file_wins } => {
            let r = c.reload(file_wins).await?;
            let mut out = written(&r.written);
            if file_wins {
                for k in &r.conflicts {
                    out.push_str(&format!(
                        "the file's value taken: {}: {}\n",
                        k.field, k.file
                    ));
                }
            } else {
                out.push_str(&conflicts(&r.conflicts));
            }
            Ok(out)
        }
        Verb::Preview(a) => preview(&c, a).await,
        Verb::Release { verb } => release(&c, verb).await,
        Verb::Operations { limit } => {
            let v = c.operations(limit).await?;
            let mut t = table(&["WHEN", "WHO", "BEFORE", "AFTER", "WHAT"]);
            for o in &v.operations {
                t.add_row(vec![
                    ago(o.at),
                    o.who.clone(),
                    o.version_before.to_string(),
                    o.version_after.map_or("-".into(), |v| v.to_string()),
                    o.what.clone(),
                ]);
            }
            Ok(lines(&t))
        }
        Verb::Install(args) => Ok(crate::install::run(*args, &mut random_token)?),
        Verb::Render {
            target: crate::render::Target::Istio(args),
        } => {
            let mut file = None;
            let specs = match &args.config {
                Some(path) => {
                    let cfg = crate::config::Config::load(path)
                        .map_err(|e| Error::Usage(e.to_string()))?;
                    file = Some(cfg.istio);
                    cfg.services
                        .into_iter()
                        .map(|(name, s)| (name, s.strategy))
                        .collect()
                }
                None => {
                    let names: Vec<String> = if args.services.is_empty() {
                        c.services()
                            .await?
                            .services
                            .into_iter()
                            .map(|s| s.name)
                            .collect()
                    } else {
                        args.services.clone()
                    };
                    let mut specs = std::collections::BTreeMap::new();
                    for name in names {
                        let strategy = c.service(&name).await?.strategy;
                        specs.insert(name, strategy);
                    }
                    specs
                }
            };
            Ok(crate::render::istio::run(&args, &specs, file.as_ref())?)
        }
        Verb::GrayCookie { service, tenant } => {
            let g = c.gray_cookie(&service, &tenant).await?;
            let why = match (&g.cluster, &g.reason, &g.key_id) {
                (Some(cluster), Some(reason), Some(key)) => format!(
                    "tenant {} is gray (cluster {cluster}, rule {reason}); signed with key {key}; \
                     expires in {}s",
                    g.tenant, g.max_age
                ),
                _ => format!("tenant {} is not in gray", g.tenant),
            };
            Ok(format!(
                "{}={}\n# {why}\n# Set-Cookie: {}\n",
                g.name, g.value, g.set_cookie
            ))
        }
        Verb::Keygen { id, out } => keygen(id, out.as_deref()),
    }
}

/// `graylane keygen`: a new key pair, as the two snippets to paste.
fn keygen(id: Option<String>, out: Option<&std::path::Path>) -> Result<String, Error> {
    let id = id.unwrap_or_else(|| {
        let days = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() / 86_400);
        let (y, m, d) = civil(days);
        format!("k{y:04}{m:02}{d:02}")
    });
    if !graylane_strategy::name::key_id(&id) {
        return Err(Error::Usage(format!(
            "--id {id:?}: letters, digits, '-' or '_' (at most 32)"
        )));
    }
    let key = crate::cookie::PrivateKey::generate(&id).map_err(Error::Usage)?;
    let private = match out {
        Some(path) => {
            write_private(path, &key.private_key_text())
                .map_err(|e| Error::Usage(format!("--out {}: {e}", path.display())))?;
            // Absolute: graylane.yaml reads relative paths from its own directory.
            let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
            format!("  - {{id: {id}, private_key_file: {}}}", path.display())
        }
        None => format!(
            "  - {{id: {id}, private_key: \"{}\"}}",
            &*key.private_key_text()
        ),
    };
    Ok(format!(
        "# graylane.yaml of the control plane only (a secret: never in a strategy):\n\
         cookie_keys:\n{private}\n\
         # the strategy of each service whose filters check signed cookies (public):\n\
         gray_cookie:\n  mode: signed\n  keys:\n    - {{id: {id}, public_key: \"{}\"}}\n",
        key.public_key()
    ))
}

/// Writes a private key to a new file only its owner can read.
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(format!("{text}\n").as_bytes())?;
    f.sync_all()
}

/// The civil date (year, month, day) of a day count since 1970-01-01 (H. Hinnant's
/// `civil_from_days`).
fn civil(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// 32 random bytes as hex, for tokens `graylane install` generates.
fn random_token() -> Option<String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).ok()?;
    Some(b.iter().map(|x| format!("{x:02x}")).collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(19_723), (2024, 1, 1));
        assert_eq!(civil(20_424), (2025, 12, 2));
    }

    #[test]
    fn keygen_prints_a_pair_that_loads() {
        let out = keygen(Some("k1".into()), None).unwrap();
        let (private, public) = out.split_once("gray_cookie:").unwrap();
        let cfg: serde_json::Value = serde_saphyr::from_str(private).unwrap();
        let strategy: serde_json::Value =
            serde_saphyr::from_str(&format!("gray_cookie:{public}")).unwrap();
        let specs: Vec<crate::cookie::KeySpec> =
            serde_json::from_value(cfg["cookie_keys"].clone()).unwrap();
        let keys = crate::cookie::Keys::load(&specs, std::path::Path::new(".")).unwrap();
        assert_eq!(keys.ids(), ["k1"]);
        let listed = strategy["gray_cookie"]["keys"][0]["public_key"]
            .as_str()
            .unwrap();
        assert!(!private.contains(listed) && public.contains(listed));
        let dir = std::env::temp_dir().join(format!("graylane-keygen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("k2.key");
        let out = keygen(Some("k2".into()), Some(&file)).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let secret = std::fs::read_to_string(&file).unwrap();
        assert!(
            !out.contains(secret.trim()),
            "the private key stays in the file"
        );
        assert!(
            keygen(Some("k2".into()), Some(&file)).is_err(),
            "never overwrites"
        );
        assert!(keygen(Some("k.2".into()), None).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

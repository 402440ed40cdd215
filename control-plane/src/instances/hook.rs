//! The hooks driver: commands an operator gives per cluster (`up`, `down`, `scale`), run by
//! the daemon as argv (no shell, so a cluster name is never interpreted), with a timeout;
//! the tail of what they print goes to the release log. The release then waits for the
//! registry (Consul) to show the instances healthy. Serves VMs, Nomad, anything.

use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::discovery::HumanDuration;

/// A hook that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{program}: cannot start: {source}")]
    Start {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program}: no answer within {secs} s (killed)")]
    Timeout { program: String, secs: u64 },
    #[error("{program}: {status}: {tail}")]
    Failed {
        program: String,
        status: String,
        tail: String,
    },
    #[error("{what}: needs `scale`, or `up`/`down` and a known instance count")]
    Cannot { what: String },
}

/// The hooks of one cluster. Each is an argv whose words may hold `{service}`, `{cluster}`
/// and `{n}` (the instance count wanted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, try_from = "RawHooks", into = "RawHooks")]
pub struct Hooks {
    pub up: Option<Argv>,
    pub down: Option<Argv>,
    pub scale: Option<Argv>,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHooks {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    up: Option<Argv>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    down: Option<Argv>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scale: Option<Argv>,
    #[serde(default)]
    timeout: Option<HumanDuration>,
}

/// How long a hook may run by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

impl TryFrom<RawHooks> for Hooks {
    type Error = String;
    fn try_from(r: RawHooks) -> Result<Self, String> {
        if r.scale.is_none() && (r.up.is_none() || r.down.is_none()) {
            return Err("hooks need `scale`, or both `up` and `down`".into());
        }
        let timeout = r.timeout.map_or(DEFAULT_TIMEOUT, |d| d.0);
        if timeout.is_zero() || timeout > Duration::from_secs(3600) {
            return Err("timeout: between 1ms and 1h".into());
        }
        Ok(Hooks {
            up: r.up,
            down: r.down,
            scale: r.scale,
            timeout,
        })
    }
}

impl From<Hooks> for RawHooks {
    fn from(h: Hooks) -> Self {
        RawHooks {
            up: h.up,
            down: h.down,
            scale: h.scale,
            timeout: Some(HumanDuration(h.timeout)),
        }
    }
}

/// A command as argv: an absolute program path, then arguments; the only placeholders are
/// `{service}`, `{cluster}` and `{n}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct Argv(Vec<String>);

impl TryFrom<Vec<String>> for Argv {
    type Error = String;
    fn try_from(v: Vec<String>) -> Result<Self, String> {
        let Some(program) = v.first() else {
            return Err("an empty command: [program, args...]".into());
        };
        if !program.starts_with('/') {
            return Err(format!(
                "{program:?}: the program by its absolute path (the daemon's PATH is not yours)"
            ));
        }
        for word in &v {
            let mut rest = word.as_str();
            while let Some(open) = rest.find('{') {
                let after = rest.get(open + 1..).unwrap_or("");
                let Some(close) = after.find('}') else {
                    return Err(format!("{word:?}: an unclosed {{"));
                };
                let name = after.get(..close).unwrap_or("");
                if !matches!(name, "service" | "cluster" | "n") {
                    return Err(format!(
                        "{word:?}: unknown placeholder {{{name}}} (known: {{service}}, {{cluster}}, {{n}})"
                    ));
                }
                rest = after.get(close + 1..).unwrap_or("");
            }
        }
        Ok(Argv(v))
    }
}

impl From<Argv> for Vec<String> {
    fn from(a: Argv) -> Self {
        a.0
    }
}

impl Argv {
    fn render(&self, service: &str, cluster: &str, n: u32) -> Vec<String> {
        self.0
            .iter()
            .map(|w| {
                w.replace("{service}", service)
                    .replace("{cluster}", cluster)
                    .replace("{n}", &n.to_string())
            })
            .collect()
    }
}

/// What a hook printed is kept up to this many bytes (its end) in the release log.
const TAIL_BYTES: usize = 400;

/// Runs what it takes to have `to` instances: `scale {n}` when given, else `up` or `down`
/// once per instance to add or remove (from `current`).
pub async fn run(
    h: &Hooks,
    service: &str,
    cluster: &str,
    current: Option<u32>,
    to: u32,
) -> Result<String, Error> {
    if let Some(scale) = &h.scale {
        return exec(&scale.render(service, cluster, to), h.timeout).await;
    }
    let cannot = || Error::Cannot {
        what: format!("{service}/{cluster} to {to} instances"),
    };
    let now = current.ok_or_else(cannot)?;
    let (argv, times) = if to >= now {
        (h.up.as_ref().ok_or_else(cannot)?, to - now)
    } else {
        (h.down.as_ref().ok_or_else(cannot)?, now - to)
    };
    let mut out = Vec::new();
    let mut n = now;
    for _ in 0..times {
        n = if to >= now { n + 1 } else { n - 1 };
        out.push(exec(&argv.render(service, cluster, n), h.timeout).await?);
    }
    Ok(tail(out.join("\n").as_bytes()))
}

/// Runs one argv with a timeout (killed past it); `Ok` with the tail of stdout and stderr
/// when it exits 0.
async fn exec(argv: &[String], timeout: Duration) -> Result<String, Error> {
    let program = argv.first().cloned().unwrap_or_default();
    let child = tokio::process::Command::new(&program)
        .args(argv.get(1..).unwrap_or(&[]))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| Error::Start {
            program: program.clone(),
            source,
        })?;
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(source)) => return Err(Error::Start { program, source }),
        Err(_) => {
            return Err(Error::Timeout {
                program,
                secs: timeout.as_secs(),
            })
        }
    };
    let mut all = out.stdout;
    all.extend_from_slice(&out.stderr);
    let tail = tail(&all);
    if out.status.success() {
        Ok(tail)
    } else {
        Err(Error::Failed {
            program,
            status: out.status.to_string(),
            tail,
        })
    }
}

fn tail(bytes: &[u8]) -> String {
    let from = bytes.len().saturating_sub(TAIL_BYTES);
    let text = String::from_utf8_lossy(bytes.get(from..).unwrap_or(&[]));
    text.trim().replace('\n', " | ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn hooks(yaml: &str) -> Result<Hooks, String> {
        graylane_strategy::spec::parse_yaml_as::<Hooks>(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn hooks_hold_only_valid_commands() {
        let h = hooks("{scale: ['/bin/echo', '{service}', '{cluster}', 'n={n}'], timeout: 5s}")
            .unwrap();
        assert_eq!(
            h.scale.unwrap().render("web", "B", 3),
            ["/bin/echo", "web", "B", "n=3"]
        );
        assert!(hooks("{up: ['/bin/true']}")
            .unwrap_err()
            .contains("both `up` and `down`"));
        assert!(hooks("{scale: []}").unwrap_err().contains("empty command"));
        assert!(hooks("{scale: ['scale.sh']}")
            .unwrap_err()
            .contains("absolute path"));
        assert!(hooks("{scale: ['/bin/x', '{count}']}")
            .unwrap_err()
            .contains("unknown placeholder {count}"));
        assert!(hooks("{scale: ['/bin/x'], shell: true}").is_err());
    }

    #[tokio::test]
    async fn a_hook_runs_as_argv_and_its_failures_say_why() {
        let h = hooks(
            "{scale: ['/bin/sh', '-c', 'echo scaled {cluster} to $0; echo warn >&2', '{n}']}",
        )
        .unwrap();
        assert_eq!(
            run(&h, "web", "B", None, 4).await.unwrap(),
            "scaled B to 4 | warn"
        );
        let h = hooks("{up: ['/bin/sh', '-c', 'echo up $0', '{n}'], down: ['/bin/sh', '-c', 'echo down $0', '{n}']}").unwrap();
        assert_eq!(
            run(&h, "web", "B", Some(1), 3).await.unwrap(),
            "up 2 | up 3"
        );
        assert_eq!(
            run(&h, "web", "B", Some(2), 0).await.unwrap(),
            "down 1 | down 0"
        );
        assert!(matches!(
            run(&h, "web", "B", None, 3).await,
            Err(Error::Cannot { .. })
        ));
        let h = hooks("{scale: ['/bin/sh', '-c', 'echo no capacity; exit 3']}").unwrap();
        let e = run(&h, "web", "B", None, 1).await.unwrap_err().to_string();
        assert!(
            e.contains("exit status: 3") && e.contains("no capacity"),
            "{e}"
        );
        let h = hooks("{scale: ['/bin/sleep', '5'], timeout: 100ms}").unwrap();
        let e = run(&h, "web", "B", None, 1).await.unwrap_err().to_string();
        assert!(e.contains("no answer within"), "{e}");
        let h = hooks("{scale: ['/nonexistent/scale']}").unwrap();
        assert!(matches!(
            run(&h, "web", "B", None, 1).await,
            Err(Error::Start { .. })
        ));
    }
}

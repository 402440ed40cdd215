//! The writer's side of the release procedures: it starts releases, takes operators' actions,
//! and advances every running release after each command, discovery event and wake-up. The
//! decisions are the pure state machine's (`crate::release`); here they meet the store (each
//! change of a release is saved before its effect runs) and the writer's own `commit`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use super::{blocking, Error, Scope, Writer};
use crate::release::{Action, Effect, Observed, Release, Start};

/// The versions held by the live filters of a service (one per filter), as the feed saw them.
pub type Followers = Arc<dyn Fn(&str) -> Vec<u64> + Send + Sync>;

/// What the filters of a service reported they saw, its clusters first (the drain and error
/// gates).
pub type Seen = Arc<dyn Fn(&str, &[String]) -> crate::api::types::Traffic + Send + Sync>;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl From<crate::release::Error> for Error {
    fn from(e: crate::release::Error) -> Self {
        Error::Invalid {
            field: e.field,
            message: e.message,
        }
    }
}

impl Writer {
    /// Where the convergence gate learns which versions the filters hold.
    pub fn set_followers(&mut self, followers: Followers) {
        self.followers = Some(followers);
    }

    /// Where the drain and error gates learn what the data plane saw.
    pub fn set_traffic(&mut self, seen: Seen) {
        self.seen = Some(seen);
    }

    /// Who starts and stops instances for the releases.
    pub fn set_instances(&mut self, driver: Arc<dyn crate::instances::Driver>) {
        self.instances = Some(driver);
    }

    /// An instance driver answered: the release that asked takes the answer (if it is still
    /// the service's release and still waits for it).
    pub(super) async fn scaled(&mut self, done: Scaled) {
        let Some(r) = self.releases.get_mut(&done.service) else {
            return;
        };
        if r.id != done.release {
            return;
        }
        match &done.result {
            Ok(_) => {
                tracing::info!(release = r.id, cluster = %done.cluster, instances = done.instances, "instance driver done")
            }
            Err(e) => {
                tracing::warn!(release = r.id, cluster = %done.cluster, error = %e, "instance driver failed")
            }
        }
        r.scaled(done.result, now_ms());
        let r = r.clone();
        if let Err(e) = self.save(&r).await {
            tracing::error!(release = r.id, error = %e, "release not saved");
        }
        self.publish_releases();
        self.publish();
    }

    /// Takes the releases kept by the last run: each service's latest, running ones resumed
    /// where they were.
    pub(super) fn load_releases(&mut self, kept: Vec<Release>) {
        for r in kept {
            self.next_release = self.next_release.max(r.id + 1);
            self.releases.insert(r.service.clone(), r);
        }
        self.publish_releases();
    }

    fn publish_releases(&mut self) {
        self.snapshot.releases = Arc::new(
            self.releases
                .iter()
                .map(|(k, r)| (k.clone(), r.clone()))
                .collect(),
        );
    }

    async fn save(&self, r: &Release) -> Result<(), Error> {
        let (store, r) = (self.store.clone(), r.clone());
        blocking(move || {
            store
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .save_release(&r)
        })
        .await
    }

    pub(super) async fn start_release(
        &mut self,
        who: &str,
        service: &str,
        mut start: Start,
    ) -> Result<Release, Error> {
        // Gates the release does not set: the service's `releases:` defaults (graylane.yaml).
        if let Some(d) = self
            .last_file
            .as_ref()
            .and_then(|(c, _)| c.releases.get(service))
        {
            start.gates = start.gates.or(d);
        }
        let Some(cur) = self.services.get(service) else {
            return Err(Error::not_found(
                "service",
                format!("no service {service:?}"),
            ));
        };
        if let Some(r) = self.releases.get(service).filter(|r| r.status.is_active()) {
            return Err(Error::Invalid {
                field: "release".into(),
                message: format!(
                    "{service} has a release running (#{}, {} to {}): one at a time; abort it \
                     first",
                    r.id, r.procedure, r.target
                ),
            });
        }
        let spec = cur.stored.spec.clone();
        let healthy = |k: &str| self.index.cluster(service, k).map(|e| e.len());
        let driver = self.instances.clone();
        let driven = |k: &str| driver.as_ref().is_some_and(|d| d.drives(service, k));
        let r = Release::start(
            self.next_release,
            service,
            start,
            who,
            &spec,
            &healthy,
            &driven,
            now_ms(),
        )?;
        self.save(&r).await?;
        self.log_op(who, &format!("release {} start: {}", r.id, summary(&r)))
            .await?;
        self.next_release = r.id + 1;
        tracing::info!(release = r.id, %service, %who, "release started");
        self.releases.insert(service.to_string(), r);
        self.drive(service).await;
        self.releases.get(service).cloned().ok_or(Error::Stopped)
    }

    pub(super) async fn release_action(
        &mut self,
        who: &str,
        service: &str,
        action: Action,
        why: &str,
    ) -> Result<Release, Error> {
        if action == Action::Rollback {
            if let Some(start) = self.rollback_of(service, why)? {
                return self.start_release(who, service, start).await;
            }
        }
        let Some(mut r) = self.releases.get(service).cloned() else {
            return Err(Error::not_found(
                "release",
                format!("{service} has no release"),
            ));
        };
        let effects = r.act(action, who, why, now_ms())?;
        self.save(&r).await?;
        self.log_op(who, &format!("release {} {action}{}", r.id, reason(why)))
            .await?;
        self.releases.insert(service.to_string(), r);
        self.run_effects(service, effects).await;
        self.drive(service).await;
        self.releases.get(service).cloned().ok_or(Error::Stopped)
    }

    /// `release rollback` of a service whose last release has ended: the `rollback` release
    /// to start (`None` while a release runs: it is rolled back as by `abort`). Nothing to roll
    /// back is a conflict that says why.
    fn rollback_of(&self, service: &str, why: &str) -> Result<Option<Start>, Error> {
        let Some(cur) = self.services.get(service) else {
            return Err(Error::not_found(
                "service",
                format!("no service {service:?}"),
            ));
        };
        let conflict = |message: String| Error::Conflict {
            field: "release".into(),
            message,
        };
        match self.releases.get(service) {
            None => Err(conflict(format!(
                "nothing to roll back: {service} has had no release"
            ))),
            Some(r) if r.status.is_active() => Ok(None),
            Some(r) => r
                .rollback(&cur.stored.spec, why)
                .map(Some)
                .map_err(|e| conflict(e.message)),
        }
    }

    pub(super) async fn log_op(&self, who: &str, what: &str) -> Result<(), Error> {
        let (store, who, what, version) = (
            self.store.clone(),
            who.to_string(),
            what.to_string(),
            self.version,
        );
        blocking(move || {
            store
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .log_operation(now_ms() / 1000, &who, &what, version)
        })
        .await
    }

    /// Advances every running release as far as it goes now.
    pub(super) async fn drive_releases(&mut self) {
        let running: Vec<String> = self
            .releases
            .iter()
            .filter(|(_, r)| r.wants_driving())
            .map(|(k, _)| k.clone())
            .collect();
        for service in running {
            self.drive(&service).await;
        }
    }

    /// Advances `service`'s release until it waits; saves each change before its effect.
    async fn drive(&mut self, service: &str) {
        // Bounded: a release makes at most one version per turn and has few steps.
        for _ in 0..64 {
            let Some(mut r) = self.releases.get(service).cloned() else {
                return;
            };
            let Some(cur) = self.services.get(service) else {
                return;
            };
            let spec = cur.stored.spec.clone();
            let version = cur.stored.changed_at;
            let filters = self
                .followers
                .as_ref()
                .map(|f| f(service))
                .unwrap_or_default();
            let clusters: Vec<String> = spec.clusters.keys().cloned().collect();
            let traffic = self.seen.as_ref().map(|f| f(service, &clusters));
            let index = &self.index;
            let healthy = |k: &str| index.cluster(service, k).map(|e| e.len());
            let driver = self.instances.clone();
            let driven = |k: &str| driver.as_ref().is_some_and(|d| d.drives(service, k));
            let effects = r.advance(&Observed {
                now: now_ms(),
                spec: &spec,
                version,
                healthy: &healthy,
                filters: &filters,
                traffic: traffic.as_ref(),
                driven: &driven,
            });
            let changed = self.releases.get(service) != Some(&r);
            if changed {
                if let Err(e) = self.save(&r).await {
                    tracing::error!(release = r.id, error = %e, "release not saved; it waits");
                    return;
                }
                self.releases.insert(service.to_string(), r);
                self.publish_releases();
                self.publish();
            }
            if !self.run_effects(service, effects).await {
                return;
            }
        }
    }

    /// Runs a release's effects; `true` if it made a version (so it may move on at once).
    async fn run_effects(&mut self, service: &str, effects: Vec<Effect>) -> bool {
        let mut made = false;
        for e in effects {
            match e {
                Effect::WakeAt(ms) => {
                    let after = Duration::from_millis(ms.saturating_sub(now_ms()));
                    let at = Instant::now() + after.min(Duration::from_secs(3600));
                    self.release_wake = Some(self.release_wake.map_or(at, |w| w.min(at)));
                }
                Effect::Scale { cluster, instances } => self.scale(service, cluster, instances),
                Effect::Apply { spec, what } => {
                    let Some(r) = self.releases.get(service) else {
                        return made;
                    };
                    let who = format!("release {} ({})", r.id, r.started_by);
                    let changed = BTreeMap::from([(service.to_string(), spec.into())]);
                    let result = self
                        .commit(
                            &who,
                            &what,
                            changed,
                            Scope::Partial { force: false },
                            Vec::new(),
                        )
                        .await;
                    let version = self.services.get(service).map(|c| c.stored.changed_at);
                    let Some(r) = self.releases.get_mut(service) else {
                        return made;
                    };
                    match (result, version) {
                        (Ok(_), Some(v)) => {
                            r.applied(v, now_ms());
                            made = true;
                        }
                        (Ok(_), None) => r.refused("the service is gone", now_ms()),
                        (Err(e), _) => {
                            tracing::warn!(release = r.id, error = %e, "release edit refused");
                            r.refused(&e.to_string(), now_ms());
                        }
                    }
                    let r = r.clone();
                    if let Err(e) = self.save(&r).await {
                        tracing::error!(release = r.id, error = %e, "release not saved");
                    }
                    self.publish_releases();
                    self.publish();
                }
            }
        }
        made
    }
}

/// An instance driver's answer, for the release that asked.
#[derive(Debug)]
pub struct Scaled {
    service: String,
    release: u64,
    cluster: String,
    instances: u32,
    result: Result<String, String>,
}

impl Writer {
    /// Runs the instance driver on its own task (the release was saved before: it asked once,
    /// whatever becomes of this task); the answer comes back as a [`Scaled`].
    fn scale(&mut self, service: &str, cluster: String, instances: u32) {
        let Some(r) = self.releases.get(service) else {
            return;
        };
        let release = r.id;
        let Some(driver) = self.instances.clone() else {
            return;
        };
        let current = self
            .index
            .cluster(service, &cluster)
            .and_then(|e| u32::try_from(e.len()).ok());
        let tx = self.scaled_tx.clone();
        let service = service.to_string();
        let span = tracing::info_span!("scale", %service, %cluster, instances, release);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let result = driver
                    .scale(&service, &cluster, current, instances)
                    .await
                    .map_err(|e| e.to_string());
                let _ = tx.send(Scaled {
                    service,
                    release,
                    cluster,
                    instances,
                    result,
                });
            },
            span,
        ));
    }
}

fn reason(why: &str) -> String {
    if why.is_empty() {
        String::new()
    } else {
        format!(" ({why})")
    }
}

fn summary(r: &Release) -> String {
    format!(
        "{} of {} from {} to {}{}",
        r.procedure,
        r.service,
        r.stable,
        r.target,
        reason(&r.reason)
    )
}

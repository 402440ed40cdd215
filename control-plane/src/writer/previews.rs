//! The writer's side of previews (`crate::preview`): it validates a candidate exactly as it
//! would validate a new version (nothing invalid ever reaches a filter), keeps each service's
//! current or last preview in the store, publishes the running ones to the feed, applies a
//! candidate as the next version, and ends previews when they expire.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use super::{blocking, compile, Error, Scope, Writer};
use crate::api::types::Written;
use crate::diff;
use crate::preview::{self, Live, Record, Start, Status};

/// The key of a service's preview in the store's `meta` table.
fn key(service: &str) -> String {
    format!("preview/{service}")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// How a preview ends by an operator's hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Apply { force: bool },
    Discard,
}

/// What ending a preview did: the record as it is now, and the version an apply made.
#[derive(Debug, Clone)]
pub struct Ended {
    pub record: Record,
    pub written: Option<Written>,
}

impl Writer {
    /// Takes the previews kept by the last run (a running one runs on, an expired one ends).
    pub(super) fn load_previews(&mut self, kept: Vec<(String, String)>) {
        for (_, json) in kept {
            let Ok(record) = serde_json::from_str::<Record>(&json) else {
                tracing::warn!("a stored preview could not be read; it is dropped");
                continue;
            };
            self.last_preview = self.last_preview.max(record.id);
            let Ok(compiled) = graylane_strategy::Compiled::try_from(record.candidate.clone())
            else {
                continue;
            };
            self.previews.insert(
                record.service.clone(),
                Arc::new(Live::new(record, Arc::new(compiled))),
            );
        }
        self.publish_previews();
    }

    fn publish_previews(&mut self) {
        self.snapshot.previews = Arc::new(self.previews.clone());
        self.preview_wake = self
            .previews
            .values()
            .filter(|p| p.record.is_running())
            .map(|p| p.record.expires_ms)
            .min()
            .map(|at| {
                let wait = at.saturating_sub(now_ms());
                Instant::now() + Duration::from_millis(wait)
            });
    }

    async fn save_preview(&self, r: &Record) -> Result<(), Error> {
        let (store, k) = (self.store.clone(), key(&r.service));
        let json = serde_json::to_string(r).unwrap_or_default();
        blocking(move || {
            store
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .set_meta(&k, &json)
        })
        .await
    }

    /// Starts a preview of `service` (replacing one that runs). The candidate is checked as a
    /// new version would be: size limits, compiled, a default cluster unless `force`.
    pub(super) async fn start_preview(
        &mut self,
        who: &str,
        service: &str,
        start: Start,
        force: bool,
    ) -> Result<Record, Error> {
        let Some(cur) = self.services.get(service) else {
            return Err(Error::not_found(
                "service",
                format!("no service {service:?}"),
            ));
        };
        let live_version = cur.stored.changed_at;
        if let Some(base) = start.base_version.filter(|b| *b != live_version) {
            return Err(Error::Conflict {
                field: "base_version".into(),
                message: format!(
                    "{service}'s strategy changed since version {base} (it is at version \
                     {live_version} now): make the candidate again from the live strategy"
                ),
            });
        }
        let candidate = match (start.strategy, start.edit) {
            (Some(s), None) => s,
            (None, Some(edit)) => {
                let mut spec = (*cur.stored.spec).clone();
                edit.apply(&mut spec).map_err(|e| Error::NotFound {
                    field: format!("edit.{}", e.field),
                    message: e.to_string(),
                })?;
                spec
            }
            _ => {
                return Err(Error::Invalid {
                    field: "strategy".into(),
                    message: "give the candidate as `strategy` or as `edit` (exactly one)".into(),
                })
            }
        };
        let every = start.every.unwrap_or(1);
        if every == 0 {
            return Err(Error::Invalid {
                field: "every".into(),
                message: "every must be at least 1 (1: every request)".into(),
            });
        }
        let expires = start.expires_secs.unwrap_or(preview::DEFAULT_EXPIRES_SECS);
        if expires == 0 || expires > preview::MAX_EXPIRES_SECS {
            return Err(Error::Invalid {
                field: "expires_secs".into(),
                message: format!(
                    "expires_secs must be 1 to {} (default {})",
                    preview::MAX_EXPIRES_SECS,
                    preview::DEFAULT_EXPIRES_SECS
                ),
            });
        }
        let invalid = |e: graylane_strategy::Error| Error::Invalid {
            field: format!("strategy.{}", e.path()),
            message: format!("candidate for {service}: {e}"),
        };
        self.size_limits.check(&candidate).map_err(invalid)?;
        let compiled = compile(&candidate, Some(cur)).map_err(invalid)?;
        if !force {
            self.check_default(service, &candidate)?;
        }
        let mut changes = Vec::new();
        diff::one(
            service,
            Some(&cur.stored.spec),
            Some(&candidate),
            &mut changes,
        );
        if changes.is_empty() {
            return Err(Error::Invalid {
                field: "strategy".into(),
                message: format!(
                    "the candidate is {service}'s live strategy (version {live_version}): \
                     nothing to preview"
                ),
            });
        }
        let now = now_ms();
        let id = now.max(self.last_preview + 1);
        let record = Record {
            id,
            service: service.to_string(),
            candidate,
            base_version: live_version,
            every,
            created_ms: now,
            expires_ms: now + expires * 1_000,
            ended_ms: None,
            who: who.to_string(),
            why: start.why,
            changes,
            status: Status::Running,
        };
        if let Some(old) = self.previews.get(service).filter(|p| p.record.is_running()) {
            // The store keeps one preview per service: the new one takes the old one's place.
            let old = old.record.id;
            self.log_op(who, &format!("preview {old} of {service} replaced by {id}"))
                .await?;
        }
        self.save_preview(&record).await?;
        self.last_preview = id;
        self.log_op(
            who,
            &format!(
                "preview {id} of {service} started: {}",
                record.changes.join("; ")
            ),
        )
        .await?;
        tracing::info!(%who, %service, id, changes = ?record.changes, "preview started");
        self.previews.insert(
            service.to_string(),
            Arc::new(Live::new(record.clone(), Arc::new(compiled))),
        );
        self.publish_previews();
        self.publish();
        Ok(record)
    }

    /// Applies or discards `service`'s running preview.
    pub(super) async fn end_preview(
        &mut self,
        who: &str,
        service: &str,
        end: End,
    ) -> Result<Ended, Error> {
        let Some(live) = self.previews.get(service).cloned() else {
            return Err(Error::not_found(
                "preview",
                format!("{service} has no preview"),
            ));
        };
        let mut record = live.record.clone();
        if !record.is_running() {
            return Err(Error::Conflict {
                field: "preview".into(),
                message: format!(
                    "{service}'s preview {} is not running ({})",
                    record.id,
                    status_word(&record.status)
                ),
            });
        }
        let mut written = None;
        match end {
            End::Discard => {
                record.status = Status::Discarded {
                    who: who.to_string(),
                };
            }
            End::Apply { force } => {
                let live_version = self
                    .services
                    .get(service)
                    .map_or(0, |c| c.stored.changed_at);
                if live_version != record.base_version && !force {
                    return Err(Error::Conflict {
                        field: "preview".into(),
                        message: format!(
                            "{service}'s strategy changed since the preview started (version \
                             {} then, {live_version} now): applying would undo that change. \
                             Start a new preview, or force it",
                            record.base_version
                        ),
                    });
                }
                if let Some(r) = self.releases.get(service).filter(|r| r.status.is_active()) {
                    return Err(Error::Conflict {
                        field: "preview".into(),
                        message: format!(
                            "release {} of {service} is running: let it finish or abort it \
                             before applying a preview",
                            r.id
                        ),
                    });
                }
                let candidate = super::Candidate {
                    spec: record.candidate.clone(),
                    compiled: Some(live.compiled.clone()),
                };
                let w = self
                    .commit(
                        who,
                        &format!("apply preview {} of {service}", record.id),
                        BTreeMap::from([(service.to_string(), candidate)]),
                        Scope::Partial { force },
                        Vec::new(),
                    )
                    .await?;
                record.status = Status::Applied {
                    version: w.version,
                    who: who.to_string(),
                };
                written = Some(w);
            }
        }
        record.ended_ms = Some(now_ms());
        self.save_preview(&record).await?;
        self.log_op(
            who,
            &format!(
                "preview {} of {service} {}",
                record.id,
                status_word(&record.status)
            ),
        )
        .await?;
        self.previews.insert(
            service.to_string(),
            Arc::new(Live::new(record.clone(), live.compiled.clone())),
        );
        self.publish_previews();
        self.publish();
        Ok(Ended { record, written })
    }

    /// Ends the previews whose time is up.
    pub(super) async fn expire_previews(&mut self) {
        let now = now_ms();
        let due: Vec<Arc<Live>> = self
            .previews
            .values()
            .filter(|p| p.record.is_running() && p.record.expires_ms <= now)
            .cloned()
            .collect();
        for live in due {
            let mut record = live.record.clone();
            record.status = Status::Expired;
            record.ended_ms = Some(record.expires_ms);
            if let Err(e) = self.save_preview(&record).await {
                tracing::warn!(error = %e, "could not store an expired preview");
            }
            tracing::info!(service = %record.service, id = record.id, "preview expired");
            self.previews.insert(
                record.service.clone(),
                Arc::new(Live::new(record, live.compiled.clone())),
            );
        }
        self.publish_previews();
        self.publish();
    }
}

/// A preview's status in a few words.
pub fn status_word(s: &Status) -> String {
    match s {
        Status::Running => "running".into(),
        Status::Applied { version, who } => format!("applied as version {version} by {who}"),
        Status::Discarded { who } => format!("discarded by {who}"),
        Status::Expired => "expired".into(),
        Status::Replaced { by } => format!("replaced by preview {by}"),
    }
}

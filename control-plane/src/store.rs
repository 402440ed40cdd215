//! Durable history in SQLite (rusqlite, bundled).
//!
//! Why SQLite rather than redb: the history is relational (versions, the services each
//! version points at, the operation log) and wants ad-hoc queries (`diff`, `history`), WAL
//! with `synchronous=FULL` makes every acknowledged commit survive `kill -9` and power loss,
//! and the file can be inspected with the `sqlite3` shell. Writes are rare (people and
//! reloads), so a blocking call from the single writer task is fine.
//!
//! Strategies are stored content-addressed (`docs`, keyed by SHA-256): a version row points at
//! one document per service, so an unchanged million-id whitelist is stored once however
//! many versions follow.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use graylane_strategy::StrategySpec;
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("store {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("store: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("store: cannot create {path}: {source}")]
    Dir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("store: document {hash} is not a valid strategy: {source}")]
    Corrupt {
        hash: String,
        #[source]
        source: serde_json::Error,
    },
}

/// One version of the whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionRow {
    pub version: u64,
    /// Unix seconds.
    pub at: u64,
    pub author: String,
    pub summary: Vec<String>,
}

/// One entry of the operation log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Operation {
    pub id: u64,
    pub at: u64,
    pub who: String,
    pub what: String,
    pub version_before: u64,
    pub version_after: Option<u64>,
}

/// A service's strategy as stored: the document and the version at which it last changed.
#[derive(Debug, Clone)]
pub struct StoredService {
    pub spec: Arc<StrategySpec>,
    /// The strategy's JSON as stored and as sent to the filters (verbatim).
    pub json: Arc<Box<RawValue>>,
    pub hash: String,
    pub changed_at: u64,
}

pub struct Store {
    conn: Connection,
}

pub fn hash(json: &[u8]) -> String {
    let d = Sha256::digest(json);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS docs (hash TEXT PRIMARY KEY, json BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
  version INTEGER PRIMARY KEY, at INTEGER NOT NULL, author TEXT NOT NULL, summary TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS version_services (
  version INTEGER NOT NULL, service TEXT NOT NULL, hash TEXT NOT NULL, changed_at INTEGER NOT NULL,
  PRIMARY KEY (version, service));
CREATE TABLE IF NOT EXISTS operations (
  id INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL, who TEXT NOT NULL, what TEXT NOT NULL,
  version_before INTEGER NOT NULL, version_after INTEGER);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
";

impl Store {
    /// Opens (creating) `dir/graylane.db`.
    pub fn open(dir: &Path) -> Result<Store, Error> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Dir {
            path: dir.display().to_string(),
            source,
        })?;
        let path = dir.join("graylane.db");
        let open = || -> rusqlite::Result<Connection> {
            let conn = Connection::open(&path)?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "FULL")?;
            conn.execute_batch(SCHEMA)?;
            Ok(conn)
        };
        let conn = open().map_err(|source| Error::Open {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Store { conn })
    }

    /// An in-memory store, for tests.
    pub fn memory() -> Result<Store, Error> {
        let conn = Connection::open_in_memory()?;
        conn.execute_batch(SCHEMA)?;
        Ok(Store { conn })
    }

    /// The latest version number (0 when empty).
    pub fn latest_version(&self) -> Result<u64, Error> {
        let v: Option<i64> = self
            .conn
            .query_row("SELECT MAX(version) FROM versions", [], |r| r.get(0))?;
        Ok(v.unwrap_or(0) as u64)
    }

    /// The services of `version`.
    pub fn services_at(&self, version: u64) -> Result<BTreeMap<String, StoredService>, Error> {
        let mut stmt = self.conn.prepare(
            "SELECT vs.service, vs.hash, vs.changed_at, d.json FROM version_services vs
             JOIN docs d ON d.hash = vs.hash WHERE vs.version = ?1",
        )?;
        let rows = stmt.query_map(params![version as i64], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Vec<u8>>(3)?,
            ))
        })?;
        let mut out = BTreeMap::new();
        for row in rows {
            let (service, hash, changed_at, json) = row?;
            let corrupt = |source| Error::Corrupt {
                hash: hash.clone(),
                source,
            };
            let spec: StrategySpec = serde_json::from_slice(&json).map_err(corrupt)?;
            let text = String::from_utf8(json).map_err(|e| {
                corrupt(serde_json::Error::io(std::io::Error::other(e.to_string())))
            })?;
            let json = RawValue::from_string(text).map_err(corrupt)?;
            out.insert(
                service,
                StoredService {
                    spec: Arc::new(spec),
                    json: Arc::new(json),
                    hash,
                    changed_at: changed_at as u64,
                },
            );
        }
        Ok(out)
    }

    pub fn version(&self, version: u64) -> Result<Option<VersionRow>, Error> {
        Ok(self
            .conn
            .query_row(
                "SELECT version, at, author, summary FROM versions WHERE version = ?1",
                params![version as i64],
                version_row,
            )
            .optional()?)
    }

    /// Newest first.
    pub fn history(&self, limit: u64) -> Result<Vec<VersionRow>, Error> {
        let mut stmt = self.conn.prepare(
            "SELECT version, at, author, summary FROM versions ORDER BY version DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map(params![limit as i64], version_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Newest first.
    pub fn operations(&self, limit: u64) -> Result<Vec<Operation>, Error> {
        let mut stmt = self.conn.prepare(
            "SELECT id, at, who, what, version_before, version_after FROM operations
             ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map(params![limit as i64], |r| {
            Ok(Operation {
                id: r.get::<_, i64>(0)? as u64,
                at: r.get::<_, i64>(1)? as u64,
                who: r.get(2)?,
                what: r.get(3)?,
                version_before: r.get::<_, i64>(4)? as u64,
                version_after: r.get::<_, Option<i64>>(5)?.map(|v| v as u64),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Commits a new version (all its services), its operation-log entry and meta updates in
    /// one transaction. Returns only once the commit is durable.
    pub fn commit(
        &mut self,
        row: &VersionRow,
        services: &BTreeMap<String, StoredService>,
        op: (&str, &str),
        meta: &[(&str, &str)],
    ) -> Result<(), Error> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO versions (version, at, author, summary) VALUES (?1, ?2, ?3, ?4)",
            params![
                row.version as i64,
                row.at as i64,
                row.author,
                serde_json::to_string(&row.summary).unwrap_or_default()
            ],
        )?;
        for (name, s) in services {
            tx.execute(
                "INSERT OR IGNORE INTO docs (hash, json) VALUES (?1, ?2)",
                params![s.hash, s.json.get().as_bytes()],
            )?;
            tx.execute(
                "INSERT INTO version_services (version, service, hash, changed_at) VALUES (?1, ?2, ?3, ?4)",
                params![row.version as i64, name, s.hash, s.changed_at as i64],
            )?;
        }
        tx.execute(
            "INSERT INTO operations (at, who, what, version_before, version_after) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                row.at as i64,
                op.0,
                op.1,
                row.version.saturating_sub(1) as i64,
                row.version as i64
            ],
        )?;
        for (k, v) in meta {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![k, v],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Logs an operation that made no version (rejected, or a no-op).
    pub fn log_operation(&self, at: u64, who: &str, what: &str, before: u64) -> Result<(), Error> {
        self.conn.execute(
            "INSERT INTO operations (at, who, what, version_before, version_after) VALUES (?1, ?2, ?3, ?4, NULL)",
            params![at as i64, who, what, before as i64],
        )?;
        Ok(())
    }

    /// The store's identity, made once when the store is created: a filter that sees another
    /// epoch knows the versions started over (a lost store) and takes the new ones.
    pub fn epoch(&self) -> Result<u64, Error> {
        if let Some(e) = self.meta("epoch")?.and_then(|v| v.parse::<u64>().ok()) {
            return Ok(e);
        }
        let e = new_epoch();
        self.set_meta("epoch", &e.to_string())?;
        Ok(e)
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>, Error> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
                r.get(0)
            })
            .optional()?)
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), Error> {
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }
}

/// A fresh, non-zero epoch: the clock and the process's random hash keys, mixed.
fn new_epoch() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    // Kept below 2^53 so that JSON readers without 64-bit integers read it exactly.
    (h.finish() >> 11).max(1)
}

fn version_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<VersionRow> {
    let summary: String = r.get(3)?;
    Ok(VersionRow {
        version: r.get::<_, i64>(0)? as u64,
        at: r.get::<_, i64>(1)? as u64,
        author: r.get(2)?,
        summary: serde_json::from_str(&summary).unwrap_or_default(),
    })
}

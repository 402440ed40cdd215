//! Durable history in SQLite (rusqlite, bundled).
//!
//! Why SQLite rather than redb: the history is relational (versions, the services each
//! version points at, the operation log) and wants ad-hoc queries (`diff`, `history`), WAL
//! with `synchronous=FULL` makes every acknowledged commit survive the process being killed
//! (`kill -9`; power loss is SQLite's documented guarantee, not something our tests show), and
//! the file can be inspected with the `sqlite3` shell.
//!
//! Content-addressed, in two parts: a service's strategy *without* its whitelists (`docs`, a
//! few hundred bytes) and each cluster's whitelist on its own (`lists`, keyed by SHA-256). A
//! version row points at one document and one list per cluster, so a state flip on a service
//! with a million ids writes a few hundred bytes, and an unchanged whitelist is stored once
//! however many versions follow.
//!
//! SQLite's automatic checkpoint (copying the WAL into the database file, with an fsync of
//! that file) would run inside whichever commit crosses 1,000 pages, and that commit would be
//! acknowledged late: the writer's connection has it off, and a [`Checkpointer`] (its own
//! connection) runs a passive checkpoint on the blocking pool after each commit instead. A
//! commit is still acknowledged only once the WAL holding it is synced.
//!
//! One [`Store`] belongs to the writer task, which calls it on `spawn_blocking`; handlers read
//! history through a [`Reader`] (its own connection: WAL lets readers run beside the writer).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use graylane_strategy::id::{IdList, Interval};
use graylane_strategy::{ClusterSpec, IdSpec, StrategySpec};

use crate::discovery::{Endpoint, SourceKind};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::{Deserialize, Serialize};
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
    #[error("store: {what} {hash} is not valid: {source}")]
    Corrupt {
        what: &'static str,
        hash: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("store: the blocking task stopped: {0}")]
    Task(String),
}

/// One version of the whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VersionRow {
    pub version: u64,
    /// Unix seconds.
    pub at: u64,
    pub author: String,
    pub summary: Vec<String>,
}

/// One entry of the operation log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Operation {
    pub id: u64,
    pub at: u64,
    pub who: String,
    pub what: String,
    pub version_before: u64,
    pub version_after: Option<u64>,
}

/// A service's strategy as stored: the strategy, the hashes of its parts, and the version at
/// which it last changed.
#[derive(Debug, Clone)]
pub struct StoredService {
    pub spec: Arc<StrategySpec>,
    /// The strategy without its whitelists.
    pub doc: Part,
    /// Each cluster's whitelist (ids and intervals).
    pub lists: BTreeMap<String, Part>,
    pub changed_at: u64,
}

/// A stored piece: its hash, and its bytes while they still have to be written.
#[derive(Debug, Clone)]
pub struct Part {
    pub hash: String,
    /// `None` once known to be in the store (an unchanged part reused by a new version).
    pub bytes: Option<Arc<Vec<u8>>>,
}

impl Part {
    fn of<T: Serialize>(value: &T) -> Part {
        let bytes = serde_json::to_vec(value).unwrap_or_default();
        Part {
            hash: hash(&bytes),
            bytes: Some(Arc::new(bytes)),
        }
    }
    fn stored(&self) -> Part {
        Part {
            hash: self.hash.clone(),
            bytes: None,
        }
    }
}

/// One cluster's whitelist as stored.
#[derive(Serialize, Deserialize)]
struct ListDoc {
    #[serde(default)]
    ids: IdList,
    #[serde(default)]
    interval: Vec<Interval>,
}

impl StoredService {
    /// Splits `spec` for storage. Parts equal to those of `prev` (same whitelist of the same
    /// cluster) are taken from it: neither serialised nor hashed again.
    pub fn new(spec: StrategySpec, changed_at: u64, prev: Option<&StoredService>) -> Self {
        let mut skeleton = StrategySpec {
            identity: spec.identity.clone(),
            gray_cookie: spec.gray_cookie.clone(),
            lane: spec.lane.clone(),
            min_healthy: spec.min_healthy,
            clusters: BTreeMap::new(),
        };
        let mut lists = BTreeMap::new();
        for (key, c) in &spec.clusters {
            skeleton.clusters.insert(key.clone(), without_lists(c));
            if c.id.ids.is_empty() && c.id.interval.is_empty() {
                continue;
            }
            let same = prev.and_then(|p| {
                let old = p.spec.clusters.get(key)?;
                let part = p.lists.get(key)?;
                (old.id.ids == c.id.ids && old.id.interval == c.id.interval).then(|| part.stored())
            });
            let part = same.unwrap_or_else(|| {
                Part::of(&ListDoc {
                    ids: c.id.ids.clone(),
                    interval: c.id.interval.clone(),
                })
            });
            lists.insert(key.clone(), part);
        }
        StoredService {
            doc: Part::of(&skeleton),
            spec: Arc::new(spec),
            lists,
            changed_at,
        }
    }

    /// The parts as recorded in a version row: document hash and `{cluster: list hash}`.
    fn list_hashes(&self) -> String {
        let m: BTreeMap<&str, &str> = self
            .lists
            .iter()
            .map(|(k, p)| (k.as_str(), p.hash.as_str()))
            .collect();
        serde_json::to_string(&m).unwrap_or_else(|_| "{}".into())
    }

    /// The same service with every part known to be stored.
    pub fn committed(&self) -> StoredService {
        StoredService {
            spec: self.spec.clone(),
            doc: self.doc.stored(),
            lists: self
                .lists
                .iter()
                .map(|(k, p)| (k.clone(), p.stored()))
                .collect(),
            changed_at: self.changed_at,
        }
    }
}

/// A cluster without its id list and intervals (`all` stays): each field named, so that a
/// new field cannot be forgotten here.
fn without_lists(c: &ClusterSpec) -> ClusterSpec {
    let ClusterSpec {
        status,
        cluster,
        weight,
        lane,
        id,
        gray_cookie,
        cookies,
        headers,
        caller_lane,
        percent,
    } = c;
    ClusterSpec {
        status: *status,
        cluster: cluster.clone(),
        weight: *weight,
        lane: *lane,
        id: IdSpec {
            all: id.all,
            ids: IdList::default(),
            interval: Vec::new(),
        },
        gray_cookie: *gray_cookie,
        cookies: cookies.clone(),
        headers: headers.clone(),
        caller_lane: *caller_lane,
        percent: percent.clone(),
    }
}

pub fn hash(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS docs (hash TEXT PRIMARY KEY, json BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS lists (hash TEXT PRIMARY KEY, json BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
  version INTEGER PRIMARY KEY, at INTEGER NOT NULL, author TEXT NOT NULL, summary TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS version_services (
  version INTEGER NOT NULL, service TEXT NOT NULL, hash TEXT NOT NULL, changed_at INTEGER NOT NULL,
  PRIMARY KEY (version, service));
CREATE TABLE IF NOT EXISTS operations (
  id INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL, who TEXT NOT NULL, what TEXT NOT NULL,
  version_before INTEGER NOT NULL, version_after INTEGER);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS endpoints (
  service TEXT NOT NULL, cluster TEXT NOT NULL, source TEXT NOT NULL, json BLOB NOT NULL,
  PRIMARY KEY (service, cluster, source));
CREATE TABLE IF NOT EXISTS releases (
  id INTEGER PRIMARY KEY, service TEXT NOT NULL, json BLOB NOT NULL);
";

/// One cluster's last endpoints from one source, as kept across restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointRow {
    pub source: SourceKind,
    pub service: String,
    pub cluster: String,
    /// `None`: the entry is gone (its mapping was removed).
    pub endpoints: Option<Vec<Endpoint>>,
}

/// Where the database lives: a file, or (tests) a named in-memory database shared by the
/// connections of this process.
#[derive(Debug, Clone)]
enum Location {
    File(PathBuf),
    Memory(String),
}

impl Location {
    fn connect(&self) -> rusqlite::Result<Connection> {
        match self {
            Location::File(p) => Connection::open(p),
            Location::Memory(uri) => Connection::open_with_flags(
                uri,
                OpenFlags::SQLITE_OPEN_READ_WRITE
                    | OpenFlags::SQLITE_OPEN_CREATE
                    | OpenFlags::SQLITE_OPEN_URI,
            ),
        }
    }
    fn describe(&self) -> String {
        match self {
            Location::File(p) => p.display().to_string(),
            Location::Memory(uri) => uri.clone(),
        }
    }
}

pub struct Store {
    conn: Connection,
    at: Location,
}

impl Store {
    /// Opens (creating) `dir/graylane.db`.
    pub fn open(dir: &Path) -> Result<Store, Error> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Dir {
            path: dir.display().to_string(),
            source,
        })?;
        Store::at(Location::File(dir.join("graylane.db")))
    }

    /// An in-memory store (tests), readable by its [`Reader`]s while this store lives.
    pub fn memory() -> Result<Store, Error> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "file:graylane-mem-{}-{}?mode=memory&cache=shared",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        Store::at(Location::Memory(name))
    }

    fn at(at: Location) -> Result<Store, Error> {
        let open = || -> rusqlite::Result<Connection> {
            let conn = at.connect()?;
            if matches!(at, Location::File(_)) {
                conn.pragma_update(None, "journal_mode", "WAL")?;
                conn.pragma_update(None, "synchronous", "FULL")?;
                // Checkpoints run off the commit path (see [`Checkpointer`]).
                conn.pragma_update(None, "wal_autocheckpoint", 0)?;
            }
            conn.execute_batch(SCHEMA)?;
            // Stores of earlier releases kept whole strategies in `docs`: they still load (a
            // version row without lists reads its document as the whole strategy).
            let has_lists: bool = conn
                .prepare(
                    "SELECT 1 FROM pragma_table_info('version_services') WHERE name = 'lists'",
                )?
                .exists([])?;
            if !has_lists {
                conn.execute_batch(
                    "ALTER TABLE version_services ADD COLUMN lists TEXT NOT NULL DEFAULT '{}'",
                )?;
            }
            Ok(conn)
        };
        let conn = open().map_err(|source| Error::Open {
            path: at.describe(),
            source,
        })?;
        Ok(Store { conn, at })
    }

    /// What keeps the WAL short, on its own connection (`None` for an in-memory store).
    pub fn checkpointer(&self) -> Result<Option<Checkpointer>, Error> {
        if !matches!(self.at, Location::File(_)) {
            return Ok(None);
        }
        let conn = self.at.connect().map_err(|source| Error::Open {
            path: self.at.describe(),
            source,
        })?;
        Ok(Some(Checkpointer {
            conn: Arc::new(Mutex::new(conn)),
            busy: Arc::new(AtomicBool::new(false)),
        }))
    }

    /// A reader on its own connection.
    pub fn reader(&self) -> Result<Reader, Error> {
        let conn = self.at.connect().map_err(|source| Error::Open {
            path: self.at.describe(),
            source,
        })?;
        Ok(Reader {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// The latest version number (0 when empty).
    pub fn latest_version(&self) -> Result<u64, Error> {
        latest_version(&self.conn)
    }

    /// The services of `version`.
    pub fn services_at(&self, version: u64) -> Result<BTreeMap<String, StoredService>, Error> {
        services_at(&self.conn, version)
    }

    /// Whether `version` exists.
    pub fn has_version(&self, version: u64) -> Result<bool, Error> {
        Ok(version_row_at(&self.conn, version)?.is_some())
    }

    /// Commits a new version (all its services), its operation-log entry and meta updates in
    /// one transaction. Returns only once the commit is durable. Parts without bytes are
    /// already stored.
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
            if let Some(b) = &s.doc.bytes {
                tx.execute(
                    "INSERT OR IGNORE INTO docs (hash, json) VALUES (?1, ?2)",
                    params![s.doc.hash, b.as_slice()],
                )?;
            }
            for part in s.lists.values() {
                if let Some(b) = &part.bytes {
                    tx.execute(
                        "INSERT OR IGNORE INTO lists (hash, json) VALUES (?1, ?2)",
                        params![part.hash, b.as_slice()],
                    )?;
                }
            }
            tx.execute(
                "INSERT INTO version_services (version, service, hash, changed_at, lists)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    row.version as i64,
                    name,
                    s.doc.hash,
                    s.changed_at as i64,
                    s.list_hashes()
                ],
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

    /// Writes the last endpoints of the clusters that changed (one transaction).
    pub fn save_endpoints(&mut self, rows: &[EndpointRow]) -> Result<(), Error> {
        let tx = self.conn.transaction()?;
        for r in rows {
            match &r.endpoints {
                Some(eps) => {
                    let json = serde_json::to_vec(eps).unwrap_or_default();
                    tx.execute(
                        "INSERT INTO endpoints (service, cluster, source, json) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT(service, cluster, source) DO UPDATE SET json = excluded.json",
                        params![r.service, r.cluster, r.source.as_str(), json],
                    )?;
                }
                None => {
                    tx.execute(
                        "DELETE FROM endpoints WHERE service = ?1 AND cluster = ?2 AND source = ?3",
                        params![r.service, r.cluster, r.source.as_str()],
                    )?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The endpoints kept by the last run (rows of unknown sources or unreadable are skipped).
    pub fn load_endpoints(&self) -> Result<Vec<EndpointRow>, Error> {
        let mut stmt = self
            .conn
            .prepare("SELECT service, cluster, source, json FROM endpoints")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Vec<u8>>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (service, cluster, source, json) = row?;
            let source = match source.as_str() {
                "consul" => SourceKind::Consul,
                "kubernetes" => SourceKind::Kubernetes,
                _ => continue,
            };
            let Ok(endpoints) = serde_json::from_slice::<Vec<Endpoint>>(&json) else {
                continue;
            };
            out.push(EndpointRow {
                source,
                service,
                cluster,
                endpoints: Some(endpoints),
            });
        }
        Ok(out)
    }

    /// Writes a release as it is now (its whole state: the writer saves it after every change,
    /// before it acts on the change's effects).
    pub fn save_release(&self, r: &crate::release::Release) -> Result<(), Error> {
        let json = serde_json::to_vec(r).unwrap_or_default();
        self.conn.execute(
            "INSERT INTO releases (id, service, json) VALUES (?1, ?2, ?3)
             ON CONFLICT(id) DO UPDATE SET json = excluded.json",
            params![r.id, r.service, json],
        )?;
        Ok(())
    }

    /// Every release, oldest first.
    pub fn releases(&self) -> Result<Vec<crate::release::Release>, Error> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, json FROM releases ORDER BY id")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, u64>(0)?, r.get::<_, Vec<u8>>(1)?)))?;
        read_releases(rows)
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>, Error> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// Every `meta` entry whose key starts with `prefix`, by key.
    pub fn meta_prefixed(&self, prefix: &str) -> Result<Vec<(String, String)>, Error> {
        let mut stmt = self.conn.prepare(
            "SELECT key, value FROM meta WHERE substr(key, 1, length(?1)) = ?1 ORDER BY key",
        )?;
        let rows = stmt.query_map(params![prefix], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
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

/// Copies the WAL into the database file after commits, off the commit path: a passive
/// checkpoint (it waits for no reader or writer) on the blocking pool, one at a time.
#[derive(Clone)]
pub struct Checkpointer {
    conn: Arc<Mutex<Connection>>,
    busy: Arc<AtomicBool>,
}

impl Checkpointer {
    /// Starts a checkpoint unless one is running (the running one takes the new frames, or
    /// the next commit's does).
    pub fn start(&self) {
        if self.busy.swap(true, Ordering::AcqRel) {
            return;
        }
        let (conn, busy) = (self.conn.clone(), self.busy.clone());
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            let r = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
            if let Err(e) = r {
                tracing::warn!(error = %e, "WAL checkpoint failed; the next commit tries again");
            }
            busy.store(false, Ordering::Release);
        });
    }
}

/// Releases from `(id, json)` rows, in row order; a row that does not read names its id.
fn read_releases(
    rows: impl Iterator<Item = rusqlite::Result<(u64, Vec<u8>)>>,
) -> Result<Vec<crate::release::Release>, Error> {
    rows.map(|row| {
        let (id, json) = row?;
        serde_json::from_slice(&json).map_err(|source| Error::Corrupt {
            what: "release",
            hash: id.to_string(),
            source,
        })
    })
    .collect()
}

/// Reads history beside the writer, on its own connection; every call runs on
/// `spawn_blocking`.
#[derive(Clone)]
pub struct Reader {
    conn: Arc<Mutex<Connection>>,
}

impl Reader {
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&conn)
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))?
    }

    /// `service`'s releases, newest first (at most `limit`).
    pub async fn releases_of(
        &self,
        service: String,
        limit: u64,
    ) -> Result<Vec<crate::release::Release>, Error> {
        self.with(move |c| {
            let mut stmt = c.prepare(
                "SELECT id, json FROM releases WHERE service = ?1 ORDER BY id DESC LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![service, limit as i64], |r| {
                Ok((r.get::<_, u64>(0)?, r.get::<_, Vec<u8>>(1)?))
            })?;
            read_releases(rows)
        })
        .await
    }

    /// Versions, newest first.
    pub async fn history(&self, limit: u64) -> Result<Vec<VersionRow>, Error> {
        self.with(move |c| {
            let mut stmt = c.prepare(
                "SELECT version, at, author, summary FROM versions ORDER BY version DESC LIMIT ?1",
            )?;
            let rows = stmt.query_map(params![limit as i64], version_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    /// The operation log, newest first.
    pub async fn operations(&self, limit: u64) -> Result<Vec<Operation>, Error> {
        self.with(move |c| {
            let mut stmt = c.prepare(
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
        })
        .await
    }

    /// The strategies of `version`, or `None` when there is no such version.
    pub async fn strategies_at(
        &self,
        version: u64,
    ) -> Result<Option<BTreeMap<String, Arc<StrategySpec>>>, Error> {
        self.with(move |c| {
            if version_row_at(c, version)?.is_none() {
                return Ok(None);
            }
            Ok(Some(
                services_at(c, version)?
                    .into_iter()
                    .map(|(k, s)| (k, s.spec))
                    .collect(),
            ))
        })
        .await
    }
}

fn latest_version(c: &Connection) -> Result<u64, Error> {
    let v: Option<i64> = c.query_row("SELECT MAX(version) FROM versions", [], |r| r.get(0))?;
    Ok(v.unwrap_or(0) as u64)
}

fn version_row_at(c: &Connection, version: u64) -> Result<Option<VersionRow>, Error> {
    Ok(c.query_row(
        "SELECT version, at, author, summary FROM versions WHERE version = ?1",
        params![version as i64],
        version_row,
    )
    .optional()?)
}

fn services_at(c: &Connection, version: u64) -> Result<BTreeMap<String, StoredService>, Error> {
    let mut stmt = c.prepare(
        "SELECT vs.service, vs.hash, vs.changed_at, vs.lists, d.json FROM version_services vs
         JOIN docs d ON d.hash = vs.hash WHERE vs.version = ?1",
    )?;
    let rows = stmt.query_map(params![version as i64], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, Vec<u8>>(4)?,
        ))
    })?;
    let mut list_stmt = c.prepare("SELECT json FROM lists WHERE hash = ?1")?;
    let mut out = BTreeMap::new();
    for row in rows {
        let (service, doc_hash, changed_at, lists, json) = row?;
        let corrupt = |what, hash: &str| {
            let hash = hash.to_string();
            move |source| Error::Corrupt { what, hash, source }
        };
        let mut spec: StrategySpec =
            serde_json::from_slice(&json).map_err(corrupt("document", &doc_hash))?;
        let hashes: BTreeMap<String, String> =
            serde_json::from_str(&lists).map_err(corrupt("list index", &doc_hash))?;
        let mut parts = BTreeMap::new();
        for (cluster, h) in hashes {
            let bytes: Vec<u8> = list_stmt.query_row(params![h], |r| r.get(0))?;
            let list: ListDoc = serde_json::from_slice(&bytes).map_err(corrupt("list", &h))?;
            if let Some(c) = spec.clusters.get_mut(&cluster) {
                c.id.ids = list.ids;
                c.id.interval = list.interval;
            }
            parts.insert(
                cluster,
                Part {
                    hash: h,
                    bytes: None,
                },
            );
        }
        out.insert(
            service,
            StoredService {
                spec: Arc::new(spec),
                doc: Part {
                    hash: doc_hash,
                    bytes: None,
                },
                lists: parts,
                changed_at: changed_at as u64,
            },
        );
    }
    Ok(out)
}

/// A fresh, non-zero epoch: the clock and the process's random hash keys, mixed. Kept below
/// 2^53 so that JSON readers without 64-bit integers read it exactly.
fn new_epoch() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn spec(ids: Vec<u64>, status: &str) -> StrategySpec {
        let mut s = graylane_strategy::parse_json(
            format!(
                r#"{{"route-strategy": {{"A": {{"status": "{status}", "id": {{"interval": [[5, 9]]}}}},
                    "B": {{"status": "G", "id": {{"all": true}}}}}}}}"#
            )
            .as_bytes(),
        )
        .unwrap();
        if let Some(a) = s.clusters.get_mut("A") {
            a.id.ids.nums = ids.clone().into();
        }
        s
    }

    fn commit(store: &mut Store, version: u64, s: &StoredService) {
        let row = VersionRow {
            version,
            at: 0,
            author: "t".into(),
            summary: vec![],
        };
        let services = BTreeMap::from([("web".to_string(), s.clone())]);
        store.commit(&row, &services, ("t", "x"), &[]).unwrap();
    }

    fn bytes_in(store: &Store, table: &str) -> i64 {
        store
            .conn
            .query_row(
                &format!("SELECT COALESCE(SUM(LENGTH(json)), 0) FROM {table}"),
                [],
                |r| r.get(0),
            )
            .unwrap()
    }

    #[test]
    fn a_state_flip_writes_a_small_document_and_reuses_the_whitelist() {
        let mut store = Store::memory().unwrap();
        let ids: Vec<u64> = (0..100_000).map(|i| i * 3).collect();
        let v1 = StoredService::new(spec(ids.clone(), "Y"), 1, None);
        assert!(v1.lists["A"].bytes.is_some());
        commit(&mut store, 1, &v1);
        let v1 = v1.committed();
        let lists_before = bytes_in(&store, "lists");
        let docs_before = bytes_in(&store, "docs");
        // The flip: same whitelist, other state. The list part comes from v1, unwritten.
        let v2 = StoredService::new(spec(ids.clone(), "R"), 2, Some(&v1));
        assert!(v2.lists["A"].bytes.is_none());
        assert_eq!(v2.lists["A"].hash, v1.lists["A"].hash);
        commit(&mut store, 2, &v2);
        assert_eq!(bytes_in(&store, "lists"), lists_before);
        let doc_growth = bytes_in(&store, "docs") - docs_before;
        assert!(
            doc_growth < 400,
            "a flip wrote {doc_growth} bytes of documents"
        );
        // Both versions load whole.
        let at1 = store.services_at(1).unwrap();
        let at2 = store.services_at(2).unwrap();
        assert_eq!(at1["web"].spec.clusters["A"].id.ids.nums.to_vec(), ids);
        assert_eq!(at2["web"].spec.clusters["A"].id.ids.nums.to_vec(), ids);
        assert_eq!(at2["web"].spec.clusters["A"].id.interval.len(), 1);
        assert_eq!(
            at2["web"].spec.clusters["A"].status,
            graylane_strategy::State::R
        );
        assert_eq!(*at2["web"].spec, spec(ids, "R"));
    }

    #[test]
    fn stores_of_earlier_releases_still_load() {
        let store = Store::memory().unwrap();
        // A whole strategy in `docs`, a version row without lists (as earlier releases wrote).
        let whole = spec(vec![1, 2, 3], "Y");
        let json = serde_json::to_vec(&whole).unwrap();
        store
            .conn
            .execute_batch("INSERT INTO versions VALUES (1, 0, 'old', '[]')")
            .unwrap();
        store
            .conn
            .execute(
                "INSERT INTO docs (hash, json) VALUES ('h', ?1)",
                params![json],
            )
            .unwrap();
        store
            .conn
            .execute_batch(
                "INSERT INTO version_services (version, service, hash, changed_at) VALUES (1, 'web', 'h', 1)",
            )
            .unwrap();
        assert_eq!(*store.services_at(1).unwrap()["web"].spec, whole);
    }

    #[tokio::test]
    async fn readers_see_commits_on_their_own_connection() {
        let mut store = Store::memory().unwrap();
        let reader = store.reader().unwrap();
        commit(
            &mut store,
            1,
            &StoredService::new(spec(vec![1], "Y"), 1, None),
        );
        assert_eq!(reader.history(10).await.unwrap().len(), 1);
        assert_eq!(reader.operations(10).await.unwrap().len(), 1);
        assert!(reader.strategies_at(1).await.unwrap().is_some());
        assert!(reader.strategies_at(7).await.unwrap().is_none());
    }
}

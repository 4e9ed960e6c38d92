//! The logical replication slot the WAL source reads (`--source wal`): its
//! creation with the publication, its status (retained WAL, confirmed
//! position, lag), its removal, and the checks that turn PostgreSQL's
//! refusals into errors that say what to fix.
//!
//! ```text
//!  outbox-relay slot create ─► preflight (SQL): wal_level, REPLICATION
//!                            ─► a replication connection: IDENTIFY_SYSTEM
//!                               (pg_hba, poolers, TLS, the password)
//!                            ─► CREATE PUBLICATION <p> FOR TABLE outbox
//!                               WITH (publish = 'insert')
//!                            ─► pg_create_logical_replication_slot(<s>, 'pgoutput')
//!  outbox-relay slot status ─► pg_replication_slots: retained WAL, lag, holder
//!  outbox-relay slot drop   ─► refused while a reader holds the slot
//! ```
//!
//! The slot and publication names come from the operator: both are checked
//! to be plain identifiers, and quoted in every statement.
//!
//! Over 400 lines because the slot's operations and the errors PostgreSQL
//! gives for them belong together: each refusal is classified where the
//! statement that meets it is.

use std::fmt;

use pgwire_replication::{PgWireError, ReplicationClient, ReplicationConfig, TlsConfig};
use sqlx::PgPool;

/// The slot's default name.
pub const DEFAULT_SLOT: &str = "outbox_relay";
/// The publication's default name.
pub const DEFAULT_PUBLICATION: &str = "outbox_relay";

/// Why a slot operation failed; each says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SlotError {
    /// A slot or publication name that is not a plain identifier.
    #[error(
        "{what} name {name:?} is not valid: use 1 to 63 lower-case letters, digits and underscores"
    )]
    InvalidName {
        /// `slot` or `publication`.
        what: &'static str,
        /// The name given.
        name: String,
    },
    /// `wal_level` is not `logical`.
    #[error("PostgreSQL's wal_level is {actual}, not logical: set it with `ALTER SYSTEM SET wal_level = logical` and restart PostgreSQL")]
    WalLevel {
        /// The server's setting.
        actual: String,
    },
    /// The role may not open replication connections.
    #[error("role {role:?} lacks the REPLICATION attribute: run `ALTER ROLE {role} REPLICATION` as a superuser, or give the relay a role that has it")]
    NoReplication {
        /// The role of the URL.
        role: String,
    },
    /// Every replication slot is in use.
    #[error("all {max} replication slots are in use: drop an unused one (`outbox-relay slot status`, pg_replication_slots) or raise max_replication_slots and restart PostgreSQL")]
    SlotsExhausted {
        /// `max_replication_slots`.
        max: String,
    },
    /// Another connection reads the slot.
    #[error("replication slot {slot:?} is held by another connection (pid {pid}{holder}): a second reader is refused by design; stop it, or wait for it to let go")]
    HeldByAnother {
        /// The slot.
        slot: String,
        /// The holder's backend pid.
        pid: i32,
        /// `, application_name …` when known.
        holder: String,
    },
    /// The slot exists with another output plugin.
    #[error("replication slot {slot:?} exists with the {plugin} plugin, not pgoutput: drop it (`outbox-relay slot drop --slot {slot}`) or choose another name with --slot")]
    WrongPlugin {
        /// The slot.
        slot: String,
        /// Its plugin.
        plugin: String,
    },
    /// The URL goes through a connection pooler.
    #[error("the replication connection was refused by a connection pooler ({detail}): logical replication needs a direct connection to PostgreSQL; point the URL at PostgreSQL itself")]
    ThroughPooler {
        /// What the pooler said.
        detail: String,
    },
    /// The slot does not exist.
    #[error("replication slot {slot:?} does not exist: create it with `outbox-relay slot create`")]
    NotFound {
        /// The slot.
        slot: String,
    },
    /// The URL cannot be used for a replication connection.
    #[error("the database URL cannot be used for replication: {0}")]
    Url(String),
    /// The replication connection failed otherwise.
    #[error("the replication connection failed: {0}")]
    Replication(#[source] PgWireError),
    /// Any other database error.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
}

impl From<sqlx::Error> for SlotError {
    fn from(e: sqlx::Error) -> Self {
        Self::Database(e)
    }
}

/// Checks that `name` is a plain identifier (slot names must be; the
/// publication's is held to the same rule, and quoted anyway).
pub fn check_name(what: &'static str, name: &str) -> Result<(), SlotError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(SlotError::InvalidName {
            what,
            name: name.to_string(),
        })
    }
}

/// Where and as whom to open the replication connection, from the database
/// URL. The password is never printed.
#[derive(Clone)]
pub struct ReplicationTarget {
    host: String,
    port: u16,
    user: String,
    password: String,
    database: String,
    tls: TlsConfig,
}

impl fmt::Debug for ReplicationTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}/{} as {}",
            self.host, self.port, self.database, self.user
        )
    }
}

impl ReplicationTarget {
    /// Reads a `postgres://` URL. `sslmode` (`disable`, `prefer`,
    /// `require`, `verify-ca`, `verify-full`) and `sslrootcert` carry over;
    /// `prefer` becomes `disable` (the replication client does not fall
    /// back), so ask for `require` where TLS matters. The user must be in
    /// the URL; the environment is not read.
    pub fn from_url(url: &str) -> Result<Self, SlotError> {
        let u = url::Url::parse(url).map_err(|e| SlotError::Url(format!("not a URL ({e})")))?;
        if !matches!(u.scheme(), "postgres" | "postgresql") {
            return Err(SlotError::Url(format!(
                "scheme {:?}, expected postgres://",
                u.scheme()
            )));
        }
        let decode =
            |s: &str| percent_decode(s).map_err(|_| SlotError::Url("bad percent-encoding".into()));
        let query = |key: &str| {
            u.query_pairs()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.into_owned())
        };
        let root = query("sslrootcert").map(std::path::PathBuf::from);
        let tls = match query("sslmode").as_deref() {
            None | Some("disable" | "allow" | "prefer") => TlsConfig::disabled(),
            Some("require") => TlsConfig::require(),
            Some("verify-ca") => TlsConfig::verify_ca(root),
            Some("verify-full") => TlsConfig::verify_full(root),
            Some(other) => return Err(SlotError::Url(format!("unknown sslmode {other:?}"))),
        };
        let user = match u.username() {
            "" => {
                return Err(SlotError::Url(
                    "it names no user (postgres://user:password@host/db)".into(),
                ))
            }
            name => decode(name)?,
        };
        let password = u.password().map(decode).transpose()?.unwrap_or_default();
        let database = match u.path().trim_start_matches('/') {
            "" => user.clone(),
            db => decode(db)?,
        };
        Ok(Self {
            host: u.host_str().unwrap_or("localhost").to_string(),
            port: u.port().unwrap_or(5432),
            user,
            password,
            database,
            tls,
        })
    }

    /// The role the connection uses.
    pub fn user(&self) -> &str {
        &self.user
    }
}

/// The replication client's config for reading `slot` through
/// `publication` as `target`, with the application name `outbox-relay`.
pub fn replication_config(
    target: &ReplicationTarget,
    slot: &str,
    publication: &str,
) -> ReplicationConfig {
    ReplicationConfig::new(
        target.host.clone(),
        target.user.clone(),
        target.password.clone(),
        target.database.clone(),
        slot,
        publication,
    )
    .with_port(target.port)
    .with_tls(target.tls.clone())
    .with_application_name(crate::slot_lease::APPLICATION_NAME)
}

fn percent_decode(s: &str) -> Result<String, ()> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or(())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| ())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ())
}

/// Checks, with plain SQL, what a WAL source needs from the server and the
/// role: `wal_level = logical` and the REPLICATION attribute.
pub async fn preflight(pool: &PgPool) -> Result<(), SlotError> {
    let (level, role, may): (String, String, bool) = sqlx::query_as(
        "SELECT current_setting('wal_level'), current_user::text, \
                (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user)",
    )
    .fetch_one(pool)
    .await?;
    if level != "logical" {
        return Err(SlotError::WalLevel { actual: level });
    }
    if !may {
        return Err(SlotError::NoReplication { role });
    }
    Ok(())
}

/// Opens a replication connection and runs `IDENTIFY_SYSTEM`: proves that
/// pg_hba, the password, TLS and the path (no pooler) allow replication.
/// Returns the server's current WAL position.
pub async fn probe_replication(target: &ReplicationTarget) -> Result<String, SlotError> {
    let mut client =
        ReplicationClient::connect_gated(replication_config(target, "unused", "unused"))
            .await
            .map_err(|e| explain(e, target, ""))?;
    let identified = client.identify_system().await;
    client.abort();
    identified
        .map(|id| id.xlogpos.to_string())
        .map_err(|e| explain(e, target, ""))
}

/// Turns a replication client error on `slot` into the error that says
/// what to fix: a pooler in the path, a role without REPLICATION, a slot
/// that another connection reads; anything else as it came.
pub fn explain(e: PgWireError, target: &ReplicationTarget, slot: &str) -> SlotError {
    let text = e.to_string();
    if text.contains("unsupported startup parameter") {
        return SlotError::ThroughPooler { detail: text };
    }
    if text.contains("replication role") || text.contains("start WAL sender") {
        return SlotError::NoReplication {
            role: target.user.clone(),
        };
    }
    if let Some(pid) = text.split("is active for PID ").nth(1).and_then(|rest| {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        rest[..digits].parse().ok()
    }) {
        return SlotError::HeldByAnother {
            slot: slot.to_string(),
            pid,
            holder: String::new(),
        };
    }
    SlotError::Replication(e)
}

/// What [`create`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Created {
    /// The slot was created now (false: it existed, with pgoutput).
    pub slot: bool,
    /// The publication was created now (false: it existed).
    pub publication: bool,
    /// What the publication sends besides inserts (`update`, `delete`,
    /// `truncate`): nothing when the relay created it. The relay reads
    /// only inserts, but the server encodes and sends the rest, the
    /// relay's own deletes among them ([`extra_actions`]).
    pub extra_actions: Vec<&'static str>,
}

/// What `publication` sends besides inserts: the relay ignores those, and
/// the server spends its walsender's time on them (one delete for each
/// published row). `ALTER PUBLICATION <p> SET (publish = 'insert')` stops
/// that. Empty if the publication does not exist.
pub async fn extra_actions(
    pool: &PgPool,
    publication: &str,
) -> Result<Vec<&'static str>, sqlx::Error> {
    let row: Option<(bool, bool, bool)> = sqlx::query_as(
        "SELECT pubupdate, pubdelete, pubtruncate FROM pg_publication WHERE pubname = $1",
    )
    .bind(publication)
    .fetch_optional(pool)
    .await?;
    let Some((update, delete, truncate)) = row else {
        return Ok(Vec::new());
    };
    Ok([
        (update, "update"),
        (delete, "delete"),
        (truncate, "truncate"),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect())
}

/// What to tell an operator whose publication sends `extra` besides
/// inserts (see [`extra_actions`]).
pub fn extra_actions_advice(publication: &str, extra: &[&str]) -> String {
    format!(
        "publication {publication} also publishes {}: the relay reads only inserts, and the \
         server sends it a delete for every row it publishes; \
         ALTER PUBLICATION \"{publication}\" SET (publish = 'insert') stops that",
        extra.join(", ")
    )
}

/// Creates the publication (on the `outbox` table) and the slot, each only
/// if missing. Checks [`preflight`] first.
pub async fn create(pool: &PgPool, slot: &str, publication: &str) -> Result<Created, SlotError> {
    check_name("slot", slot)?;
    check_name("publication", publication)?;
    preflight(pool).await?;
    let have_publication: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT FROM pg_publication WHERE pubname = $1)")
            .bind(publication)
            .fetch_one(pool)
            .await?;
    if !have_publication {
        sqlx::query(&format!(
            "CREATE PUBLICATION \"{publication}\" FOR TABLE outbox WITH (publish = 'insert')"
        ))
        .execute(pool)
        .await?;
    }
    let existing: Option<String> =
        sqlx::query_scalar("SELECT plugin::text FROM pg_replication_slots WHERE slot_name = $1")
            .bind(slot)
            .fetch_optional(pool)
            .await?;
    let created = match existing {
        Some(plugin) if plugin == "pgoutput" => false,
        Some(plugin) => {
            return Err(SlotError::WrongPlugin {
                slot: slot.to_string(),
                plugin,
            })
        }
        None => {
            let made = sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
                .bind(slot)
                .execute(pool)
                .await;
            match made {
                Ok(_) => true,
                Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("53400") => {
                    let max: String = sqlx::query_scalar("SHOW max_replication_slots")
                        .fetch_one(pool)
                        .await?;
                    return Err(SlotError::SlotsExhausted { max });
                }
                // Created meanwhile by another `slot create`: fine.
                Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42710") => false,
                Err(e) => return Err(e.into()),
            }
        }
    };
    Ok(Created {
        slot: created,
        publication: !have_publication,
        extra_actions: extra_actions(pool, publication).await?,
    })
}

/// A slot as `pg_replication_slots` shows it, with the WAL it keeps.
#[derive(Debug, Clone, serde::Serialize)]
#[non_exhaustive]
pub struct SlotStatus {
    /// The slot.
    pub slot: String,
    /// Its output plugin.
    pub plugin: String,
    /// A connection reads it now.
    pub active: bool,
    /// That connection's backend pid.
    pub active_pid: Option<i32>,
    /// The oldest WAL the slot keeps.
    pub restart_lsn: Option<String>,
    /// What the reader confirmed: everything before it is published.
    pub confirmed_flush_lsn: Option<String>,
    /// The server's current WAL position.
    pub current_lsn: String,
    /// WAL kept on disk for this slot, in bytes (current − restart).
    pub retained_wal_bytes: Option<i64>,
    /// WAL written since the confirmed position, in bytes.
    pub lag_bytes: Option<i64>,
    /// PostgreSQL's verdict: `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
}

/// The slot's status, or `None` if it does not exist.
pub async fn status(pool: &PgPool, slot: &str) -> Result<Option<SlotStatus>, SlotError> {
    check_name("slot", slot)?;
    type Row = (
        String,
        String,
        bool,
        Option<i32>,
        Option<String>,
        Option<String>,
        String,
        Option<i64>,
        Option<i64>,
        Option<String>,
    );
    let row: Option<Row> = sqlx::query_as(
        "SELECT slot_name::text, plugin::text, active, active_pid, restart_lsn::text, \
                confirmed_flush_lsn::text, pg_current_wal_lsn()::text, \
                pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, \
                pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint, wal_status \
         FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| SlotStatus {
        slot: r.0,
        plugin: r.1,
        active: r.2,
        active_pid: r.3,
        restart_lsn: r.4,
        confirmed_flush_lsn: r.5,
        current_lsn: r.6,
        retained_wal_bytes: r.7,
        lag_bytes: r.8,
        wal_status: r.9,
    }))
}

/// What [`drop`] did besides dropping the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Dropped {
    /// The publication named was dropped (false: none was asked for, or
    /// none of that name existed).
    pub publication: bool,
}

/// Drops the slot (and the publication, when asked), for decommissioning.
/// Refused while a reader holds the slot: stop the relays first.
pub async fn drop(
    pool: &PgPool,
    slot: &str,
    publication: Option<&str>,
) -> Result<Dropped, SlotError> {
    check_name("slot", slot)?;
    let Some(st) = status(pool, slot).await? else {
        return Err(SlotError::NotFound {
            slot: slot.to_string(),
        });
    };
    if let (true, Some(pid)) = (st.active, st.active_pid) {
        return Err(held(pool, slot, pid).await);
    }
    match sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(slot)
        .execute(pool)
        .await
    {
        Ok(_) => {}
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("55006") => {
            let pid = status(pool, slot)
                .await?
                .and_then(|s| s.active_pid)
                .unwrap_or_default();
            return Err(held(pool, slot, pid).await);
        }
        Err(e) => return Err(e.into()),
    }
    let mut dropped = Dropped { publication: false };
    if let Some(publication) = publication {
        check_name("publication", publication)?;
        dropped.publication =
            sqlx::query_scalar("SELECT EXISTS (SELECT FROM pg_publication WHERE pubname = $1)")
                .bind(publication)
                .fetch_one(pool)
                .await?;
        sqlx::query(&format!("DROP PUBLICATION IF EXISTS \"{publication}\""))
            .execute(pool)
            .await?;
    }
    Ok(dropped)
}

/// The error for a slot held by `pid`, naming the holder if visible.
pub(crate) async fn held(pool: &PgPool, slot: &str, pid: i32) -> SlotError {
    let who: Option<(Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT application_name, client_addr::text FROM pg_stat_activity WHERE pid = $1",
    )
    .bind(pid)
    .fetch_optional(pool)
    .await
    .ok()
    .flatten();
    let holder = match who {
        Some((app, addr)) => format!(
            ", application_name {:?}, client {}",
            app.unwrap_or_default(),
            addr.unwrap_or_else(|| "local".into())
        ),
        None => String::new(),
    };
    SlotError::HeldByAnother {
        slot: slot.to_string(),
        pid,
        holder,
    }
}

//! `walrelay check`: verifies a setup without streaming and lists every
//! problem it finds, each with its fix.
//!
//! It reads only: nothing is created, no slot is touched. The checks are the
//! ones `run` would trip over, found all at once instead of one per restart.
use std::fmt;
use std::io::{self, Write};
use std::time::Duration;

use crate::config::RunConfig;
use crate::failover;
use crate::metrics::Metrics;
use crate::pg::lsn::Lsn;
use crate::pg::metadata::{self, PublicationState, Restriction};
use crate::pg::params::SslMode;
use crate::pg::primary;
use crate::sink::{Sink, SinkError, producer_config};
use crate::slot;

/// How long the broker check waits for the cluster.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// What was checked.
    pub subject: &'static str,
    /// What was found.
    pub found: String,
    /// How to fix it; `None` when all is well.
    pub fix: Option<String>,
}

impl Finding {
    pub(crate) fn ok(subject: &'static str, found: impl Into<String>) -> Self {
        Finding {
            subject,
            found: found.into(),
            fix: None,
        }
    }

    pub(crate) fn problem(
        subject: &'static str,
        found: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Finding {
            subject,
            found: found.into(),
            fix: Some(fix.into()),
        }
    }

    /// Whether this is a problem.
    pub fn is_problem(&self) -> bool {
        self.fix.is_some()
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.fix {
            None => write!(f, "ok       {}: {}", self.subject, self.found),
            Some(fix) => write!(
                f,
                "PROBLEM  {}: {}\n         fix: {fix}",
                self.subject, self.found
            ),
        }
    }
}

/// Runs every check and returns the findings in order.
pub async fn findings(config: &RunConfig) -> Vec<Finding> {
    let mut out = Vec::new();
    match primary::metadata(&config.postgres).await {
        Ok((client, host)) => {
            out.push(Finding::ok(
                "postgres",
                format!(
                    "connected to {} (the primary{})",
                    host.redacted_url(),
                    if config.postgres.hosts.len() > 1 {
                        format!(" of {}", config.postgres.redacted_url())
                    } else {
                        String::new()
                    }
                ),
            ));
            out.push(tls_finding(config));
            out.extend(auth_finding(&client));
            if let Err(e) = postgres_findings(&client, config, &mut out).await {
                out.push(Finding::problem(
                    "postgres",
                    format!("a check query failed: {e}"),
                    "see the error",
                ));
            }
        }
        Err(e) => {
            out.push(Finding::problem(
                "postgres",
                format!(
                    "no usable primary at {}: {e}",
                    config.postgres.redacted_url()
                ),
                "check --postgres-url, the password and pg_hba.conf; walrelay streams from a primary only",
            ));
            out.push(tls_finding(config));
        }
    }
    out.extend(kafka_property_findings(config));
    out.push(kafka_finding(config).await);
    out
}

/// The fix for a connection whose server is not verified.
const VERIFY_FULL: &str = "use sslmode=verify-full with sslrootcert=<the certificate of the CA \
     that signed the server's> in --postgres-url (sslrootcert=system for a certificate from a \
     public CA)";

/// How far the server's identity is verified: below verify-ca, whoever
/// answers the connection can pose as PostgreSQL.
fn tls_finding(config: &RunConfig) -> Finding {
    let found = match config.postgres.sslmode {
        SslMode::VerifyFull => {
            return Finding::ok(
                "tls",
                "sslmode=verify-full: the server's certificate and host name are verified",
            );
        }
        SslMode::VerifyCa => {
            return Finding::ok(
                "tls",
                "sslmode=verify-ca: the server's certificate chain is verified (not its host name)",
            );
        }
        SslMode::Disable => {
            "sslmode=disable: no TLS; the replication stream crosses the network in clear, and \
             whoever answers can pose as PostgreSQL"
        }
        SslMode::Prefer => {
            "sslmode=prefer: TLS only if the server (or whoever answers) offers it, and its \
             certificate is not verified, so a man in the middle can decline TLS or present his own"
        }
        SslMode::Require => {
            "sslmode=require: the server's certificate is verified only while a root certificate \
             file exists (~/.postgresql/root.crt or sslrootcert), and never its host name"
        }
    };
    Finding::problem("tls", found, VERIFY_FULL)
}

/// How the server authenticated walrelay: a method that reveals the password
/// (or a hash that stands for it) is a finding.
fn auth_finding(client: &metadata::Client) -> Option<Finding> {
    let method = client.auth_method()?;
    Some(if method.weaker_than_scram() {
        Finding::problem(
            "authentication",
            format!(
                "PostgreSQL asked for {method} authentication, which hands whoever answers the \
                 password (cleartext) or a hash that logs in as the role (md5)"
            ),
            "use scram-sha-256 for this role in pg_hba.conf; with password_encryption = \
             'scram-sha-256', set its password again (ALTER ROLE ... PASSWORD), since an MD5 \
             hash cannot serve SCRAM",
        )
    } else {
        Finding::ok("authentication", method.to_string())
    })
}

/// Producer properties that weaken the broker connection's protection.
fn kafka_property_findings(config: &RunConfig) -> Vec<Finding> {
    config
        .kafka_properties
        .weakenings()
        .into_iter()
        .map(|w| Finding::problem("kafka security", w.to_string(), w.fix))
        .collect()
}

/// Prints the findings and a summary; returns whether there was no problem.
pub fn report(findings: &[Finding], out: &mut impl Write) -> io::Result<bool> {
    for finding in findings {
        writeln!(out, "{finding}")?;
    }
    let problems = findings.iter().filter(|f| f.is_problem()).count();
    if problems == 0 {
        writeln!(out, "\nall {} checks passed", findings.len())?;
    } else {
        writeln!(out, "\n{problems} problem(s) found")?;
    }
    Ok(problems == 0)
}

async fn postgres_findings(
    client: &crate::pg::metadata::Client,
    config: &RunConfig,
    out: &mut Vec<Finding>,
) -> Result<(), crate::pg::metadata::MetadataError> {
    let settings = client
        .query_one(
            "SELECT current_setting('wal_level'),
                    current_setting('max_replication_slots')::int,
                    current_setting('max_wal_senders')::int,
                    (SELECT count(*)::int FROM pg_replication_slots),
                    (SELECT count(*)::int FROM pg_stat_replication),
                    current_setting('server_version')",
            &[],
        )
        .await?;
    let (wal_level, max_slots, max_senders, slots, senders, version): (
        String,
        i32,
        i32,
        i32,
        i32,
        String,
    ) = (
        settings.get(0),
        settings.get(1),
        settings.get(2),
        settings.get(3),
        settings.get(4),
        settings.get(5),
    );
    out.push(if wal_level == "logical" {
        Finding::ok("wal_level", format!("logical (PostgreSQL {version})"))
    } else {
        Finding::problem(
            "wal_level",
            format!("{wal_level}: logical decoding is off"),
            "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL",
        )
    });

    let slot_state = slot::inspect(client, &config.slot).await.ok().flatten();
    // A slot that exists already holds its place; a new one needs a free one.
    let slots_needed = i32::from(slot_state.is_none());
    out.push(if slots + slots_needed <= max_slots {
        Finding::ok(
            "max_replication_slots",
            format!("{slots} of {max_slots} in use"),
        )
    } else {
        Finding::problem(
            "max_replication_slots",
            format!(
                "{slots} of {max_slots} in use, none left for slot {:?}",
                config.slot
            ),
            "raise max_replication_slots (restart needed) or drop an unused slot",
        )
    });
    out.push(if senders < max_senders {
        Finding::ok(
            "max_wal_senders",
            format!("{senders} of {max_senders} in use"),
        )
    } else {
        Finding::problem(
            "max_wal_senders",
            format!("all {max_senders} WAL senders are in use"),
            "raise max_wal_senders (restart needed)",
        )
    });

    out.push(publication_finding(client, config).await);

    out.push(table_finding(client, config).await?);
    out.extend(role_findings(client, config).await?);
    // The checkpoint's timeline: public, unlike IDENTIFY_SYSTEM, which needs
    // the REPLICATION attribute whose absence is reported above.
    let timeline: Option<i32> = client
        .query_one("SELECT timeline_id FROM pg_control_checkpoint()", &[])
        .await
        .ok()
        .map(|row| row.get(0));
    let timeline = timeline.and_then(|t| u32::try_from(t).ok()).unwrap_or(1);
    let flags = slot::failover_flags(client, &config.slot).await?;
    out.push(idle_timeout_finding(
        crate::source::server_major(&version),
        slot::idle_timeout(client).await?,
        config.expected_max_downtime,
        slot_state.as_ref(),
    ));
    out.push(slot_finding(config, slot_state, timeline));
    out.extend(failover::chain_findings(client, config, flags.map(|f| f.failover)).await?);
    Ok(())
}

async fn publication_finding(client: &crate::pg::metadata::Client, config: &RunConfig) -> Finding {
    let needed = config.mapping.needed_columns();
    match metadata::publication_state(client, &config.publication, &config.table, &needed).await {
        Ok(PublicationState::Ok) => Finding::ok(
            "publication",
            format!(
                "{:?} publishes the inserts of {}",
                config.publication, config.table
            ),
        ),
        Ok(PublicationState::Missing) => Finding::problem(
            "publication",
            format!("{:?} does not exist", config.publication),
            "apply sql/003_publication.sql",
        ),
        Ok(PublicationState::TableNotIncluded) => Finding::problem(
            "publication",
            format!("{:?} does not include {}", config.publication, config.table),
            format!(
                "ALTER PUBLICATION {} ADD TABLE {}",
                config.publication, config.table
            ),
        ),
        Ok(PublicationState::InsertsNotPublished) => Finding::problem(
            "publication",
            format!("{:?} does not publish inserts", config.publication),
            format!(
                "ALTER PUBLICATION {} SET (publish = 'insert')",
                config.publication
            ),
        ),
        Ok(PublicationState::Restricted(restriction)) => Finding::problem(
            "publication",
            format!(
                "{:?} {}",
                config.publication,
                restriction.describe(&config.table)
            ),
            Restriction::fix(&config.publication, &config.table),
        ),
        Err(e) => Finding::problem("publication", e.to_string(), "see the error"),
    }
}

async fn table_finding(
    client: &crate::pg::metadata::Client,
    config: &RunConfig,
) -> Result<Finding, crate::pg::metadata::MetadataError> {
    let rows = client
        .query(
            "SELECT a.attname::text FROM pg_attribute a
               JOIN pg_class c ON c.oid = a.attrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&config.table.schema, &config.table.name],
        )
        .await?;
    if rows.is_empty() {
        return Ok(Finding::problem(
            "table",
            format!("{} does not exist", config.table),
            "apply sql/001_events.sql, or point --table at the events table",
        ));
    }
    let columns: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let needed = config.mapping.needed_columns();
    let missing: Vec<&str> = needed
        .iter()
        .copied()
        .filter(|c| !columns.iter().any(|have| have == c))
        .collect();
    Ok(if missing.is_empty() {
        Finding::ok(
            "table",
            format!("{} has the columns {}", config.table, needed.join(", ")),
        )
    } else {
        Finding::problem(
            "table",
            format!("{} lacks the column(s) {missing:?}", config.table),
            "add them (see sql/001_events.sql), or name the columns to use (--key-column, \
             --seq-column, --payload-column, --type-column, --header-name, --topic)",
        )
    })
}

async fn role_findings(
    client: &crate::pg::metadata::Client,
    config: &RunConfig,
) -> Result<Vec<Finding>, crate::pg::metadata::MetadataError> {
    let role = client
        .query_one(
            "SELECT current_user::text, rolreplication OR rolsuper,
                    coalesce(has_table_privilege(to_regclass(format('%I.%I', $1::text, $2::text)), 'SELECT'), false)
               FROM pg_roles WHERE rolname = current_user",
            &[&config.table.schema, &config.table.name],
        )
        .await?;
    let (user, replication, select): (String, bool, bool) = (role.get(0), role.get(1), role.get(2));
    Ok(vec![
        if replication {
            Finding::ok("role", format!("{user} may replicate"))
        } else {
            Finding::problem(
                "role",
                format!("{user} lacks the REPLICATION attribute"),
                format!("ALTER ROLE {user} REPLICATION (see sql/004_role.sql)"),
            )
        },
        if select {
            Finding::ok("role", format!("{user} may SELECT from {}", config.table))
        } else {
            Finding::problem(
                "role",
                format!("{user} may not SELECT from {}", config.table),
                format!("GRANT SELECT ON {} TO {user}", config.table),
            )
        },
    ])
}

/// PostgreSQL 18's `idle_replication_slot_timeout` against the longest time
/// every walrelay may be down (`--expected-max-downtime`): an outage longer
/// than the timeout gets the slot invalidated at the next checkpoint.
/// Without the flag a timeout is a problem, since check cannot tell whether
/// it is long enough.
fn idle_timeout_finding(
    major: Option<u32>,
    timeout: Option<Duration>,
    expected: Option<Duration>,
    state: Option<&slot::SlotState>,
) -> Finding {
    const SUBJECT: &str = "slot idle timeout";
    let Some(timeout) = timeout else {
        return Finding::ok(
            SUBJECT,
            match major {
                Some(major) if major < 18 => {
                    format!("PostgreSQL {major} never invalidates a slot for being unused")
                }
                _ => "idle_replication_slot_timeout = 0: a slot is never invalidated for being unused"
                    .to_owned(),
            },
        );
    };
    let shown = |d: Duration| humantime::format_duration(d).to_string();
    let disable = "ALTER SYSTEM SET idle_replication_slot_timeout = 0; SELECT pg_reload_conf();";
    // How long the slot has been unused already (17+ record it), unless it
    // is invalidated (the slot finding reports that) or streamed from.
    let unused = state
        .filter(|s| !s.active && s.invalidation_reason.is_none())
        .and_then(|s| Some((s.inactive_seconds?, s.inactive_since.clone()?)))
        .map(|(secs, since)| (Duration::from_secs(u64::try_from(secs).unwrap_or(0)), since));
    if let Some((idle, since)) = &unused
        && *idle >= timeout
    {
        return Finding::problem(
            SUBJECT,
            format!(
                "the slot has been unused for {} (since {since}), longer than \
                 idle_replication_slot_timeout = {}: the next checkpoint invalidates it",
                shown(*idle),
                shown(timeout)
            ),
            format!("start walrelay now, or {disable}"),
        );
    }
    let left = unused
        .map(|(idle, since)| {
            format!(
                "; the slot has been unused for {} (since {since}), invalidated in {} unless \
                 walrelay streams from it before",
                shown(idle),
                shown(timeout.saturating_sub(idle))
            )
        })
        .unwrap_or_default();
    match expected {
        None => Finding::problem(
            SUBJECT,
            format!(
                "idle_replication_slot_timeout = {}: once every walrelay has been down that long, \
                 the next checkpoint invalidates the slot{left}",
                shown(timeout)
            ),
            format!(
                "give --expected-max-downtime (the longest time every walrelay may be down) to \
                 check the timeout against, or {disable}"
            ),
        ),
        Some(expected) if timeout < expected => Finding::problem(
            SUBJECT,
            format!(
                "idle_replication_slot_timeout = {} is shorter than --expected-max-downtime {}: \
                 an outage that long gets the slot invalidated{left}",
                shown(timeout),
                shown(expected)
            ),
            format!(
                "ALTER SYSTEM SET idle_replication_slot_timeout = '{}s'; SELECT pg_reload_conf(); \
                 (0 turns it off)",
                expected.as_secs()
            ),
        ),
        Some(expected) => Finding::ok(
            SUBJECT,
            format!(
                "idle_replication_slot_timeout = {} covers --expected-max-downtime {}{left}",
                shown(timeout),
                shown(expected)
            ),
        ),
    }
}

fn slot_finding(config: &RunConfig, state: Option<slot::SlotState>, timeline: u32) -> Finding {
    let name = &config.slot;
    let Some(state) = state else {
        return if config.create_slot
            && timeline > 1
            && config.new_slot_on_timeline != Some(timeline)
        {
            Finding::problem(
                "slot",
                format!(
                    "{name:?} does not exist, and this server was promoted or restored (timeline \
                     {timeline}): a missing slot may be one a failover lost, so run will not create it"
                ),
                format!(
                    "if the slot was lost, fix the failover setup first (README, \"Failover\"); \
                     then, or on a first start on this cluster, run with --new-slot-on-timeline {timeline}"
                ),
            )
        } else if config.create_slot {
            Finding::ok(
                "slot",
                format!("{name:?} does not exist yet; run will create it"),
            )
        } else {
            Finding::problem(
                "slot",
                format!("{name:?} does not exist and --create-slot=false"),
                format!(
                    "SELECT pg_create_logical_replication_slot('{name}', 'pgoutput'), or allow walrelay to"
                ),
            )
        };
    };
    if let Some(problem) = state.problem(name, &config.postgres.dbname) {
        return Finding::problem("slot", problem.to_string(), "as the message says");
    }
    let confirmed = state.confirmed_flush_lsn.unwrap_or(Lsn::ZERO);
    match (state.active, state.active_pid) {
        (true, Some(pid)) => Finding::problem(
            "slot",
            format!("{name:?} is active for PID {pid} (confirmed to {confirmed})"),
            format!(
                "another walrelay streams from it; if PID {pid} is stale, SELECT pg_terminate_backend({pid})"
            ),
        ),
        _ => Finding::ok(
            "slot",
            format!("{name:?} is free, confirmed to {confirmed}"),
        ),
    }
}

async fn kafka_finding(config: &RunConfig) -> Finding {
    let producer = match producer_config(&config.kafka_brokers, &config.kafka_properties) {
        Ok(c) => c,
        Err(e) => return Finding::problem("kafka", e.to_string(), "fix --kafka-property"),
    };
    let sink = match Sink::new(&producer, Lsn::ZERO, Metrics::new(), None, None) {
        Ok(sink) => sink,
        Err(e) => return Finding::problem("kafka", e.to_string(), "fix --kafka-property"),
    };
    let Some(topic) = config.mapping.topic.fixed() else {
        return match sink.check_cluster(BROKER_TIMEOUT).await {
            Err(e) => unreachable_finding(config, &e.to_string()),
            Ok(()) => Finding::ok(
                "kafka",
                format!(
                    "{} reachable; topics of template {} are checked when first used",
                    config.kafka_brokers, config.mapping.topic
                ),
            ),
        };
    };
    match sink.check_topic(topic, BROKER_TIMEOUT).await {
        Ok(()) => Finding::ok(
            "kafka",
            format!("{} reachable, topic {topic:?} exists", config.kafka_brokers),
        ),
        Err(SinkError::Unreachable(e)) => unreachable_finding(config, &e.to_string()),
        Err(SinkError::TopicMissing(_)) => Finding::problem(
            "kafka",
            format!("topic {topic:?} does not exist"),
            format!("kafka-topics.sh --create --topic {topic} --partitions N, or fix --topic"),
        ),
        Err(e) => Finding::problem("kafka", e.to_string(), "see the error"),
    }
}

fn unreachable_finding(config: &RunConfig, error: &str) -> Finding {
    Finding::problem(
        "kafka",
        format!(
            "cannot reach {} within {BROKER_TIMEOUT:?}: {error}",
            config.kafka_brokers
        ),
        "check --kafka-brokers, the network and --kafka-property security settings",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unused_for(secs: i64) -> slot::SlotState {
        slot::SlotState {
            inactive_since: Some("2026-01-01 00:00:00+00".into()),
            inactive_seconds: Some(secs),
            ..slot::SlotState::example()
        }
    }

    #[test]
    fn the_idle_timeout_is_held_against_the_expected_downtime() {
        let hour = Duration::from_secs(3600);
        let day = 24 * hour;
        let finding =
            |timeout, expected, state| idle_timeout_finding(Some(18), timeout, expected, state);
        // Off, or a server without it: nothing can invalidate an unused slot.
        assert!(!finding(None, Some(day), None).is_problem());
        let older = idle_timeout_finding(Some(17), None, None, None);
        assert!(
            !older.is_problem() && older.found.contains("PostgreSQL 17"),
            "{older}"
        );
        // A timeout nobody compared with an outage.
        let unknown = finding(Some(day), None, None);
        assert!(
            unknown.is_problem()
                && unknown.to_string().contains("--expected-max-downtime")
                && unknown
                    .to_string()
                    .contains("idle_replication_slot_timeout = 0"),
            "{unknown}"
        );
        // Shorter than the outage: the fix raises it to the outage.
        let short = finding(Some(hour), Some(day), None);
        assert!(
            short.is_problem()
                && short
                    .found
                    .contains("1h is shorter than --expected-max-downtime 1day")
                && short
                    .to_string()
                    .contains("idle_replication_slot_timeout = '86400s'"),
            "{short}"
        );
        let covered = finding(Some(day), Some(day), None);
        assert!(!covered.is_problem(), "{covered}");
        // An unused slot: how long is left, or that the next checkpoint
        // invalidates it whatever the flag says.
        let state = unused_for(600);
        let counting = finding(Some(day), Some(hour), Some(&state));
        assert!(
            !counting.is_problem() && counting.found.contains("unused for 10m"),
            "{counting}"
        );
        let state = unused_for(90_000);
        let overdue = finding(Some(day), Some(hour), Some(&state));
        assert!(
            overdue.is_problem() && overdue.found.contains("the next checkpoint invalidates it"),
            "{overdue}"
        );
    }
}

//! `walrelay check`: verifies a setup without streaming and lists every
//! problem it finds, each with its fix.
//!
//! It reads only: nothing is created, no slot is touched. The checks are the
//! ones `run` would trip over, found all at once instead of one per restart.
use std::fmt;
use std::io::{self, Write};
use std::time::Duration;

use crate::config::RunConfig;
use crate::event::{KEY_COLUMN, SEQ_NR_COLUMN, VALUE_COLUMN};
use crate::failover;
use crate::metrics::Metrics;
use crate::pg::lsn::Lsn;
use crate::pg::metadata::{self, PublicationState, Restriction};
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
            if let Err(e) = postgres_findings(&client, config, &mut out).await {
                out.push(Finding::problem(
                    "postgres",
                    format!("a check query failed: {e}"),
                    "see the error",
                ));
            }
        }
        Err(e) => out.push(Finding::problem(
            "postgres",
            format!(
                "no usable primary at {}: {e}",
                config.postgres.redacted_url()
            ),
            "check --postgres-url, the password and pg_hba.conf; walrelay streams from a primary only",
        )),
    }
    out.extend(kafka_property_findings(config));
    out.push(kafka_finding(config).await);
    out
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
    out.push(slot_finding(config, slot_state, timeline));
    out.extend(failover::chain_findings(client, config, flags.map(|f| f.failover)).await?);
    Ok(())
}

async fn publication_finding(client: &crate::pg::metadata::Client, config: &RunConfig) -> Finding {
    let mut needed = vec![KEY_COLUMN, VALUE_COLUMN, SEQ_NR_COLUMN];
    needed.extend(config.topic.columns());
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
    let mut needed = vec![
        KEY_COLUMN.to_owned(),
        VALUE_COLUMN.to_owned(),
        SEQ_NR_COLUMN.to_owned(),
    ];
    needed.extend(config.topic.columns().map(str::to_owned));
    let missing: Vec<&String> = needed.iter().filter(|c| !columns.contains(c)).collect();
    Ok(if missing.is_empty() {
        Finding::ok(
            "table",
            format!("{} has the columns {}", config.table, needed.join(", ")),
        )
    } else {
        Finding::problem(
            "table",
            format!("{} lacks the column(s) {missing:?}", config.table),
            "add them (see sql/001_events.sql), or fix --topic",
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
    let sink = match Sink::new(&producer, Lsn::ZERO, Metrics::new(), None) {
        Ok(sink) => sink,
        Err(e) => return Finding::problem("kafka", e.to_string(), "fix --kafka-property"),
    };
    let Some(topic) = config.topic.fixed() else {
        return match sink.check_cluster(BROKER_TIMEOUT).await {
            Err(e) => unreachable_finding(config, &e.to_string()),
            Ok(()) => Finding::ok(
                "kafka",
                format!(
                    "{} reachable; topics of template {} are checked when first used",
                    config.kafka_brokers, config.topic
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

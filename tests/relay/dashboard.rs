//! The Grafana dashboard (`deploy/grafana/walrelay.json`) and the alert rules
//! (`deploy/prometheus/alerts.yml`) name only metrics that walrelay exports:
//! a panel or an alert on a misspelt or renamed metric shows nothing, and
//! never fires, without any error.
use std::collections::BTreeSet;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::support::kafka::Kafka;
use crate::support::pg_versions;
use crate::support::postgres::{PgOptions, PgServer, SCRAM_PASSWORD, SCRAM_USER};
use crate::support::walrelay::{Walrelay, http_get};

/// PromQL words that are not metric names: aggregations, which may stand
/// before their `by (...)` clause rather than right before `(`, and the
/// keywords of binary operators (with [`LABEL_LISTS`]).
const KEYWORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "limitk",
    "limit_ratio",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "atan2",
];

/// Keywords followed by a parenthesised list of label names (or, for
/// `group_left` and `group_right`, by nothing).
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric names a PromQL expression selects: identifiers that are not
/// functions (followed by `(`), keywords, label names (inside `{...}` or a
/// `by (...)` list), Grafana variables (`$job`), strings, durations or numbers.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let next_non_blank = |mut j: usize| {
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        j
    };
    let skip_past = |from: usize, close: char| {
        let mut j = from;
        while j < chars.len() && chars[j] != close {
            if matches!(chars[j], '"' | '\'' | '`') {
                let quote = chars[j];
                j += 1;
                while j < chars.len() && chars[j] != quote {
                    j += usize::from(chars[j] == '\\') + 1;
                }
            }
            j += 1;
        }
        j + 1
    };
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '"' | '\'' | '`') {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += usize::from(chars[i] == '\\') + 1;
            }
            i += 1;
        } else if c == '{' {
            i = skip_past(i, '}');
        } else if c == '[' {
            i = skip_past(i, ']');
        } else if c == '$' || c.is_ascii_digit() {
            // A variable, or a number or duration (1e3, 0.99, 5m).
            i += 1;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | '.'))
            {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | ':'))
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let after = next_non_blank(i);
            if LABEL_LISTS.contains(&word.as_str()) && chars.get(after) == Some(&'(') {
                i = skip_past(after, ')');
            } else if chars.get(after) == Some(&'(')
                || KEYWORDS.contains(&word.as_str())
                || LABEL_LISTS.contains(&word.as_str())
            {
                // A function or an aggregation.
            } else {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Every `expr` of a rules file: `expr: ...` on one line, or `expr: |` and
/// the lines indented below it.
fn rule_expressions(rules: &str) -> Vec<String> {
    let mut exprs = Vec::new();
    let mut lines = rules.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(value) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let indent = line.len() - line.trim_start().len();
        let value = value.trim();
        if value == "|" || value == ">" || value == "|-" || value == ">-" {
            let mut block = String::new();
            while let Some(next) = lines.peek() {
                if !next.trim().is_empty() && next.len() - next.trim_start().len() <= indent {
                    break;
                }
                block.push_str(next.trim());
                block.push('\n');
                lines.next();
            }
            exprs.push(block);
        } else {
            exprs.push(value.to_owned());
        }
    }
    exprs
}

/// Every query of the dashboard: the panels' `expr`s, and the metric of
/// each `label_values(metric..., label)` variable query.
fn dashboard_expressions(dashboard: &serde_json::Value) -> Vec<String> {
    fn walk(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, v) in map {
                    match (key.as_str(), v) {
                        ("expr", serde_json::Value::String(expr)) => out.push(expr.clone()),
                        ("definition", serde_json::Value::String(query)) => {
                            let inner = query
                                .strip_prefix("label_values(")
                                .and_then(|q| q.rsplit_once(','))
                                .map(|(metric, _)| metric.to_owned());
                            out.push(inner.unwrap_or_else(|| {
                                panic!("a variable query that is not label_values(metric, label): {query}")
                            }));
                        }
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dashboard, &mut out);
    out
}

/// The sample names `/metrics` can hold, from its `# TYPE` lines: a
/// histogram's `_bucket`, `_sum` and `_count`, a summary's `_sum` and
/// `_count` besides its own name.
fn exported_names(body: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
        match kind {
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            "summary" => {
                names.insert(name.to_owned());
                for suffix in ["_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

#[test]
fn promql_metric_names_leave_out_functions_labels_and_keywords() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{job=~"$job",x="b_total"}[5m])))
           > 5 unless on (job) max by (job) (changes(b:c[15m] offset 1h)) > 0 or vector(0)
           and ignoring (le) d * on (x) group_left e + 2 * $__rate_interval"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["a_bucket", "b:c", "d", "e"]
    );
    assert_eq!(
        rule_expressions(
            "  - alert: A\n    expr: up == 0\n  - alert: B\n    expr: |\n      x\n      unless y\n    for: 1m\n"
        ),
        ["up == 0", "x\nunless y\n"]
    );
}

#[tokio::test]
async fn the_dashboard_and_the_alerts_name_only_exported_metrics() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/deploy/grafana/walrelay.json")).unwrap(),
    )
    .expect("deploy/grafana/walrelay.json is JSON");
    let alerts = std::fs::read_to_string(format!("{root}/deploy/prometheus/alerts.yml")).unwrap();
    let mut named = BTreeSet::new();
    for (source, exprs) in [
        (
            "deploy/grafana/walrelay.json",
            dashboard_expressions(&dashboard),
        ),
        ("deploy/prometheus/alerts.yml", rule_expressions(&alerts)),
    ] {
        assert!(
            exprs.len() > 10,
            "{source}: only {} queries found",
            exprs.len()
        );
        for expr in exprs {
            let names = metric_names(&expr);
            assert!(!names.is_empty(), "{source}: no metric in {expr:?}");
            named.extend(names.into_iter().map(|name| (name, source)));
        }
    }
    // Prometheus's own, for the scrape itself.
    named.retain(|(name, _)| name != "up");

    // PostgreSQL 17+, for synchronized_standby_slots (the standby-sync lag
    // that an alert names is exported per slot listed there).
    let pg = PgServer::start(PgOptions {
        version: pg_versions::at_least(17, "synchronized_standby_slots"),
        ..PgOptions::default()
    })
    .await;
    // A limit on the WAL a slot may keep: PostgreSQL reports safe_wal_size
    // only then, and walrelay_slot_safe_wal_size_bytes with it. A standby's
    // physical slot listed in synchronized_standby_slots: its lag is
    // walrelay_standby_sync_lag_bytes{slot}.
    pg.psql(
        "SELECT pg_create_physical_replication_slot('standby1', true); \
         ALTER SYSTEM SET max_slot_wal_keep_size = '1GB'; \
         ALTER SYSTEM SET synchronized_standby_slots = 'standby1'; \
         SELECT pg_reload_conf();",
    )
    .await;
    let kafka = Kafka::start(1, 4);
    let url = pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable");
    let (mut relay, metrics) = Walrelay::run(&url, &kafka.bootstrap(), &[]).await;

    // The slot's metrics come with the monitor's first reading (every 5 s).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = http_get(metrics, "/metrics");
        assert_eq!(status, 200);
        let exported = exported_names(&body);
        let missing: Vec<_> = named
            .iter()
            .filter(|(name, _)| !exported.contains(name))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "named but not exported: {missing:?}\n/metrics:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

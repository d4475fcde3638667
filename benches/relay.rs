//! `cargo bench --bench relay`: walrelay against PostgreSQL's own decoder.
//!
//! One run starts a throwaway PostgreSQL (the test harness's, from the local
//! server binaries) and librdkafka's mock Kafka cluster in this process, then:
//!
//! 1. **drain**: creates two pgoutput slots at the same WAL position, writes a
//!    backlog of `--events` events (`--txn-size` to a transaction), and drains
//!    it with `pg_recvlogical` to /dev/null (PostgreSQL's decode limit), then
//!    with the walrelay binary into Kafka until the slot is confirmed past the
//!    backlog; checks that Kafka holds every event;
//! 2. **latency**: a fresh walrelay while writers insert one-event
//!    transactions at each of `--rates` events/s for `--duration`; the
//!    commit-to-acknowledgement percentiles come from walrelay's own
//!    `walrelay_commit_to_ack_seconds` histogram (interpolated within its
//!    buckets, as `histogram_quantile` does), and the peak RSS of the last
//!    rate is the steady-state figure;
//! 3. **big transaction**: a fresh walrelay while one transaction of
//!    `--big-txn` events commits; its peak RSS (`VmHWM`).
//!
//! It prints a table, writes it as JSON to `--out` (`<unix time>.json` and
//! `latest.json`, compared with the previous `latest.json`), and draws the
//! latency distribution to `latency.svg` there.
// Counts and rates become f64 for display and arithmetic on figures; none is
// near 2^52. The harness's own tests are not compiled here.
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]

#[allow(dead_code, unused_imports)]
#[path = "../tests/support/pg_versions.rs"]
mod pg_versions;
#[allow(dead_code, clippy::wildcard_imports)]
#[path = "../tests/support/postgres.rs"]
mod postgres;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use plotters::prelude::*;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use serde_json::{Value, json};

use postgres::{PgOptions, PgServer};

const TOPIC: &str = "events";
const PARTITIONS: i32 = 12;
const AGGREGATES: u64 = 1000;
/// A payload of about 200 bytes; with key and headers an event is ~250 bytes
/// of row and ~330 bytes of Kafka record.
const PAYLOAD_SQL: &str = "jsonb_build_object('order_id', 'ord-' || g, 'customer_id', \
     'cust-' || (g % 7919), 'currency', 'EUR', 'total_cents', (g * 37) % 100000, \
     'lines', 3, 'channel', 'web', 'note', 'standard shipping, leave at the door')";

#[derive(Parser, Debug)]
#[command(about = "walrelay throughput, latency and memory against PostgreSQL's own decoder")]
struct Args {
    /// Events in the backlog drained by pg_recvlogical and by walrelay.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Events per transaction in the backlog.
    #[arg(long, default_value_t = 100)]
    txn_size: u64,
    /// Insert rates (events/s, one event per transaction) for the latency phase.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    rates: Vec<u64>,
    /// How long each rate runs, after a warm-up of 3 s.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Events in the single big transaction.
    #[arg(long, default_value_t = 300_000)]
    big_txn: u64,
    /// Where the JSON results and the plot go.
    #[arg(long, default_value = "target/walrelay-bench")]
    out: PathBuf,
    /// Extra `--kafka-property key=value` for walrelay (repeatable).
    #[arg(long)]
    kafka_property: Vec<String>,
    /// Round-trip delay the mock broker adds to every request, in ms: a
    /// remote or slower broker, so that the producer queue fills up.
    #[arg(long, default_value_t = 0)]
    broker_rtt_ms: u64,
    /// Phases to run (drain, latency, big-txn).
    #[arg(long, value_delimiter = ',', default_value = "drain,latency,big-txn")]
    phases: Vec<String>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(args));
}

async fn run(args: Args) {
    std::fs::create_dir_all(&args.out).expect("create the output directory");
    let previous: Option<Value> = std::fs::read(args.out.join("latest.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());

    eprintln!("starting PostgreSQL and the mock Kafka cluster");
    let pg = PgServer::start(PgOptions {
        tls: false,
        extra_conf: vec![
            "max_wal_size = '8GB'".into(),
            "checkpoint_timeout = '30min'".into(),
            "wal_sender_timeout = '60s'".into(),
        ],
        ..PgOptions::default()
    })
    .await;
    let cluster = MockCluster::new(1).expect("start the mock cluster");
    cluster
        .create_topic(TOPIC, PARTITIONS, 1)
        .expect("create the topic");
    if args.broker_rtt_ms > 0 {
        cluster
            .broker_round_trip_time(1, Duration::from_millis(args.broker_rtt_ms))
            .expect("set the broker's round-trip time");
    }
    let bench = Bench {
        brokers: cluster.bootstrap_servers(),
        pg,
        args,
    };
    let client = bench.pg.client().await;
    let version: String = client
        .query_one("SHOW server_version", &[])
        .await
        .expect("server_version")
        .get(0);

    let mut results = BTreeMap::new();
    results.insert(
        "machine".to_owned(),
        json!({
            "cpus": std::thread::available_parallelism().map_or(0, usize::from),
            "postgres": version,
            "walrelay": env!("CARGO_PKG_VERSION"),
            "kafka": "librdkafka mock cluster (in the bench process), 1 broker",
        }),
    );
    let wants = |p: &str| bench.args.phases.iter().any(|x| x == p);
    if wants("drain") {
        results.insert("drain".to_owned(), bench.drain(&client).await);
    }
    if wants("latency") {
        results.insert("latency".to_owned(), bench.latency(&client).await);
    }
    if wants("big-txn") {
        results.insert("big_txn".to_owned(), bench.big_txn(&client).await);
    }
    results.insert(
        "settings".to_owned(),
        json!({
            "events": bench.args.events,
            "txn_size": bench.args.txn_size,
            "rates": bench.args.rates,
            "duration_s": bench.args.duration.as_secs_f64(),
            "big_txn": bench.args.big_txn,
            "kafka_properties": bench.args.kafka_property,
            "broker_rtt_ms": bench.args.broker_rtt_ms,
        }),
    );
    let results = Value::Object(results.into_iter().collect());
    print_table(&results, previous.as_ref());

    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let text = serde_json::to_string_pretty(&results).unwrap();
    std::fs::write(bench.args.out.join(format!("{stamp}.json")), &text).unwrap();
    std::fs::write(bench.args.out.join("latest.json"), &text).unwrap();
    if let Some(latency) = results.get("latency") {
        plot(latency, &bench.args.out.join("latency.svg"));
    }
    println!(
        "\nwrote {dir}/latest.json, {dir}/{stamp}.json, {dir}/latency.svg",
        dir = bench.args.out.display()
    );
}

struct Bench {
    pg: PgServer,
    brokers: String,
    args: Args,
}

impl Bench {
    /// Phase 1: the same backlog through pg_recvlogical and through walrelay.
    async fn drain(&self, client: &tokio_postgres::Client) -> Value {
        let n = self.args.events;
        for slot in ["bench_recvlogical", "bench_walrelay"] {
            ensure_slot(client, slot).await;
        }
        eprintln!(
            "drain: writing {n} events, {} a transaction",
            self.args.txn_size
        );
        let started = Instant::now();
        let end = write_backlog(client, "drain", n, self.args.txn_size).await;
        let write_s = started.elapsed().as_secs_f64();
        let wal_bytes: i64 = client
            .query_one(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint \
                 FROM pg_replication_slots WHERE slot_name = 'bench_walrelay'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        eprintln!("drain: wrote {wal_bytes} bytes of WAL in {write_s:.1} s; end {end}");

        eprintln!("drain: pg_recvlogical");
        let started = Instant::now();
        let status = Command::new(self.pg.bin_dir().join("pg_recvlogical"))
            .args([
                "--dbname",
                &format!(
                    "host=127.0.0.1 port={} user={} dbname={}",
                    self.pg.port(),
                    postgres::SUPERUSER,
                    postgres::DATABASE
                ),
                "--slot",
                "bench_recvlogical",
                "--start",
                "--no-loop",
                "--endpos",
                &end,
                "-o",
                "proto_version=1",
                "-o",
                "publication_names=walrelay_events",
                "--file",
                "/dev/null",
            ])
            .env("PGPASSWORD", postgres::SUPERUSER_PASSWORD)
            .status()
            .expect("run pg_recvlogical");
        let recvlogical_s = started.elapsed().as_secs_f64();
        assert!(status.success(), "pg_recvlogical failed: {status}");

        eprintln!("drain: walrelay");
        let before = kafka_total(&self.brokers);
        let started = Instant::now();
        let mut relay = self.spawn_walrelay("drain", "bench_walrelay");
        wait_confirmed(client, "bench_walrelay", &end, &mut relay).await;
        let walrelay_s = started.elapsed().as_secs_f64();
        let peak_rss = relay.peak_rss_kib();
        let cpu_s = relay.cpu_s();
        relay.stop();
        self.assert_delivered(before, n, "the backlog");
        client
            .execute("SELECT pg_drop_replication_slot('bench_recvlogical')", &[])
            .await
            .unwrap();
        let recvlogical_rate = n as f64 / recvlogical_s;
        let walrelay_rate = n as f64 / walrelay_s;
        json!({
            "events": n,
            "txn_size": self.args.txn_size,
            "wal_bytes": wal_bytes,
            "pg_recvlogical_s": recvlogical_s,
            "pg_recvlogical_events_per_s": recvlogical_rate,
            "walrelay_s": walrelay_s,
            "walrelay_events_per_s": walrelay_rate,
            "ratio": walrelay_rate / recvlogical_rate,
            "walrelay_peak_rss_mib": peak_rss as f64 / 1024.0,
            "walrelay_cpu_s": cpu_s,
            "walrelay_cpu_us_per_event": cpu_s * 1e6 / n as f64,
        })
    }

    /// Phase 2: commit-to-ack latency at fixed rates.
    async fn latency(&self, client: &tokio_postgres::Client) -> Value {
        ensure_slot(client, "bench_walrelay").await;
        let mut relay = self.spawn_walrelay("latency", "bench_walrelay");
        relay.wait_ready().await;
        let mut rates = Vec::new();
        for &rate in &self.args.rates {
            eprintln!(
                "latency: {rate} events/s for {:.0} s (+3 s warm-up)",
                self.args.duration.as_secs_f64()
            );
            let stop = tokio_util::sync::CancellationToken::new();
            let writers = spawn_writers(&self.pg, rate, stop.clone()).await;
            tokio::time::sleep(Duration::from_secs(3)).await;
            let first = relay.histogram();
            let cpu_before = relay.cpu_s();
            relay.reset_peak_rss();
            let mut rss_samples = Vec::new();
            let mut series = Vec::new();
            let mut last = first.clone();
            let deadline = Instant::now() + self.args.duration;
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_secs(1)).await;
                rss_samples.push(relay.rss_kib());
                let now = relay.histogram();
                series.push(now.minus(&last).quantile(0.99) * 1000.0);
                last = now;
            }
            stop.cancel();
            let mut written = 0;
            for w in writers {
                written += w.await.expect("writer");
            }
            let end: String = client
                .query_one("SELECT pg_current_wal_lsn()::text", &[])
                .await
                .unwrap()
                .get(0);
            wait_confirmed(client, "bench_walrelay", &end, &mut relay).await;
            let window = relay.histogram().minus(&first);
            let cpu = relay.cpu_s() - cpu_before;
            let peak = relay.peak_rss_kib();
            let achieved = written as f64 / (self.args.duration.as_secs_f64() + 3.0);
            rates.push(json!({
                "rate": rate,
                "achieved_rate": achieved,
                "events": window.count,
                "p50_ms": window.quantile(0.5) * 1000.0,
                "p99_ms": window.quantile(0.99) * 1000.0,
                "p999_ms": window.quantile(0.999) * 1000.0,
                "mean_ms": window.sum / window.count.max(1) as f64 * 1000.0,
                "peak_rss_mib": peak as f64 / 1024.0,
                "walrelay_cpu_share": cpu / self.args.duration.as_secs_f64(),
                "max_sampled_rss_mib": rss_samples.iter().max().copied().unwrap_or(0) as f64 / 1024.0,
                "p99_ms_per_second": series,
                "cdf": window.cdf(),
            }));
        }
        relay.stop();
        Value::Array(rates)
    }

    /// Phase 3: one transaction of `--big-txn` events.
    async fn big_txn(&self, client: &tokio_postgres::Client) -> Value {
        ensure_slot(client, "bench_walrelay").await;
        let mut relay = self.spawn_walrelay("big-txn", "bench_walrelay");
        relay.wait_ready().await;
        let idle_rss = relay.rss_kib();
        let n = self.args.big_txn;
        eprintln!("big transaction: {n} events in one transaction");
        let before = kafka_total(&self.brokers);
        let started = Instant::now();
        let end = write_backlog(client, "big", n, n).await;
        let write_s = started.elapsed().as_secs_f64();
        let started = Instant::now();
        wait_confirmed(client, "bench_walrelay", &end, &mut relay).await;
        let relay_s = started.elapsed().as_secs_f64();
        let peak = relay.peak_rss_kib();
        relay.stop();
        self.assert_delivered(before, n, "the big transaction");
        json!({
            "events": n,
            "write_s": write_s,
            "commit_to_confirmed_s": relay_s,
            "idle_rss_mib": idle_rss as f64 / 1024.0,
            "peak_rss_mib": peak as f64 / 1024.0,
        })
    }

    /// The topic gained exactly `n` records since it held `before`.
    fn assert_delivered(&self, before: i64, n: u64, what: &str) {
        let delivered = kafka_total(&self.brokers) - before;
        assert_eq!(
            delivered,
            i64::try_from(n).unwrap(),
            "Kafka must hold every event of {what}"
        );
    }

    fn spawn_walrelay(&self, phase: &str, slot: &str) -> Relay {
        let metrics = free_local_addr();
        let log_path = self.args.out.join(format!("walrelay-{phase}.log"));
        let log = std::fs::File::create(&log_path).expect("create the walrelay log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_walrelay"));
        command.args([
            "run",
            "--postgres-url",
            &self.pg.superuser_url(),
            "--kafka-brokers",
            &self.brokers,
            "--topic",
            TOPIC,
            "--slot",
            slot,
            "--create-slot=false",
            "--snapshot",
            "never",
            "--metrics-addr",
            &metrics.to_string(),
        ]);
        for property in &self.args.kafka_property {
            command.args(["--kafka-property", property]);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn walrelay");
        Relay {
            child,
            metrics,
            log_path,
        }
    }
}

/// Writes `n` events in transactions of `txn_size` with one statement each;
/// returns the WAL position after the last commit.
async fn write_backlog(
    client: &tokio_postgres::Client,
    prefix: &str,
    n: u64,
    txn_size: u64,
) -> String {
    let sql = format!(
        "INSERT INTO events (aggregate_id, seq_nr, event_type, payload) \
         SELECT '{prefix}-' || (g % {AGGREGATES}), g / {AGGREGATES} + 1, 'OrderPlaced', \
         {PAYLOAD_SQL} FROM generate_series($1::bigint, $2::bigint - 1) g"
    );
    let statement = client
        .prepare(&sql)
        .await
        .expect("prepare the backlog insert");
    let mut start = 0u64;
    while start < n {
        let stop = (start + txn_size).min(n);
        let (a, b) = (i64::try_from(start).unwrap(), i64::try_from(stop).unwrap());
        client
            .execute(&statement, &[&a, &b])
            .await
            .expect("insert the backlog");
        start = stop;
    }
    client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0)
}

/// Writers inserting one-event transactions at `rate` events/s in all, until
/// `stop`; each returns how many it wrote.
async fn spawn_writers(
    pg: &PgServer,
    rate: u64,
    stop: tokio_util::sync::CancellationToken,
) -> Vec<tokio::task::JoinHandle<u64>> {
    const WRITERS: u64 = 4;
    let mut handles = Vec::new();
    for w in 0..WRITERS {
        let client = pg.client().await;
        let stop = stop.clone();
        let per_writer = rate as f64 / WRITERS as f64;
        handles.push(tokio::spawn(async move {
            let sql = format!(
                "INSERT INTO events (aggregate_id, seq_nr, event_type, payload) \
                 SELECT $1, $2, 'OrderPlaced', {PAYLOAD_SQL} FROM (SELECT $2::bigint AS g) s"
            );
            let statement = client.prepare(&sql).await.expect("prepare the insert");
            let started = Instant::now();
            let mut sent = 0u64;
            while !stop.is_cancelled() {
                let due = (started.elapsed().as_secs_f64() * per_writer) as u64;
                while sent < due {
                    let aggregate = format!("lat{rate}-{w}-{}", sent % 100);
                    let seq = i64::try_from(sent / 100 + 1).unwrap();
                    client
                        .execute(&statement, &[&aggregate, &seq])
                        .await
                        .expect("insert an event");
                    sent += 1;
                }
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
            sent
        }));
    }
    handles
}

async fn ensure_slot(client: &tokio_postgres::Client, slot: &str) {
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .is_some();
    if !exists {
        client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await
            .expect("create slot");
    }
}

/// Waits until `slot` is confirmed at or past `end`, polling every 20 ms.
async fn wait_confirmed(client: &tokio_postgres::Client, slot: &str, end: &str, relay: &mut Relay) {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let done: bool = client
            .query_one(
                "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots \
                 WHERE slot_name = $1",
                &[&slot, &end],
            )
            .await
            .expect("read the slot")
            .get(0);
        if done {
            return;
        }
        if let Some(status) = relay.child.try_wait().unwrap() {
            panic!(
                "walrelay exited with {status}; its log: {}",
                relay.log_path.display()
            );
        }
        assert!(
            Instant::now() < deadline,
            "slot {slot} not confirmed to {end} in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The number of records in the topic (the sum of its high watermarks).
fn kafka_total(brokers: &str) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "walrelay-bench")
        .create()
        .expect("create a consumer");
    (0..PARTITIONS)
        .map(|p| {
            consumer
                .fetch_watermarks(TOPIC, p, Duration::from_secs(10))
                .expect("fetch watermarks")
                .1
        })
        .sum()
}

fn free_local_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free local port")
}

/// A walrelay process; killed if still running when dropped (a failed run
/// must not leave it streaming into the next one).
struct Relay {
    child: Child,
    metrics: SocketAddr,
    log_path: PathBuf,
}

impl Drop for Relay {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Relay {
    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if http_get(self.metrics, "/readyz").is_some_and(|(status, _)| status == 200) {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "walrelay exited with {status}; its log: {}",
                    self.log_path.display()
                );
            }
            assert!(Instant::now() < deadline, "walrelay not ready in 60 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn status_field(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// User plus system CPU seconds the process has used.
    fn cpu_s(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("read /proc/PID/stat");
        // Fields after the command name, which is in parentheses: utime is
        // the 12th of them, stime the 13th, in clock ticks (100 a second).
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        ticks as f64 / 100.0
    }

    fn rss_kib(&self) -> u64 {
        self.status_field("VmRSS:")
    }

    fn peak_rss_kib(&self) -> u64 {
        self.status_field("VmHWM:")
    }

    /// Resets `VmHWM` to the current RSS (Linux's `clear_refs` value 5).
    fn reset_peak_rss(&self) {
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.child.id()), "5");
    }

    fn histogram(&self) -> Histogram {
        let (status, body) = http_get(self.metrics, "/metrics").expect("scrape walrelay");
        assert_eq!(status, 200);
        Histogram::parse(&body, "walrelay_commit_to_ack_seconds")
    }

    /// SIGTERM, and wait for a clean exit.
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let status = self.child.wait().expect("wait for walrelay");
        assert!(status.success(), "walrelay exited with {status}");
    }
}

fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// A Prometheus histogram: cumulative counts by upper bound.
#[derive(Clone, Debug)]
struct Histogram {
    buckets: Vec<(f64, u64)>,
    count: u64,
    sum: f64,
}

impl Histogram {
    fn parse(body: &str, name: &str) -> Self {
        let mut buckets = Vec::new();
        let (mut count, mut sum) = (0, 0.0);
        for line in body.lines() {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            if let Some(rest) = series.strip_prefix(&format!("{name}_bucket{{le=\"")) {
                let le = rest.trim_end_matches("\"}");
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                buckets.push((le, value.parse().unwrap()));
            } else if series == format!("{name}_count") {
                count = value.parse().unwrap();
            } else if series == format!("{name}_sum") {
                sum = value.parse().unwrap();
            }
        }
        assert!(!buckets.is_empty(), "no {name} in walrelay's metrics");
        Histogram {
            buckets,
            count,
            sum,
        }
    }

    fn minus(&self, earlier: &Histogram) -> Histogram {
        Histogram {
            buckets: self
                .buckets
                .iter()
                .zip(&earlier.buckets)
                .map(|(&(le, a), &(_, b))| (le, a - b))
                .collect(),
            count: self.count - earlier.count,
            sum: self.sum - earlier.sum,
        }
    }

    /// The `q` quantile in seconds, interpolated linearly within its bucket.
    fn quantile(&self, q: f64) -> f64 {
        if self.count == 0 {
            return f64::NAN;
        }
        let rank = q * self.count as f64;
        let mut lower = (0.0, 0u64);
        for &(le, cumulative) in &self.buckets {
            if cumulative as f64 >= rank {
                if le.is_infinite() {
                    return lower.0;
                }
                let within = cumulative - lower.1;
                let fraction = if within == 0 {
                    1.0
                } else {
                    (rank - lower.1 as f64) / within as f64
                };
                return lower.0 + (le - lower.0) * fraction;
            }
            lower = (le, cumulative);
        }
        lower.0
    }

    /// `[upper bound ms, fraction at or below]` for each finite bucket.
    fn cdf(&self) -> Vec<[f64; 2]> {
        self.buckets
            .iter()
            .filter(|(le, _)| le.is_finite())
            .map(|&(le, c)| [le * 1000.0, c as f64 / self.count.max(1) as f64])
            .collect()
    }
}

fn print_table(results: &Value, previous: Option<&Value>) {
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut row = |label: &str, path: &[&str]| {
        rows.push((
            label.to_owned(),
            path.iter().map(|&p| p.to_owned()).collect(),
        ));
    };
    row(
        "pg_recvlogical drain (events/s)",
        &["drain", "pg_recvlogical_events_per_s"],
    );
    row(
        "walrelay drain (events/s)",
        &["drain", "walrelay_events_per_s"],
    );
    row("walrelay / pg_recvlogical", &["drain", "ratio"]);
    row(
        "walrelay CPU per event (µs)",
        &["drain", "walrelay_cpu_us_per_event"],
    );
    row("drain peak RSS (MiB)", &["drain", "walrelay_peak_rss_mib"]);
    let rates = results.get("latency").and_then(Value::as_array);
    for (i, r) in rates.into_iter().flatten().enumerate() {
        let i = i.to_string();
        let rate = &r["rate"];
        for (name, key) in [("p50", "p50_ms"), ("p99", "p99_ms"), ("p99.9", "p999_ms")] {
            row(
                &format!("{rate}/s commit→ack {name} (ms)"),
                &["latency", &i, key],
            );
        }
        row(
            &format!("{rate}/s peak RSS (MiB)"),
            &["latency", &i, "peak_rss_mib"],
        );
        row(
            &format!("{rate}/s walrelay CPU (cores)"),
            &["latency", &i, "walrelay_cpu_share"],
        );
    }
    row("big txn peak RSS (MiB)", &["big_txn", "peak_rss_mib"]);
    row(
        "big txn commit→confirmed (s)",
        &["big_txn", "commit_to_confirmed_s"],
    );

    let lookup = |v: &Value, path: &[String]| -> Option<f64> {
        let mut v = v;
        for key in path {
            v = match key.parse::<usize>() {
                Ok(i) => v.get(i)?,
                Err(_) => v.get(key)?,
            };
        }
        v.as_f64()
    };
    let fmt = |x: Option<f64>| x.map_or_else(|| "-".to_owned(), |x| format!("{x:.2}"));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{:<38} {:>12} {:>12}",
        "measure", "this run", "last run"
    );
    for (label, path) in &rows {
        let now = lookup(results, path);
        if now.is_none() {
            continue;
        }
        let before = previous.and_then(|p| lookup(p, path));
        let _ = writeln!(out, "{label:<38} {:>12} {:>12}", fmt(now), fmt(before));
    }
    for r in rates.into_iter().flatten() {
        let _ = writeln!(
            out,
            "  at {} events/s: achieved {:.0}/s, {} events measured",
            r["rate"],
            r["achieved_rate"].as_f64().unwrap_or(0.0),
            r["events"]
        );
    }
    if let Some(big) = results.get("big_txn") {
        let _ = writeln!(out, "  big transaction: {} events", big["events"]);
    }
    print!("{out}");
}

/// The latency distribution of each rate, and p99 per second over time.
fn plot(latency: &Value, path: &Path) {
    let Some(rates) = latency.as_array() else {
        return;
    };
    let root = SVGBackend::new(path, (1100, 450)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let (left, right) = root.split_horizontally(550);
    let mut cdf = ChartBuilder::on(&left)
        .caption("commit → ack latency (CDF)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d((0.25f64..250.0).log_scale(), 0.0f64..1.0)
        .unwrap();
    cdf.configure_mesh()
        .x_desc("milliseconds (log)")
        .y_desc("fraction of events")
        .draw()
        .unwrap();
    let mut over_time = ChartBuilder::on(&right)
        .caption("p99 per second", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(
            0f64..rates
                .iter()
                .map(|r| r["p99_ms_per_second"].as_array().map_or(0, Vec::len))
                .max()
                .unwrap_or(1) as f64,
            0f64..rates
                .iter()
                .flat_map(|r| {
                    r["p99_ms_per_second"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                })
                .filter_map(|v| v.as_f64())
                .filter(|v| v.is_finite())
                .fold(10.0, f64::max)
                * 1.1,
        )
        .unwrap();
    over_time
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("milliseconds")
        .draw()
        .unwrap();
    for (i, r) in rates.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let label = format!("{} events/s", r["rate"]);
        let points: Vec<(f64, f64)> = r["cdf"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64()?)))
            .collect();
        cdf.draw_series(LineSeries::new(points, color.stroke_width(2)))
            .unwrap()
            .label(label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        let series: Vec<(f64, f64)> = r["p99_ms_per_second"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
            .filter_map(|(s, v)| Some((s as f64 + 1.0, v.as_f64().filter(|v| v.is_finite())?)))
            .collect();
        over_time
            .draw_series(LineSeries::new(series, color.stroke_width(2)))
            .unwrap()
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    cdf.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
        .unwrap();
    over_time
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
        .unwrap();
    root.present().unwrap();
}

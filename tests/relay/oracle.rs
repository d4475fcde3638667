//! Confirm-after-ack watched from outside: the slot sampled every 50 ms
//! through walsender terminations, a broker outage and a standby takeover,
//! against what the topic held at each moment (`support::oracle`).
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio_util::sync::CancellationToken;

use super::delivery::{current_lsn, wait_confirmed};
use crate::support::kafka::Kafka;
use crate::support::oracle::{ConfirmSampler, assert_confirmed_only_what_was_on_the_topic};
use crate::support::postgres::{PgServer, SCRAM_PASSWORD, SCRAM_USER};
use crate::support::walrelay::{Walrelay, http_get, metric, wait_for_metric};
use crate::support::workload::{Mix, Writer, check};

const WAIT: Duration = Duration::from_secs(60);

/// Writes with `writer` for `period`, then returns it.
async fn write_for(writer: Writer, period: Duration) -> Writer {
    let stop = CancellationToken::new();
    let task = tokio::spawn(writer.run(stop.clone()));
    tokio::time::sleep(period).await;
    stop.cancel();
    task.await.expect("the writer")
}

/// The index of the one instance that streams (`/active` 200; a standby is
/// ready too), once there is one.
async fn active(metrics: &[std::net::SocketAddr]) -> usize {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let active: Vec<usize> = (0..metrics.len())
            .filter(|i| http_get(metrics[*i], "/active").0 == 200)
            .collect();
        if let [one] = active[..] {
            return one;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not exactly one instance streams: {active:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_slot_is_confirmed_only_past_events_on_the_topic_through_outage_reconnects_and_takeover()
 {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 4);
    // A little broker latency, so that events are in flight long enough to be seen there.
    kafka.set_round_trip_time(Duration::from_millis(20));
    let url = pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable");
    let (first, first_metrics) = Walrelay::run(&url, &kafka.bootstrap(), &[]).await;
    let mut second = Walrelay::start(&url, &kafka.bootstrap(), &[]);
    let second_metrics = second.metrics_addr().await;
    second.wait_for_stderr("standing by", WAIT).await;
    let mut relays = [first, second];
    let metrics = [first_metrics, second_metrics];

    let sampler = ConfirmSampler::start(&pg, &kafka, "events", "walrelay").await;
    let mix = Mix {
        big_every: 20,
        big_events: 200,
        pause: Duration::from_millis(5),
        ..Mix::default()
    };
    let mut writer = Writer::new(pg.superuser_url(), "agg", mix, 11);
    let mut rng = fastrand::Rng::with_seed(11);

    // Reconnects: the walsender terminated under writes, 0.5-2 s apart. The
    // standby may take the slot meanwhile.
    let stop = CancellationToken::new();
    let task = tokio::spawn(writer.run(stop.clone()));
    let mut terminated = 0;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(rng.u64(500..2000))).await;
        terminated += usize::from(pg.terminate_walsender("walrelay").await);
    }
    stop.cancel();
    writer = task.await.unwrap();
    assert!(terminated >= 2, "only {terminated} walsenders terminated");

    // A broker outage. With nothing in flight the topic's ends are exact,
    // and stay so while the broker is down.
    wait_confirmed(&pg, "walrelay", current_lsn(&pg).await).await;
    for m in metrics {
        wait_for_metric(m, "walrelay_inflight_events", |n| n == 0, WAIT).await;
    }
    let ends = kafka
        .watermarks("events", WAIT)
        .expect("the broker answers");
    sampler.freeze(ends.iter().map(|(_, high)| *high).collect());
    kafka.set_all_brokers(false);
    writer = write_for(writer, Duration::from_secs(3)).await;
    sampler.thaw();
    kafka.set_all_brokers(true);

    // A takeover: the active instance dies with events in flight.
    let stop = CancellationToken::new();
    let task = tokio::spawn(writer.run(stop.clone()));
    let dying = active(&metrics).await;
    wait_for_metric(metrics[dying], "walrelay_inflight_events", |n| n > 0, WAIT).await;
    relays[dying].kill().await;
    let survivor = 1 - dying;
    let streamed = relays[survivor].stderr_text().matches("streaming").count();
    relays[survivor]
        .wait_for_stderr_count("streaming", streamed + 1, WAIT)
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let writer = task.await.unwrap();

    wait_confirmed(&pg, "walrelay", current_lsn(&pg).await).await;
    let samples = sampler.finish().await;
    let records = kafka.read("events", writer.committed.len(), WAIT);
    let logs = format!(
        "--- first instance ---\n{}\n--- second instance ---\n{}",
        relays[0].stderr_text(),
        relays[1].stderr_text()
    );
    // The oracle first: it names the moment the slot went too far.
    let (checked, positions) = assert_confirmed_only_what_was_on_the_topic(&samples, &records);
    check(&writer.committed, &records)
        .assert_clean_replays(&pg.decoding_sessions("walrelay"), &logs);
    eprintln!(
        "{} samples, {checked} checked against the topic, {positions} confirmed positions, \
         {} events, {terminated} walsenders terminated",
        samples.len(),
        writer.committed.len()
    );
    assert!(
        positions >= 10,
        "the oracle saw the slot at only {positions} positions"
    );
    assert_eq!(metric(metrics[survivor], "walrelay_standby"), 0);
    assert_eq!(
        relays[survivor].stop_with(Signal::SIGTERM).await.code(),
        Some(0)
    );
}

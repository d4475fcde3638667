//! Secrets stay secret through the binary: `--help`, configuration errors and
//! logs never print them; files holding them must be private; producer
//! properties that load code must be allowed by name, and those that weaken
//! TLS are reported.
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::walrelay::Walrelay;

/// The secret each test hides; its pieces are searched for too.
const SECRET: &str = "hunter2;and more ";
const WAIT: Duration = Duration::from_secs(60);
/// Nothing listens on port 1: only a connection attempt could fail there.
const NOWHERE: [&str; 4] = [
    "--postgres-url",
    "postgres://u@127.0.0.1:1/d",
    "--kafka-brokers",
    "127.0.0.1:1",
];

/// Panics if the secret, or its distinctive part, is in `text`.
fn assert_hidden(text: &str, context: &str) {
    assert!(
        !text.contains("hunter2"),
        "{context}: the secret is printed:\n{text}"
    );
}

fn private_file(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

/// Runs `walrelay ARGS` with `env` to its end; returns the exit code and
/// everything it printed.
async fn run_to_end(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut w = Walrelay::spawn(args, env);
    let status = w.wait(WAIT).await;
    let printed = format!("{}\n{}", w.stdout_lines().join("\n"), w.stderr_text());
    (status.code(), printed)
}

/// Runs `walrelay [GLOBAL] run` against a fresh PostgreSQL and Kafka with
/// `args` and `env` until it logs a line holding `streaming`, stops it with
/// SIGTERM (it must exit 0), and returns its logs.
async fn logs_of_a_run(
    global: &[&str],
    args: &[&str],
    env: &[(&str, &str)],
    streaming: &str,
) -> String {
    use crate::support::kafka::Kafka;
    use crate::support::postgres::{PgServer, SCRAM_PASSWORD, SCRAM_USER};
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 1);
    let url = pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable");
    let brokers = kafka.bootstrap();
    let run = [
        "run",
        "--postgres-url",
        &url,
        "--kafka-brokers",
        &brokers,
        "--metrics-addr",
        "127.0.0.1:0",
    ];
    let mut relay = Walrelay::spawn(&[global, &run[..], args].concat(), env);
    relay.wait_for_stderr(streaming, WAIT).await;
    let status = relay.stop_with(nix::sys::signal::Signal::SIGTERM).await;
    assert_eq!(status.code(), Some(0), "{}", relay.stderr_text());
    relay.stderr_text()
}

#[tokio::test]
async fn help_never_prints_a_secret_from_the_environment() {
    let url = format!("postgres://walrelay:{}@db/app", "hunter2%3B");
    let property = format!("sasl.password={SECRET}");
    let env = [
        ("WALRELAY_POSTGRES_URL", url.as_str()),
        ("WALRELAY_KAFKA_PROPERTY", property.as_str()),
    ];
    for args in [
        &["--help"][..],
        &["run", "--help"],
        &["run", "-h"],
        &["check", "--help"],
        &["tail", "--help"],
        &["demo", "--help"],
        &["healthcheck", "--help"],
    ] {
        let (code, printed) = run_to_end(args, &env).await;
        assert_eq!(code, Some(0), "{args:?}:\n{printed}");
        assert_hidden(&printed, &format!("{args:?}"));
    }
    // Non-secret settings still show where they come from.
    let (_, printed) = run_to_end(&["run", "--help"], &env).await;
    assert!(printed.contains("WALRELAY_KAFKA_PROPERTY"), "{printed}");
}

#[tokio::test]
async fn a_bad_kafka_property_is_refused_without_echoing_its_value() {
    for property in [
        // A typo in the name: librdkafka does not know it, and says so.
        format!("sasl.pasword={SECRET}"),
        // A colon for the equals sign.
        format!("sasl.password:{SECRET}"),
        // No separator at all.
        format!("sasl.password {SECRET}"),
        // A guarantee walrelay insists on, given something else.
        format!("acks={SECRET}"),
    ] {
        let args = [&["run"][..], &NOWHERE, &["--kafka-property", &property]].concat();
        let (code, printed) = run_to_end(&args, &[]).await;
        assert_eq!(code, Some(2), "{property:?}:\n{printed}");
        assert!(printed.contains("--kafka-property"), "{printed}");
        assert_hidden(&printed, &property);
    }
    // The same from the environment, one property per line.
    let lines = format!("linger.ms=5\nsasl.password {SECRET}\n");
    let args = [&["run"][..], &NOWHERE].concat();
    let (code, printed) = run_to_end(&args, &[("WALRELAY_KAFKA_PROPERTY", &lines)]).await;
    assert_eq!(code, Some(2), "{printed}");
    assert!(
        printed.contains("WALRELAY_KAFKA_PROPERTY (line 2)"),
        "{printed}"
    );
    assert_hidden(&printed, "environment");
}

#[tokio::test]
async fn a_password_file_others_may_read_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let file = private_file(dir.path(), "pw", SECRET, 0o644);
    let file_arg = file.to_str().unwrap();
    let args = [
        &["check"][..],
        &NOWHERE,
        &["--postgres-password-file", file_arg],
    ]
    .concat();
    let (code, printed) = run_to_end(&args, &[]).await;
    assert_eq!(code, Some(2), "{printed}");
    assert!(
        printed.contains("invalid configuration")
            && printed.contains(&format!("chmod 600 {file_arg}")),
        "{printed}"
    );
    assert!(
        !printed.contains("cannot connect"),
        "it connected:\n{printed}"
    );
    assert_hidden(&printed, "refused");

    // Allowed: a warning, then the file is used (here: for a server that is
    // not there, which check reports).
    let allowed = [&args[..], &["--allow-world-readable-secrets"]].concat();
    let (_, printed) = run_to_end(&allowed, &[]).await;
    assert!(
        printed.contains("group or others may read it") && printed.contains("PROBLEM  postgres"),
        "{printed}"
    );
    assert_hidden(&printed, "allowed");

    // The same file, private: accepted without a word.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (_, printed) = run_to_end(&args, &[]).await;
    assert!(
        !printed.contains("group or others") && printed.contains("PROBLEM  postgres"),
        "{printed}"
    );
}

#[tokio::test]
async fn a_config_file_holding_a_password_must_be_private() {
    let dir = tempfile::tempdir().unwrap();
    let file = private_file(
        dir.path(),
        "walrelay.toml",
        "postgres_url = \"postgres://u:hunter2@127.0.0.1:1/d\"\nkafka_brokers = \"127.0.0.1:1\"\n",
        0o644,
    );
    let (code, printed) = run_to_end(&["run", "--config", file.to_str().unwrap()], &[]).await;
    assert_eq!(code, Some(2), "{printed}");
    assert!(
        printed.contains("--config") && printed.contains("chmod 600"),
        "{printed}"
    );
    assert_hidden(&printed, "config file");
}

#[tokio::test]
async fn properties_that_load_code_or_run_commands_need_an_allowance() {
    let marker = tempfile::tempdir().unwrap();
    let ran = marker.path().join("ran");
    let command = format!("sasl.kerberos.kinit.cmd=touch {}", ran.display());
    for property in [
        "plugin.library.paths=/nonexistent/libevil".to_owned(),
        "ssl.engine.location=/nonexistent/engine.so".to_owned(),
        "ssl.providers=/nonexistent/provider".to_owned(),
        command.clone(),
    ] {
        let name = property.split_once('=').unwrap().0;
        let args = [&["check"][..], &NOWHERE, &["--kafka-property", &property]].concat();
        let (code, printed) = run_to_end(&args, &[]).await;
        assert_eq!(code, Some(2), "{property}:\n{printed}");
        assert!(
            printed.contains(&format!("--allow-unsafe-kafka-property {name}")),
            "{printed}"
        );
        assert!(!printed.contains("/nonexistent"), "{printed}");
    }
    assert!(!ran.exists(), "the command ran");
    // Allowed by name, the plugin is loaded: here it does not exist, and
    // librdkafka says so.
    let args = [
        &["check"][..],
        &NOWHERE,
        &[
            "--kafka-property",
            "plugin.library.paths=/nonexistent/libevil",
        ],
        &["--allow-unsafe-kafka-property", "plugin.library.paths"],
    ]
    .concat();
    let (code, printed) = run_to_end(&args, &[]).await;
    assert_eq!(code, Some(2), "{printed}");
    assert!(
        printed.contains("--kafka-property plugin.library.paths")
            && !printed.contains("--allow-unsafe-kafka-property plugin"),
        "{printed}"
    );
}

#[tokio::test]
async fn tls_weakening_properties_are_warned_about_and_reported_by_check() {
    let weak = [
        "--kafka-property",
        "enable.ssl.certificate.verification=false",
        "--kafka-property",
        "ssl.endpoint.identification.algorithm=none",
        "--kafka-property",
        "security.protocol=sasl_plaintext",
        "--kafka-property",
        "sasl.username=walrelay",
        "--kafka-property",
    ];
    let password = format!("sasl.password={SECRET}");
    let args = [&["check"][..], &NOWHERE, &weak, &[&password]].concat();
    let (code, printed) = run_to_end(&args, &[]).await;
    assert_eq!(code, Some(2), "{printed}");
    for (setting, fix) in [
        (
            "enable.ssl.certificate.verification=false",
            "ssl.ca.location",
        ),
        ("ssl.endpoint.identification.algorithm=none", "remove it"),
        (
            "security.protocol=sasl_plaintext",
            "security.protocol=sasl_ssl",
        ),
    ] {
        let finding = printed
            .lines()
            .position(|l| l.starts_with("PROBLEM  kafka security") && l.contains(setting))
            .unwrap_or_else(|| panic!("no finding for {setting}:\n{printed}"));
        let fix_line = printed.lines().nth(finding + 1).unwrap();
        assert!(
            fix_line.contains("fix:") && fix_line.contains(fix),
            "{fix_line}"
        );
    }
    assert_hidden(&printed, "check");

    // run warns at start, before it tries to connect.
    let args = [&["run"][..], &NOWHERE, &weak, &[&password]].concat();
    let mut w = Walrelay::spawn(&args, &[]);
    w.wait_for_stderr("security.protocol=sasl_plaintext", WAIT)
        .await;
    w.wait_for_stderr("enable.ssl.certificate.verification=false", WAIT)
        .await;
    w.wait_for_stderr("ssl.endpoint.identification.algorithm=none", WAIT)
        .await;
    assert_hidden(&w.stderr_text(), "run");
}

#[tokio::test]
async fn json_logs_are_flat_with_slot_and_version_and_never_show_a_secret_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    // The secret in a file of its own, named from Kafka's client format.
    let secret = private_file(dir.path(), "kafka-password", &format!("{SECRET}\n"), 0o600);
    let properties = private_file(
        dir.path(),
        "client.properties",
        &format!(
            "# the Java client's file\nsasl.username: walrelay\nsasl.password=file:{}\n",
            secret.display()
        ),
        0o644,
    );
    let logs = logs_of_a_run(
        &["--log-format", "json"],
        &[
            "--slot",
            "orders",
            "--kafka-properties-file",
            properties.to_str().unwrap(),
        ],
        &[],
        "\"message\":\"streaming\"",
    )
    .await;
    assert_hidden(&logs, "JSON logs");
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert!(lines.len() > 3, "{logs}");
    for line in &lines {
        assert_eq!(line["slot"], "orders", "{line}");
        assert_eq!(line["version"], env!("CARGO_PKG_VERSION"), "{line}");
        assert!(
            line["message"].is_string() && line.get("fields").is_none(),
            "{line}"
        );
    }
    // Fields at the top level: the start line's, and the warning that SASL
    // credentials go without TLS (the password came from its file).
    let starting = lines.iter().find(|l| l["message"] == "starting").unwrap();
    assert_eq!(starting["topic"], "events");
    assert!(starting["addr"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(
        lines.iter().any(|l| l["level"] == "WARN"
            && l["message"]
                .as_str()
                .unwrap()
                .contains("security.protocol=plaintext")),
        "{logs}"
    );
}

#[tokio::test]
async fn librdkafka_debug_logs_of_the_configuration_never_show_a_secret_property() {
    // librdkafka's `debug=conf` logs every property set, at debug level.
    let password = format!("sasl.password={SECRET}");
    let logs = logs_of_a_run(
        &[],
        &[
            "--kafka-property",
            &password,
            "--kafka-property",
            "debug=conf",
        ],
        &[("WALRELAY_LOG", "debug")],
        "streaming",
    )
    .await;
    // The dump was logged, the property named in it, its value not.
    assert!(
        logs.lines()
            .any(|l| l.contains("sasl.password") && l.contains("redacted")),
        "{logs}"
    );
    assert_hidden(&logs, "debug logs");
}

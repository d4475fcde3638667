//! Whoever sits between walrelay and PostgreSQL, or answers in its place,
//! gets neither the password nor an authenticated session: a server that
//! strips TLS and asks for a cleartext password, one that presents a
//! self-signed certificate, a man in the middle that relays to the real
//! server, one that claims an enormous message. Each is met by both
//! connections, and by `walrelay run`, `tail` and `check` as an operator
//! starts them.
use std::time::Duration;

use base64::Engine as _;
use walrelay::pg::auth::AuthError;
use walrelay::pg::conn::{ConnError, ReplicationConnection};
use walrelay::pg::guard::Refusal;
use walrelay::pg::metadata::{self, MetadataError};
use walrelay::pg::params::ConnectParams;
use walrelay::pg::protocol::FrameError;
use walrelay::pg::tls::ChannelBindingError;
use walrelay::pg::transport::TransportError;

use crate::support::hostile::{Ask, Hostile, ServerCert, Tls, split_sasl_initial};
use crate::support::postgres::{
    CertNames, MD5_PASSWORD, MD5_USER, PLAIN_PASSWORD, PLAIN_USER, PgOptions, PgServer,
    SCRAM_PASSWORD, SCRAM_USER,
};
use crate::support::walrelay::{ANY_LOCAL_PORT, Walrelay};

const WAIT: Duration = Duration::from_secs(60);

/// The password the fake servers want.
const SECRET: &str = "s3cr3t-for-the-taking-Qx8";

fn params(url: &str) -> ConnectParams {
    ConnectParams::from_url_with_env(url, |_| None).expect("valid URL")
}

/// Both connections' errors with `url`.
async fn both_fail(url: &str) -> (ConnError, MetadataError) {
    both_fail_with(&params(url)).await
}

/// Both connections' errors with `p`.
async fn both_fail_with(p: &ConnectParams) -> (ConnError, MetadataError) {
    let repl = tokio::time::timeout(WAIT, ReplicationConnection::connect(p))
        .await
        .expect("the replication connection neither failed nor logged in");
    let meta = tokio::time::timeout(WAIT, metadata::connect(p))
        .await
        .expect("the metadata connection neither failed nor logged in");
    match (repl, meta) {
        (Err(repl), Err(meta)) => (repl, meta),
        (Ok(_), _) => panic!("the replication connection logged in"),
        (_, Ok(_)) => panic!("the metadata connection logged in"),
    }
}

/// Asserts that each connection `hostile` got (`count` of them) logged in
/// with SCRAM-SHA-256-PLUS bound to `cert` hashed with `hash`: the first
/// message names -PLUS with the `p=tls-server-end-point` flag (never `n`,
/// "client does not support binding", nor `y`), and the final message
/// carries that flag and the certificate's hash.
fn all_bound(hostile: &Hostile, count: usize, cert: &[u8], hash: &'static ring::digest::Algorithm) {
    let expected = [
        &b"p=tls-server-end-point,,"[..],
        ring::digest::digest(hash, cert).as_ref(),
    ]
    .concat();
    let sessions = hostile.messages();
    assert_eq!(sessions.len(), count, "connections");
    for (i, messages) in sessions.iter().enumerate() {
        let sasl: Vec<&Vec<u8>> = messages
            .iter()
            .filter(|(tag, _)| *tag == 'p')
            .map(|(_, body)| body)
            .collect();
        assert_eq!(sasl.len(), 2, "connection {i}: {messages:?}");
        let (mechanism, first) = split_sasl_initial(sasl[0]);
        assert_eq!(mechanism, "SCRAM-SHA-256-PLUS", "connection {i}");
        assert!(
            first.starts_with("p=tls-server-end-point,,"),
            "connection {i}: GS2 header of {first:?}"
        );
        let last = String::from_utf8_lossy(sasl[1]).into_owned();
        let binding = last
            .split(',')
            .find_map(|part| part.strip_prefix("c="))
            .unwrap_or_else(|| panic!("connection {i}: no binding in {last:?}"));
        let binding = base64::engine::general_purpose::STANDARD
            .decode(binding)
            .unwrap();
        assert_eq!(binding, expected, "connection {i}: the channel binding");
    }
}

/// The policy's refusal in each connection's error.
fn refusals(repl: ConnError, meta: MetadataError) -> [AuthError; 2] {
    let ConnError::Auth(repl) = repl else {
        panic!("replication connection: not the policy's refusal: {repl}");
    };
    let MetadataError::Refused(Refusal::Auth(meta)) = meta else {
        panic!("metadata connection: not the policy's refusal: {meta}");
    };
    [repl, meta]
}

/// Asserts that `hostile` got no password message and no password bytes.
fn got_nothing(hostile: &Hostile, password: &str) {
    assert!(hostile.connections() > 0, "nobody connected");
    let tags = hostile.received_tags();
    assert!(
        !tags.contains(&'p'),
        "a password or SASL message reached the server: {tags:?}"
    );
    let received = String::from_utf8_lossy(&hostile.received()).into_owned();
    assert!(
        !received.contains(password),
        "the password reached the server"
    );
}

/// `walrelay run`, `tail` and `check` against `url`: each must fail (run and
/// tail with 1, check with 2) saying `needle`, and never print `password`.
async fn binaries_fail(url: &str, needle: &str, password: &str) {
    binaries_fail_with(url, &[], needle, password).await;
}

/// [`binaries_fail`] with `extra` flags.
async fn binaries_fail_with(url: &str, extra: &[&str], needle: &str, password: &str) {
    let runs: [(&[&str], i32); 3] = [
        (
            &[
                "run",
                "--postgres-url",
                url,
                "--kafka-brokers",
                "127.0.0.1:1",
                "--metrics-addr",
                ANY_LOCAL_PORT,
            ],
            1,
        ),
        (&["tail", "--postgres-url", url], 1),
        (
            &[
                "check",
                "--postgres-url",
                url,
                "--kafka-brokers",
                "127.0.0.1:1",
            ],
            2,
        ),
    ];
    for (args, code) in runs {
        let args = [args, extra].concat();
        let mut w = Walrelay::spawn(&args, &[]);
        let status = w.wait(WAIT).await;
        let output = format!("{}\n{}", w.stdout_lines().join("\n"), w.stderr_text());
        assert_eq!(status.code(), Some(code), "walrelay {}:\n{output}", args[0]);
        assert!(
            output.contains(needle),
            "walrelay {} does not say {needle:?}:\n{output}",
            args[0]
        );
        assert!(!output.contains(password), "the password leaked:\n{output}");
    }
}

#[tokio::test]
async fn a_server_that_strips_tls_and_asks_for_a_cleartext_or_md5_password_gets_nothing() {
    for ask in [Ask::Cleartext, Ask::Md5] {
        let hostile = Hostile::fake(Tls::Refuse, ask.clone()).await;
        // sslmode=prefer, the default, accepts the N; disable never asks.
        for mode in ["sslmode=prefer", "sslmode=disable"] {
            let url = format!(
                "postgres://u:{SECRET}@127.0.0.1:{}/d?{mode}",
                hostile.port()
            );
            let (repl, meta) = both_fail(&url).await;
            for e in refusals(repl, meta) {
                assert!(
                    matches!(e, AuthError::PasswordToUnverifiedServer { .. }),
                    "{ask:?} {mode}: {e}"
                );
            }
            binaries_fail(&url, "Nothing was sent", SECRET).await;
        }
        got_nothing(&hostile, SECRET);
    }
}

#[tokio::test]
async fn a_password_goes_over_an_unverified_channel_only_with_both_halves_of_the_opt_in() {
    for (ask, method) in [(Ask::Cleartext, "password"), (Ask::Md5, "md5")] {
        // Half an opt-in: require_auth naming the method, or the flag.
        let hostile = Hostile::fake(Tls::Refuse, ask.clone()).await;
        let plain = format!("postgres://u:{SECRET}@127.0.0.1:{}/d", hostile.port());
        let named = format!("{plain}?require_auth={method}");
        let mut flagged = params(&plain);
        flagged.auth.allow_unverified_password = true;
        for p in [params(&named), flagged] {
            let (repl, meta) = both_fail_with(&p).await;
            for e in refusals(repl, meta) {
                assert!(
                    matches!(e, AuthError::PasswordToUnverifiedServer { .. }),
                    "{method}: {e}"
                );
            }
        }
        let flag = "--allow-password-to-unverified-server";
        binaries_fail(&named, "Nothing was sent", SECRET).await;
        binaries_fail_with(&plain, &[flag], "Nothing was sent", SECRET).await;
        got_nothing(&hostile, SECRET);

        // Both: the password goes, and the server's refusal is its own.
        let hostile = Hostile::fake(Tls::Refuse, ask.clone()).await;
        let named = format!(
            "postgres://u:{SECRET}@127.0.0.1:{}/d?require_auth={method}",
            hostile.port()
        );
        let mut opted_in = params(&named);
        opted_in.auth.allow_unverified_password = true;
        let (repl, meta) = both_fail_with(&opted_in).await;
        assert_eq!(repl.sqlstate(), Some("28P01"), "{repl}");
        assert_eq!(meta.sqlstate(), Some("28P01"), "{meta}");
        let answers = hostile.received_tags();
        assert_eq!(answers, ['p', 'p'], "one password message per connection");
        let received = String::from_utf8_lossy(&hostile.received()).into_owned();
        assert_eq!(
            received.contains(SECRET),
            method == "password",
            "cleartext carries the password, md5 a hash of it"
        );
    }
}

#[tokio::test]
async fn a_server_with_a_self_signed_certificate_offering_scram_plus_gets_only_a_bound_exchange() {
    // An ECDSA P-256 certificate: the binding is its SHA-256 hash, whether
    // TLS was required or merely preferred.
    let cert = ServerCert::rcgen(&rcgen::PKCS_ECDSA_P256_SHA256);
    for mode in ["sslmode=require", "sslmode=prefer"] {
        let hostile = Hostile::fake(
            Tls::Cert(cert.clone()),
            Ask::Sasl(vec!["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]),
        )
        .await;
        let url = format!(
            "postgres://u:{SECRET}@127.0.0.1:{}/d?{mode}",
            hostile.port()
        );
        let (repl, meta) = both_fail(&url).await;
        assert_eq!(repl.sqlstate(), Some("28P01"), "{mode}: {repl}");
        assert_eq!(meta.sqlstate(), Some("28P01"), "{mode}: {meta}");
        all_bound(&hostile, 2, &cert.cert, &ring::digest::SHA256);
        assert!(
            !String::from_utf8_lossy(&hostile.received()).contains(SECRET),
            "{mode}: the password reached the server"
        );
    }
}

#[tokio::test]
async fn channel_binding_follows_the_rsa_pss_hash_parameter_and_fails_saying_why_when_undefined() {
    // RSASSA-PSS with SHA-384 in its parameters: the binding is the SHA-384
    // hash (libpq's X509_get_signature_info), not SHA-256.
    let pss = ServerCert::openssl_rsa_pss("sha384");
    let hostile = Hostile::fake(
        Tls::Cert(pss.clone()),
        Ask::Sasl(vec!["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]),
    )
    .await;
    let url = format!(
        "postgres://u:{SECRET}@127.0.0.1:{}/d?sslmode=require",
        hostile.port()
    );
    let (repl, meta) = both_fail(&url).await;
    assert_eq!(repl.sqlstate(), Some("28P01"), "{repl}");
    assert_eq!(meta.sqlstate(), Some("28P01"), "{meta}");
    all_bound(&hostile, 2, &pss.cert, &ring::digest::SHA384);

    // Ed25519 signs without a separate hash: RFC 5929 defines no binding.
    // The login fails saying so, before any SCRAM message, rather than
    // going on unbound ("n") or claiming the server does not bind ("y").
    let ed25519 = ServerCert::rcgen(&rcgen::PKCS_ED25519);
    let hostile = Hostile::fake(
        Tls::Cert(ed25519),
        Ask::Sasl(vec!["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]),
    )
    .await;
    let url = format!(
        "postgres://u:{SECRET}@127.0.0.1:{}/d?sslmode=require",
        hostile.port()
    );
    let (repl, meta) = both_fail(&url).await;
    for e in refusals(repl, meta) {
        assert!(
            matches!(
                e,
                AuthError::CannotBind(ChannelBindingError::NoHash("Ed25519"))
            ),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains("signed with Ed25519, which uses no separate hash"),
            "{e}"
        );
    }
    binaries_fail(&url, "cannot bind to the TLS session", SECRET).await;
    got_nothing(&hostile, SECRET);
}

#[tokio::test]
async fn a_server_with_a_self_signed_certificate_gets_no_password_under_sslmode_require() {
    for ask in [Ask::Cleartext, Ask::Md5] {
        let hostile = Hostile::fake(Tls::SelfSigned, ask.clone()).await;
        let url = format!(
            "postgres://u:{SECRET}@127.0.0.1:{}/d?sslmode=require",
            hostile.port()
        );
        let (repl, meta) = both_fail(&url).await;
        for e in refusals(repl, meta) {
            assert!(
                matches!(e, AuthError::PasswordToUnverifiedServer { .. }),
                "{ask:?}: {e}"
            );
            assert!(e.to_string().contains("not verified"), "{e}");
        }
        binaries_fail(&url, "Nothing was sent", SECRET).await;
        got_nothing(&hostile, SECRET);
    }
    // Offering SCRAM without -PLUS over that TLS: refused before the first
    // SCRAM message, which a relay would carry to the real server.
    let hostile = Hostile::fake(Tls::SelfSigned, Ask::Sasl(vec!["SCRAM-SHA-256"])).await;
    let url = format!(
        "postgres://u:{SECRET}@127.0.0.1:{}/d?sslmode=require",
        hostile.port()
    );
    let (repl, meta) = both_fail(&url).await;
    for e in refusals(repl, meta) {
        assert!(
            matches!(e, AuthError::UnboundOverUnverifiedTls { .. }),
            "{e}"
        );
    }
    got_nothing(&hostile, SECRET);
}

#[tokio::test]
async fn a_man_in_the_middle_with_a_self_signed_certificate_gets_no_session() {
    let pg = PgServer::start_default().await;
    let sessions = || async {
        pg.psql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE usename IN ('{SCRAM_USER}', '{MD5_USER}')"
        ))
        .await
    };
    // To the real server over TLS: it offers SCRAM-SHA-256-PLUS, walrelay
    // binds to the man in the middle's certificate, the server refuses.
    let relay = Hostile::relay(&pg, true).await;
    let url = pg
        .url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=require")
        .replace(&format!(":{}/", pg.port()), &format!(":{}/", relay.port()));
    let (repl, meta) = both_fail(&url).await;
    assert!(
        repl.sqlstate().is_some_and(|c| c.starts_with("28")),
        "replication connection: {repl}"
    );
    assert!(
        meta.sqlstate().is_some_and(|c| c.starts_with("28")),
        "metadata connection: {meta}"
    );
    assert!(
        repl.to_string().contains("channel binding"),
        "the server's reason: {repl}"
    );
    binaries_fail(&url, "channel binding", SCRAM_PASSWORD).await;
    assert!(
        !String::from_utf8_lossy(&relay.received()).contains(SCRAM_PASSWORD),
        "SCRAM never reveals the password"
    );

    // To the real server over plain TCP: it offers only SCRAM-SHA-256, which
    // walrelay refuses over TLS it did not verify (the man in the middle
    // would otherwise hold the session), and md5 gets nothing either.
    let relay = Hostile::relay(&pg, false).await;
    let through = |user, password, query: &str| {
        pg.url(user, Some(password), query)
            .replace(&format!(":{}/", pg.port()), &format!(":{}/", relay.port()))
    };
    let (repl, meta) = both_fail(&through(SCRAM_USER, SCRAM_PASSWORD, "sslmode=require")).await;
    for e in refusals(repl, meta) {
        assert!(
            matches!(e, AuthError::UnboundOverUnverifiedTls { .. }),
            "{e}"
        );
    }
    binaries_fail(
        &through(SCRAM_USER, SCRAM_PASSWORD, "sslmode=require"),
        "without channel binding",
        SCRAM_PASSWORD,
    )
    .await;
    let (repl, meta) = both_fail(&through(MD5_USER, MD5_PASSWORD, "sslmode=require")).await;
    for e in refusals(repl, meta) {
        assert!(
            matches!(e, AuthError::PasswordToUnverifiedServer { .. }),
            "{e}"
        );
    }
    got_nothing(&relay, MD5_PASSWORD);
    assert_eq!(sessions().await, "0", "a session of a test role is open");

    // verify-full never gets as far as the login.
    let ca = pg.ca_cert_path().unwrap();
    let url = through(
        SCRAM_USER,
        SCRAM_PASSWORD,
        &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
    );
    let (repl, meta) = both_fail(&url).await;
    assert!(
        matches!(
            repl,
            ConnError::Transport(TransportError::TlsHandshake { .. })
        ),
        "{repl}"
    );
    assert!(
        matches!(
            meta,
            MetadataError::Transport(TransportError::TlsHandshake { .. })
        ),
        "{meta}"
    );
    assert!(
        repl.to_string().contains("does not chain to a CA in"),
        "{repl}"
    );
}

#[tokio::test]
async fn a_server_claiming_an_enormous_message_is_dropped_before_the_login() {
    // A length near PostgreSQL's 1 GB limit, for an authentication request,
    // an error, a notice and a parameter status, followed by a few bytes:
    // walrelay must neither reserve it nor wait for it.
    for tag in [b'R', b'E', b'N', b'S'] {
        let hostile = Hostile::fake(Tls::Refuse, Ask::Claim(tag, (1 << 30) - 1)).await;
        let url = format!(
            "postgres://u:{SECRET}@127.0.0.1:{}/d?sslmode=disable&connect_timeout=30",
            hostile.port()
        );
        let (repl, meta) = both_fail(&url).await;
        assert!(
            matches!(repl, ConnError::Frame(FrameError::TooLong { .. })),
            "replication connection: {repl}"
        );
        assert!(
            matches!(
                meta,
                MetadataError::Refused(Refusal::Frame(FrameError::TooLong { .. }))
            ),
            "metadata connection: {meta}"
        );
        binaries_fail(&url, "before authentication completes", SECRET).await;
        got_nothing(&hostile, SECRET);
    }
}

/// A server whose certificate (from the harness's CA) has `sans` and the
/// Common Name `cn`, and the URL that logs in to it as `user` under
/// verify-full.
async fn named_server(
    sans: Vec<&'static str>,
    cn: &'static str,
    user: &str,
    password: &str,
) -> (PgServer, String) {
    let pg = PgServer::start(PgOptions {
        cert_names: CertNames {
            subject_alt_names: sans,
            common_name: cn,
        },
        ..PgOptions::default()
    })
    .await;
    let ca = pg.ca_cert_path().unwrap();
    let url = pg.url(
        user,
        Some(password),
        &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
    );
    (pg, url)
}

#[tokio::test]
async fn verify_full_falls_back_to_the_common_name_only_without_a_san_of_the_hosts_kind() {
    // Only a CN, the host's address.
    let (_pg, url) = named_server(vec![], "127.0.0.1", PLAIN_USER, PLAIN_PASSWORD).await;
    let p = params(&url);
    let mut conn = ReplicationConnection::connect(&p)
        .await
        .expect("replication connection");
    conn.identify_system().await.unwrap();
    metadata::connect(&p).await.expect("metadata connection");
    // A cleartext password may go there: the certificate was verified.
    let mut tail = Walrelay::tail(&url, &[]).await;
    tail.kill().await;

    // DNS names only, no IP address: for the address host, the CN still
    // counts (libpq checks it when no SAN is of the host's kind).
    let (_pg, url) = named_server(
        vec!["db.example.com"],
        "127.0.0.1",
        SCRAM_USER,
        SCRAM_PASSWORD,
    )
    .await;
    let p = params(&url);
    ReplicationConnection::connect(&p)
        .await
        .expect("replication connection, CN with DNS SANs only");
    metadata::connect(&p)
        .await
        .expect("metadata connection, CN with DNS SANs only");

    // An IP address SAN of another host: the CN is not compared, and the
    // refusal says so.
    let (_pg, url) =
        named_server(vec!["10.11.12.13"], "127.0.0.1", SCRAM_USER, SCRAM_PASSWORD).await;
    let (repl, meta) = both_fail(&url).await;
    for text in [repl.to_string(), meta.to_string()] {
        assert!(
            text.contains("IP 10.11.12.13")
                && text.contains("not for the host \"127.0.0.1\"")
                && text.contains(
                    "Common Name \"127.0.0.1\" was not compared, since it has IP addresses"
                ),
            "{text}"
        );
    }

    // A CN that is another host: refused, naming what the certificate is for.
    let (_pg, url) = named_server(vec![], "db.example.com", SCRAM_USER, SCRAM_PASSWORD).await;
    let (repl, meta) = both_fail(&url).await;
    for text in [repl.to_string(), meta.to_string()] {
        assert!(
            text.contains(
                "is for \"db.example.com\" (Common Name) and not for the host \"127.0.0.1\""
            ),
            "{text}"
        );
    }
    binaries_fail(&url, "(Common Name) and not for the host", SCRAM_PASSWORD).await;
}

#[tokio::test]
async fn sslmode_require_verifies_the_chain_with_the_default_root_file_as_libpq_does() {
    let pg = PgServer::start_default().await;
    let url = pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=require");
    let home = tempfile::tempdir().unwrap();
    let home_dir = home.path().to_str().unwrap();
    std::fs::create_dir(home.path().join(".postgresql")).unwrap();
    let root = home.path().join(".postgresql/root.crt");

    // Another CA's certificate in ~/.postgresql/root.crt: the server's is refused.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut other = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    other.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&root, other.self_signed(&key).unwrap().pem()).unwrap();
    let mut w = Walrelay::spawn(&["tail", "--postgres-url", &url], &[("HOME", home_dir)]);
    assert_eq!(w.wait(WAIT).await.code(), Some(1), "{}", w.stderr_text());
    assert!(
        w.stderr_text().contains("does not chain to a CA in")
            && w.stderr_text().contains(".postgresql/root.crt"),
        "{}",
        w.stderr_text()
    );

    // The server's CA there: verified, and then a password may go to it.
    std::fs::copy(pg.ca_cert_path().unwrap(), &root).unwrap();
    let md5 = pg.url(MD5_USER, Some(MD5_PASSWORD), "sslmode=require");
    let mut w = Walrelay::spawn(&["tail", "--postgres-url", &md5], &[("HOME", home_dir)]);
    w.wait_for_stderr("tailing", WAIT).await;
    w.kill().await;
}

#[tokio::test]
async fn sslrootcert_system_means_verify_full_as_in_libpq_16() {
    let pg = PgServer::start_default().await;
    // A weaker sslmode with it is a configuration error, before connecting.
    let url = pg.url(
        SCRAM_USER,
        Some(SCRAM_PASSWORD),
        "sslrootcert=system&sslmode=require",
    );
    let mut w = Walrelay::spawn(&["tail", "--postgres-url", &url], &[]);
    assert_eq!(w.wait(WAIT).await.code(), Some(2), "{}", w.stderr_text());
    assert!(
        w.stderr_text()
            .contains("weak sslmode \"require\" with sslrootcert=system"),
        "{}",
        w.stderr_text()
    );
    // Without an sslmode it is verify-full: the test CA is not among the
    // system's roots, so the server is refused.
    let url = pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslrootcert=system");
    let (repl, _) = both_fail(&url).await;
    assert!(
        matches!(
            repl,
            ConnError::Transport(TransportError::TlsHandshake { .. }) | ConnError::TlsSetup(_)
        ),
        "{repl}"
    );
}

//! Both connections against a real server: every authentication method,
//! every sslmode, the authentication policy, and the errors an operator
//! meets first.
use walrelay::pg::auth::{AuthError, AuthMethod};
use walrelay::pg::conn::{ConnError, ReplicationConnection};
use walrelay::pg::guard::Refusal;
use walrelay::pg::metadata::{self, MetadataError};
use walrelay::pg::params::ConnectParams;
use walrelay::pg::transport::TransportError;

use crate::support::postgres::{
    MD5_PASSWORD, MD5_USER, PLAIN_PASSWORD, PLAIN_USER, PgOptions, PgServer, SCRAM_PASSWORD,
    SCRAM_USER, TEST_ROLES, TRUST_USER,
};

fn params(url: &str) -> ConnectParams {
    // No PG* variable of the test runner may change what is tested.
    ConnectParams::from_url_with_env(url, |_| None).expect("valid URL")
}

async fn connect(url: &str) -> Result<ReplicationConnection, ConnError> {
    ReplicationConnection::connect(&params(url)).await
}

/// Whether the walsender of `conn` runs over TLS, as the server sees it.
async fn server_sees_tls(pg: &PgServer, conn: &ReplicationConnection) -> bool {
    let row = pg
        .client()
        .await
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = $1",
            &[&conn.backend_pid()],
        )
        .await
        .expect("pg_stat_ssl");
    row.get(0)
}

/// Whether the metadata connection `client` runs over TLS, as the server sees it.
async fn metadata_sees_tls(client: &metadata::Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0)
}

/// Opens both connections with `p`; panics naming `what` unless both log in
/// and the server sees TLS as `tls` says. Returns how the server
/// authenticated the metadata connection.
async fn both_log_in(pg: &PgServer, p: &ConnectParams, tls: bool, what: &str) -> AuthMethod {
    let mut conn = ReplicationConnection::connect(p)
        .await
        .unwrap_or_else(|e| panic!("replication connection, {what}: {e}"));
    let system = conn.identify_system().await.expect("IDENTIFY_SYSTEM");
    assert!(system.timeline >= 1);
    assert_eq!(system.dbname.as_deref(), Some("walrelay_test"));
    assert_eq!(server_sees_tls(pg, &conn).await, tls, "{what}");
    let client = metadata::connect(p)
        .await
        .unwrap_or_else(|e| panic!("metadata connection, {what}: {e}"));
    assert_eq!(metadata_sees_tls(&client).await, tls, "{what}");
    client.auth_method().expect("the server said how")
}

/// Both connections' errors with `p`, each required to be a refusal by the
/// authentication policy.
async fn both_refused(p: &ConnectParams, what: &str) -> (AuthError, AuthError) {
    let repl = match ReplicationConnection::connect(p).await {
        Err(ConnError::Auth(e)) => e,
        Err(other) => panic!("replication connection, {what}: {other}"),
        Ok(_) => panic!("replication connection, {what}: logged in"),
    };
    let meta = match metadata::connect(p).await {
        Err(MetadataError::Refused(Refusal::Auth(e))) => e,
        Err(other) => panic!("metadata connection, {what}: {other}"),
        Ok(_) => panic!("metadata connection, {what}: logged in"),
    };
    (repl, meta)
}

#[tokio::test]
async fn every_auth_method_logs_in_over_a_verified_connection_or_by_opt_in() {
    let pg = PgServer::start_default().await;
    let ca = pg.ca_cert_path().expect("TLS is on");
    let ca = ca.to_str().unwrap();
    // (mode, TLS, certificate verified)
    let modes = [
        ("sslmode=disable".to_owned(), false, false),
        ("sslmode=prefer".to_owned(), true, false),
        ("sslmode=require".to_owned(), true, false),
        (format!("sslmode=verify-ca&sslrootcert={ca}"), true, true),
        (format!("sslmode=verify-full&sslrootcert={ca}"), true, true),
    ];
    for role in TEST_ROLES {
        for (mode, tls, verified) in &modes {
            let url = pg.url(role.name, role.password, mode);
            let what = format!("{} with {mode}", role.name);
            let expected = match (role.method, tls) {
                ("md5", _) => AuthMethod::Md5,
                ("password", _) => AuthMethod::Password,
                ("trust", _) => AuthMethod::None,
                // PostgreSQL offers SCRAM-SHA-256-PLUS over TLS: bound.
                (_, true) => AuthMethod::ScramSha256Plus,
                (_, false) => AuthMethod::ScramSha256,
            };
            if !expected.weaker_than_scram() || *verified {
                let method = both_log_in(&pg, &params(&url), *tls, &what).await;
                assert_eq!(method, expected, "{what}");
                continue;
            }
            // A password over an unverified connection: refused by both,
            // before anything is sent.
            let (repl, meta) = both_refused(&params(&url), &what).await;
            for e in [repl, meta] {
                assert!(
                    matches!(e, AuthError::PasswordToUnverifiedServer { .. }),
                    "{what}: {e}"
                );
            }
            // Nor with only one half of the opt-in.
            let named = format!("{url}&require_auth={}", role.method);
            let mut flagged = params(&url);
            flagged.auth.allow_unverified_password = true;
            for (p, half) in [
                (params(&named), "require_auth"),
                (flagged, "--allow-password-to-unverified-server"),
            ] {
                let (repl, meta) = both_refused(&p, &what).await;
                for e in [repl, meta] {
                    assert!(
                        matches!(e, AuthError::PasswordToUnverifiedServer { .. }),
                        "{what}, only {half}: {e}"
                    );
                }
            }
            // Both: require_auth naming the method, and the flag.
            let mut opted_in = params(&named);
            opted_in.auth.allow_unverified_password = true;
            let method = both_log_in(&pg, &opted_in, *tls, &what).await;
            assert_eq!(method, expected, "{what}, opted in");
        }
    }
}

#[tokio::test]
async fn require_auth_and_channel_binding_hold_against_a_real_server() {
    let pg = PgServer::start_default().await;
    let ca = pg.ca_cert_path().unwrap();
    let verified = format!("sslmode=verify-full&sslrootcert={}", ca.display());
    // channel_binding=require: SCRAM over TLS binds and logs in ...
    let url = pg.url(
        SCRAM_USER,
        Some(SCRAM_PASSWORD),
        "sslmode=require&channel_binding=require",
    );
    let method = both_log_in(&pg, &params(&url), true, "channel_binding=require").await;
    assert_eq!(method, AuthMethod::ScramSha256Plus);
    // ... md5 and trust do not even over a verified connection, nor SCRAM without TLS.
    for (user, password, query) in [
        (MD5_USER, Some(MD5_PASSWORD), verified.as_str()),
        (TRUST_USER, None, verified.as_str()),
        (SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable"),
    ] {
        let url = pg.url(user, password, &format!("{query}&channel_binding=require"));
        let (repl, meta) = both_refused(&params(&url), user).await;
        for e in [repl, meta] {
            assert!(
                matches!(e, AuthError::ChannelBindingRequired { .. }),
                "{user}: {e}"
            );
        }
    }
    // require_auth=scram-sha-256 refuses md5 and trust, as libpq does.
    for (user, password, reason) in [
        (
            MD5_USER,
            Some(MD5_PASSWORD),
            "server requested a hashed password",
        ),
        (
            PLAIN_USER,
            Some(PLAIN_PASSWORD),
            "server requested a cleartext password",
        ),
        (TRUST_USER, None, "server did not complete authentication"),
    ] {
        let url = pg.url(
            user,
            password,
            &format!("{verified}&require_auth=scram-sha-256"),
        );
        let (repl, meta) = both_refused(&params(&url), user).await;
        for e in [repl, meta] {
            assert!(
                matches!(&e, AuthError::RequireAuth { reason: r, .. } if *r == reason),
                "{user}: {e}"
            );
        }
    }
    // require_auth=!none refuses trust; none allows it.
    let url = pg.url(TRUST_USER, None, &format!("{verified}&require_auth=!none"));
    both_refused(&params(&url), "!none").await;
    let url = pg.url(TRUST_USER, None, &format!("{verified}&require_auth=none"));
    both_log_in(&pg, &params(&url), true, "none").await;
}

#[tokio::test]
async fn a_wrong_password_is_the_servers_error_without_the_password() {
    let pg = PgServer::start_default().await;
    let wrong = "not-the-Password-93";
    // Verified, so that md5 and password may be answered at all.
    let verified = format!(
        "sslmode=verify-full&sslrootcert={}",
        pg.ca_cert_path().unwrap().display()
    );
    for user in [SCRAM_USER, MD5_USER, PLAIN_USER] {
        let Err(err) = connect(&pg.url(user, Some(wrong), &verified)).await else {
            panic!("{user} logged in with a wrong password");
        };
        assert_eq!(err.sqlstate(), Some("28P01"), "{user}: {err}");
        assert!(
            !err.is_transient(),
            "{user}: a wrong password must not be retried forever"
        );
        let text = format!("{err} {err:?}");
        assert!(text.contains("password authentication failed"), "{text}");
        assert!(!text.contains(wrong), "the password leaked: {text}");
    }
    // Asked for a password and given none.
    let err = connect(&pg.url(SCRAM_USER, None, "sslmode=disable"))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnError::NoPassword), "{err}");
}

#[tokio::test]
async fn the_password_can_come_from_pgpassword() {
    let pg = PgServer::start_default().await;
    let url = pg.url(SCRAM_USER, None, "sslmode=disable");
    let p = ConnectParams::from_url_with_env(&url, |name| {
        (name == "PGPASSWORD").then(|| SCRAM_PASSWORD.to_owned())
    })
    .unwrap();
    ReplicationConnection::connect(&p)
        .await
        .expect("PGPASSWORD is used");
}

#[tokio::test]
async fn verification_rejects_an_unknown_ca_and_a_foreign_host_name() {
    let pg = PgServer::start(PgOptions {
        // A second address, so the certificate (for localhost and 127.0.0.1)
        // is presented to a client that asked for another name.
        extra_conf: vec!["listen_addresses = '127.0.0.1,127.0.0.2'".into()],
        ..PgOptions::default()
    })
    .await;
    let ca = pg.ca_cert_path().unwrap();
    let ca = ca.to_str().unwrap();

    // A CA that did not sign the server's certificate.
    let other = tempfile::tempdir().unwrap();
    let other_ca = other.path().join("other-ca.crt");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut cp = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    cp.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&other_ca, cp.self_signed(&key).unwrap().pem()).unwrap();
    let url = pg.url(
        SCRAM_USER,
        Some(SCRAM_PASSWORD),
        &format!("sslmode=verify-ca&sslrootcert={}", other_ca.display()),
    );
    let err = connect(&url).await.expect_err("an unknown CA is refused");
    assert!(
        matches!(
            err,
            ConnError::Transport(TransportError::TlsHandshake { .. })
        ),
        "{err}"
    );
    assert!(!err.is_transient(), "{err}");

    // The right CA, the wrong name: verify-full refuses, verify-ca accepts.
    let foreign = |mode: &str| {
        pg.url(
            SCRAM_USER,
            Some(SCRAM_PASSWORD),
            &format!("sslmode={mode}&sslrootcert={ca}"),
        )
        .replace("127.0.0.1", "127.0.0.2")
    };
    let err = connect(&foreign("verify-full"))
        .await
        .expect_err("wrong host refused");
    assert!(
        matches!(
            err,
            ConnError::Transport(TransportError::TlsHandshake { .. })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("certificate"), "{err}");
    connect(&foreign("verify-ca"))
        .await
        .expect("verify-ca does not check the name");
}

#[tokio::test]
async fn a_server_without_tls_fails_require_and_serves_prefer_in_plain() {
    let pg = PgServer::start(PgOptions {
        tls: false,
        ..PgOptions::default()
    })
    .await;
    let err = connect(&pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=require"))
        .await
        .expect_err("require without server TLS");
    assert!(
        matches!(err, ConnError::Transport(TransportError::TlsRefused { .. })),
        "{err}"
    );
    let conn = connect(&pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=prefer"))
        .await
        .unwrap();
    assert!(!server_sees_tls(&pg, &conn).await);
}

#[tokio::test]
async fn server_errors_carry_their_sqlstate() {
    let pg = PgServer::start_default().await;
    let mut conn = connect(&pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable"))
        .await
        .unwrap();
    let err = conn
        .simple_query("SELECT * FROM no_such_table")
        .await
        .unwrap_err();
    assert_eq!(err.sqlstate(), Some("42P01"), "{err}");
    assert!(err.to_string().contains("no_such_table"), "{err}");
    // The connection survives an error.
    let rows = conn.simple_query("SELECT 1 + 1").await.unwrap();
    assert_eq!(rows, vec![vec![Some("2".to_owned())]]);
    // A database that does not exist.
    let url = pg
        .url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable")
        .replace("/walrelay_test", "/nodb");
    let err = connect(&url).await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("3D000"), "{err}");
    // Nothing listens.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let err = connect(&format!("postgres://u@127.0.0.1:{port}/d?sslmode=disable"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConnError::Transport(TransportError::Connect { .. })) && err.is_transient(),
        "{err}"
    );
}

/// One backend message: tag, length, body.
fn backend_message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(i32::try_from(body.len() + 4).unwrap()).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// A NoticeResponse and a ParameterStatus: what an odd server or a pooler
/// may send at any point, answering nothing.
fn noise() -> Vec<u8> {
    let mut notice = Vec::new();
    for (field, value) in [
        (b'S', "NOTICE"),
        (b'V', "NOTICE"),
        (b'C', "00000"),
        (b'M', "noise"),
    ] {
        notice.push(field);
        notice.extend_from_slice(value.as_bytes());
        notice.push(0);
    }
    notice.push(0);
    let mut out = backend_message(b'N', &notice);
    out.extend(backend_message(b'S', b"application_name\0noise\0"));
    out
}

/// Reads one backend message (tag and body) from `from`.
async fn read_backend_message(
    from: &mut (impl tokio::io::AsyncRead + Unpin),
) -> std::io::Result<(u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt as _;
    let tag = from.read_u8().await?;
    let len = usize::try_from(from.read_i32().await?).unwrap();
    let mut body = vec![0; len - 4];
    from.read_exact(&mut body).await?;
    Ok((tag, body))
}

/// A plain-TCP proxy in front of `pg` that puts [`noise`] before every
/// authentication message of the server, until the login completes.
async fn noisy_login_proxy(pg: &PgServer) -> u16 {
    use tokio::io::AsyncWriteExt as _;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let upstream = pg.port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let server = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await?;
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(
                    async move { tokio::io::copy(&mut client_read, &mut server_write).await },
                );
                loop {
                    let (tag, body) = read_backend_message(&mut server_read).await?;
                    if tag == b'R' {
                        client_write.write_all(&noise()).await?;
                    }
                    client_write.write_all(&backend_message(tag, &body)).await?;
                    if tag == b'Z' {
                        break;
                    }
                }
                tokio::io::copy(&mut server_read, &mut client_write).await?;
                std::io::Result::Ok(())
            });
        }
    });
    port
}

#[tokio::test]
async fn notices_and_parameter_statuses_during_login_are_not_taken_for_answers() {
    let pg = PgServer::start_default().await;
    let proxy = noisy_login_proxy(&pg).await;
    for role in TEST_ROLES {
        // A plain-TCP proxy: md5 and password need the user's opt-in
        // (require_auth naming the method, and the flag).
        let url = pg.url(
            role.name,
            role.password,
            &format!(
                "sslmode=disable&port={proxy}&require_auth={}",
                match role.method {
                    "trust" => "none",
                    method => method,
                }
            ),
        );
        let user = role.name;
        let mut p = params(&url);
        p.auth.allow_unverified_password = true;
        let mut conn = ReplicationConnection::connect(&p)
            .await
            .unwrap_or_else(|e| panic!("{user} through the noisy proxy: {e}"));
        let system = conn.identify_system().await.expect("IDENTIFY_SYSTEM");
        assert_eq!(system.dbname.as_deref(), Some("walrelay_test"), "{user}");
        // The metadata connection skips them too (tokio-postgres alone
        // would take them for a wrong answer and give up).
        let client = metadata::connect(&p).await.unwrap_or_else(|e| {
            panic!("{user}'s metadata connection through the noisy proxy: {e}")
        });
        let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1);
    }
    // A wrong password is still the server's error, noise or not.
    let url = pg.url(
        SCRAM_USER,
        Some("wrong"),
        &format!("sslmode=disable&port={proxy}"),
    );
    let err = connect(&url).await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("28P01"), "{err}");
}

/// A server that never proves it knows the password: it answers the SCRAM
/// client's proof with a notice and then declares the session ready.
async fn proofless_scram_server() -> u16 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut client, _) = listener.accept().await?;
        // StartupMessage: length, then the rest.
        let len = usize::try_from(client.read_i32().await?).unwrap();
        client.read_exact(&mut vec![0; len - 4]).await?;
        client
            .write_all(&backend_message(b'R', b"\0\0\0\x0aSCRAM-SHA-256\0\0"))
            .await?;
        // SASLInitialResponse: mechanism, then the client-first-message,
        // "n,,n=,r=<client nonce>".
        let (_, body) = read_backend_message(&mut client).await?;
        let first = String::from_utf8_lossy(&body);
        let nonce = first.rsplit("r=").next().unwrap().to_owned();
        let server_first = format!("r={nonce}fakeserver,s=c2FsdHNhbHQ=,i=4096");
        let mut cont = 11_i32.to_be_bytes().to_vec();
        cont.extend_from_slice(server_first.as_bytes());
        client.write_all(&backend_message(b'R', &cont)).await?;
        // SASLResponse with the client's proof; no SASLFinal ever comes.
        read_backend_message(&mut client).await?;
        client.write_all(&noise()).await?;
        client.write_all(&backend_message(b'Z', b"I")).await?;
        // Hold the connection open until the client leaves.
        let _ = client.read_u8().await;
        std::io::Result::Ok(())
    });
    port
}

#[tokio::test]
async fn a_server_that_skips_the_scram_proof_behind_a_notice_is_refused() {
    let port = proofless_scram_server().await;
    let url = format!("postgres://u:secret@127.0.0.1:{port}/d?sslmode=disable");
    let result = tokio::time::timeout(std::time::Duration::from_secs(30), connect(&url))
        .await
        .expect("the login neither failed nor succeeded");
    let Err(err) = result else {
        panic!("logged in without the server's SCRAM proof");
    };
    assert!(
        matches!(err, ConnError::Protocol(_)) && err.to_string().contains("SASL final"),
        "{err}"
    );
}

/// A server that lets anyone in, then never answers a query: a frozen
/// backend, as far as the client can tell.
async fn silent_server() -> u16 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let len = usize::try_from(client.read_i32().await?).unwrap();
                client.read_exact(&mut vec![0; len - 4]).await?;
                client.write_all(&backend_message(b'R', &[0; 4])).await?;
                client.write_all(&backend_message(b'Z', b"I")).await?;
                // Read and ignore whatever comes, until the client leaves.
                let mut sink = [0; 1024];
                while client.read(&mut sink).await? > 0 {}
                std::io::Result::Ok(())
            });
        }
    });
    port
}

#[tokio::test]
async fn replication_commands_that_get_no_answer_time_out_naming_the_command() {
    use std::time::Duration;
    use walrelay::pg::lsn::Lsn;
    use walrelay::pg::request::TimedOut;

    let port = silent_server().await;
    let mut p = params(&format!("postgres://u@127.0.0.1:{port}/d?sslmode=disable"));
    p.requests.timeout = Duration::from_millis(300);

    let mut conn = ReplicationConnection::connect(&p).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(30), conn.show("wal_sender_timeout"))
        .await
        .expect("SHOW hung")
        .unwrap_err();
    let show = TimedOut {
        request: "SHOW \"wal_sender_timeout\"".into(),
        after: Duration::from_millis(300),
    };
    assert!(
        matches!(&err, ConnError::RequestTimeout(t) if *t == show) && err.is_transient(),
        "{err}"
    );
    // The connection is not used again: a late answer to SHOW would be taken
    // for the next command's.
    let err = conn.simple_query("IDENTIFY_SYSTEM").await.unwrap_err();
    assert!(
        matches!(&err, ConnError::RequestTimeout(t) if *t == show),
        "{err}"
    );

    let conn = ReplicationConnection::connect(&p).await.unwrap();
    let start = conn.start_logical("walrelay", Lsn::ZERO, &[("proto_version", "1")]);
    let err = tokio::time::timeout(Duration::from_secs(30), start)
        .await
        .expect("START_REPLICATION hung")
        .unwrap_err();
    assert!(
        err.is_transient()
            && err
                .to_string()
                .contains("did not answer `START_REPLICATION SLOT \"walrelay\" LOGICAL 0/0"),
        "{err}"
    );
}

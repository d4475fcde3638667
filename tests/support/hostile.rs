//! Servers that want something from walrelay: a fake PostgreSQL that strips
//! TLS or presents a self-signed certificate and asks for a password, one
//! that claims an enormous message, and a man in the middle that relays to a
//! real server. Each records every byte a client sent it after the startup
//! message, connection by connection, so a test can assert what never left
//! walrelay. A fake that offers SCRAM plays the exchange as far as the
//! client's proof (with a salt and nonce of its own), so the client's final
//! message, which carries the channel binding, is recorded too.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::postgres::PgServer;

/// The code of an SSLRequest.
const SSL_REQUEST: i32 = 80_877_103;

/// How long a fake server waits for more from a client before it gives up on it.
const IDLE: Duration = Duration::from_secs(20);

/// What a fake server says after the client's startup message.
#[derive(Debug, Clone)]
pub enum Ask {
    /// AuthenticationCleartextPassword.
    Cleartext,
    /// AuthenticationMD5Password.
    Md5,
    /// AuthenticationSASL offering these mechanisms; the fake answers the
    /// client's first SCRAM message with a challenge of its own, and its
    /// proof with an error.
    Sasl(Vec<&'static str>),
    /// A message with this tag claiming this length (which counts itself),
    /// and then only a few bytes of it.
    Claim(u8, u32),
}

/// How a fake server answers an SSLRequest.
#[derive(Debug, Clone)]
pub enum Tls {
    /// `N`: no TLS here (as a man in the middle that strips it).
    Refuse,
    /// `S`, then a handshake with a fresh self-signed ECDSA P-256
    /// certificate for `localhost` and `127.0.0.1`.
    SelfSigned,
    /// `S`, then a handshake with this certificate.
    Cert(ServerCert),
}

/// A server certificate (DER) and its PKCS #8 private key (DER).
#[derive(Debug, Clone)]
pub struct ServerCert {
    pub cert: Vec<u8>,
    key: Vec<u8>,
}

impl ServerCert {
    /// Self-signed by rcgen with `algorithm`, for `localhost` and `127.0.0.1`.
    pub fn rcgen(algorithm: &'static rcgen::SignatureAlgorithm) -> Self {
        let key = rcgen::KeyPair::generate_for(algorithm).unwrap();
        let cert =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
        ServerCert {
            cert: cert.der().to_vec(),
            key: key.serialize_der(),
        }
    }

    /// Self-signed by the openssl command with an RSA key, the signature
    /// RSASSA-PSS over `hash` (`sha256`, `sha384`, `sha512`): rcgen
    /// cannot sign RSASSA-PSS, nor ring make RSA keys.
    pub fn openssl_rsa_pss(hash: &str) -> Self {
        use rustls::pki_types::PrivateKeyDer;
        use rustls::pki_types::pem::PemObject as _;
        let dir = tempfile::tempdir().unwrap();
        let (key, cert) = (dir.path().join("key.pem"), dir.path().join("cert.der"));
        let output = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout"])
            .arg(&key)
            .args([
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost,IP:127.0.0.1",
                "-days",
                "2",
                &format!("-{hash}"),
                "-sigopt",
                "rsa_padding_mode:pss",
                "-sigopt",
                "rsa_pss_saltlen:digest",
                "-outform",
                "DER",
                "-out",
            ])
            .arg(&cert)
            .output()
            .expect("the openssl command");
        assert!(
            output.status.success(),
            "openssl req: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let PrivateKeyDer::Pkcs8(key) = PrivateKeyDer::from_pem_file(&key).unwrap() else {
            panic!("openssl 3 writes PKCS #8 keys");
        };
        ServerCert {
            cert: std::fs::read(&cert).unwrap(),
            key: key.secret_pkcs8_der().to_vec(),
        }
    }
}

/// A server listening on 127.0.0.1 that records what clients send it.
pub struct Hostile {
    port: u16,
    /// What each connection's client sent, in the order they connected.
    received: Arc<Mutex<Vec<Vec<u8>>>>,
}

/// Where one connection records what its client sends.
#[derive(Clone)]
struct Recorder {
    all: Arc<Mutex<Vec<Vec<u8>>>>,
    index: usize,
}

impl Recorder {
    fn new(all: &Arc<Mutex<Vec<Vec<u8>>>>) -> Self {
        let mut received = all.lock().unwrap();
        received.push(Vec::new());
        Recorder {
            all: all.clone(),
            index: received.len() - 1,
        }
    }

    fn record(&self, bytes: &[u8]) {
        self.all.lock().unwrap()[self.index].extend_from_slice(bytes);
    }
}

impl Hostile {
    /// A fake PostgreSQL that answers SSLRequest as `tls` says and then asks `ask`.
    pub async fn fake(tls: Tls, ask: Ask) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let this = Self::new(&listener);
        let received = this.received.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (recorder, ask, tls) = (Recorder::new(&received), ask.clone(), tls.clone());
                tokio::spawn(async move {
                    let Ok((client, _)) = accept(client, &tls).await else {
                        return;
                    };
                    let _ = fake_login(client, ask, recorder).await;
                });
            }
        });
        this
    }

    /// A man in the middle in front of `pg`: to the client it presents a
    /// self-signed certificate; to the server it connects over TLS (verified
    /// with the harness's CA) when `upstream_tls`, else over plain TCP, and
    /// relays every byte both ways.
    pub async fn relay(pg: &PgServer, upstream_tls: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let this = Self::new(&listener);
        let received = this.received.clone();
        let (port, ca) = (pg.port(), pg.ca_cert_path());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (received, ca) = (Recorder::new(&received), ca.clone());
                tokio::spawn(async move {
                    let Ok((client, startup)) = accept(client, &Tls::SelfSigned).await else {
                        return;
                    };
                    let mut upstream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
                    if upstream_tls {
                        let mut upstream = upstream_tls_to(upstream, &ca.unwrap()).await;
                        upstream.write_all(&startup).await.unwrap();
                        relay(client, upstream, received).await;
                    } else {
                        upstream.write_all(&startup).await.unwrap();
                        relay(client, upstream, received).await;
                    }
                });
            }
        });
        this
    }

    fn new(listener: &TcpListener) -> Self {
        Hostile {
            port: listener.local_addr().unwrap().port(),
            received: Arc::default(),
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// How many connections it accepted.
    pub fn connections(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// Every byte clients sent after their startup message (after TLS, if
    /// any), all connections together.
    pub fn received(&self) -> Vec<u8> {
        self.received.lock().unwrap().concat()
    }

    /// The messages (tag and body) each connection's client sent after its
    /// startup message.
    pub fn messages(&self) -> Vec<Vec<(char, Vec<u8>)>> {
        let received = self.received.lock().unwrap();
        received.iter().map(|bytes| frames(bytes)).collect()
    }

    /// The tags of the messages clients sent after their startup message.
    pub fn received_tags(&self) -> Vec<char> {
        self.messages()
            .into_iter()
            .flatten()
            .map(|(tag, _)| tag)
            .collect()
    }
}

/// The tagged messages in `bytes` (a last one cut short included).
fn frames(mut bytes: &[u8]) -> Vec<(char, Vec<u8>)> {
    let mut messages = Vec::new();
    while let [tag, a, b, c, d, rest @ ..] = bytes {
        let len = (u32::from_be_bytes([*a, *b, *c, *d]) as usize).saturating_sub(4);
        let len = len.min(rest.len());
        messages.push((char::from(*tag), rest[..len].to_vec()));
        bytes = &rest[len..];
    }
    messages
}

/// A SASLInitialResponse body split: the mechanism, and the client's first
/// message.
pub fn split_sasl_initial(body: &[u8]) -> (String, String) {
    let nul = body.iter().position(|b| *b == 0).expect("mechanism name");
    let first = body.get(nul + 5..).unwrap_or_default();
    (
        String::from_utf8_lossy(&body[..nul]).into_owned(),
        String::from_utf8_lossy(first).into_owned(),
    )
}

/// A stream of either kind.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Answers an SSLRequest (if the client sends one) as `tls` says and reads
/// the startup message; returns the stream the login continues on, and the
/// startup message.
async fn accept(mut client: TcpStream, tls: &Tls) -> std::io::Result<(Box<dyn Stream>, Vec<u8>)> {
    let len = client.read_i32().await?;
    let code = client.read_i32().await?;
    let mut client: Box<dyn Stream> = if code == SSL_REQUEST {
        match tls {
            Tls::Refuse => {
                client.write_all(b"N").await?;
                Box::new(client)
            }
            Tls::SelfSigned => {
                client.write_all(b"S").await?;
                let cert = ServerCert::rcgen(&rcgen::PKCS_ECDSA_P256_SHA256);
                Box::new(acceptor(&cert).accept(client).await?)
            }
            Tls::Cert(cert) => {
                client.write_all(b"S").await?;
                Box::new(acceptor(cert).accept(client).await?)
            }
        }
    } else {
        // No SSLRequest (sslmode=disable): that was the startup message.
        let mut startup = [len.to_be_bytes(), code.to_be_bytes()].concat();
        startup.resize(usize::try_from(len).unwrap(), 0);
        client.read_exact(&mut startup[8..]).await?;
        return Ok((Box::new(client), startup));
    };
    let len = client.read_i32().await?;
    let mut startup = len.to_be_bytes().to_vec();
    startup.resize(usize::try_from(len).unwrap(), 0);
    client.read_exact(&mut startup[4..]).await?;
    Ok((client, startup))
}

/// Asks `ask`, then records what the client sends until it leaves: a
/// password is answered with an error, a SCRAM first message with a
/// challenge, a SCRAM proof with an error.
async fn fake_login(
    mut client: Box<dyn Stream>,
    ask: Ask,
    received: Recorder,
) -> std::io::Result<()> {
    let message = match &ask {
        Ask::Cleartext => authentication(3, &[]),
        Ask::Md5 => authentication(5, &[0x5a, 0x17, 0x2c, 0x01]),
        Ask::Sasl(mechanisms) => {
            let mut data = Vec::new();
            for m in mechanisms {
                data.extend_from_slice(m.as_bytes());
                data.push(0);
            }
            data.push(0);
            authentication(10, &data)
        }
        Ask::Claim(tag, len) => {
            let mut message = vec![*tag];
            message.extend_from_slice(&len.to_be_bytes());
            message.extend_from_slice(&[0; 64]);
            message
        }
    };
    client.write_all(&message).await?;
    client.flush().await?;
    let mut scram_started = false;
    loop {
        let Ok(tag) = tokio::time::timeout(IDLE, client.read_u8()).await else {
            return Ok(());
        };
        let tag = tag?;
        let len = client.read_u32().await?;
        // A client's login messages are small: read at most 64 KiB of one.
        let mut body = vec![0; usize::try_from(len.saturating_sub(4)).unwrap().min(1 << 16)];
        client.read_exact(&mut body).await?;
        received.record(&[&[tag][..], &len.to_be_bytes(), &body].concat());
        let answer = match (tag, &ask) {
            (b'p', Ask::Sasl(_)) if !scram_started => {
                scram_started = true;
                let (_, first) = split_sasl_initial(&body);
                let nonce = first
                    .split(',')
                    .find_map(|part| part.strip_prefix("r="))
                    .unwrap_or_default()
                    .to_owned();
                // "saltsaltsalt" in base64, PostgreSQL's default iterations.
                let challenge = format!("r={nonce}fake-server-nonce,s=c2FsdHNhbHRzYWx0,i=4096");
                authentication(11, challenge.as_bytes())
            }
            (b'p', _) => login_failed(),
            _ => return Ok(()),
        };
        client.write_all(&answer).await?;
        client.flush().await?;
    }
}

/// ErrorResponse 28P01, as PostgreSQL answers a wrong password.
fn login_failed() -> Vec<u8> {
    let mut fields = Vec::new();
    for (code, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', "28P01"),
        (b'M', "password authentication failed for user \"u\""),
    ] {
        fields.push(code);
        fields.extend_from_slice(value.as_bytes());
        fields.push(0);
    }
    fields.push(0);
    let mut message = vec![b'E'];
    message.extend_from_slice(&i32::try_from(4 + fields.len()).unwrap().to_be_bytes());
    message.extend_from_slice(&fields);
    message
}

/// An authentication request: code, then data.
fn authentication(code: i32, data: &[u8]) -> Vec<u8> {
    let mut message = vec![b'R'];
    message.extend_from_slice(&i32::try_from(8 + data.len()).unwrap().to_be_bytes());
    message.extend_from_slice(&code.to_be_bytes());
    message.extend_from_slice(data);
    message
}

/// Copies both ways until either side closes, recording the client's bytes.
async fn relay(
    client: Box<dyn Stream>,
    upstream: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    received: Recorder,
) {
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    let up = async move {
        let mut buf = [0; 4096];
        while let Ok(n) = client_read.read(&mut buf).await {
            if n == 0 {
                break;
            }
            received.record(&buf[..n]);
            if upstream_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = upstream_write.shutdown().await;
    };
    let down = async move {
        let _ = tokio::io::copy(&mut upstream_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    tokio::join!(up, down);
}

/// A TLS acceptor that presents `cert`.
fn acceptor(cert: &ServerCert) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key.clone()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![CertificateDer::from(cert.cert.clone())], key)
    .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// TLS to the real server, as PostgreSQL starts it, verified with its CA.
async fn upstream_tls_to(
    mut upstream: TcpStream,
    ca: &std::path::Path,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut request = Vec::new();
    request.extend_from_slice(&8_i32.to_be_bytes());
    request.extend_from_slice(&SSL_REQUEST.to_be_bytes());
    upstream.write_all(&request).await.unwrap();
    assert_eq!(upstream.read_u8().await.unwrap(), b'S');
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), upstream)
        .await
        .unwrap()
}

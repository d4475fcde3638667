//! TLS for both PostgreSQL connections, by `sslmode`, on rustls.
//!
//! PostgreSQL does not start TLS on connect: the client sends an SSLRequest
//! and the server answers one byte, `S` (go ahead) or `N` (no TLS here). The
//! handshake then runs on the same socket. libpq's modes map as follows:
//!
//! | sslmode | TLS | chain verified | host name verified |
//! |---|---|---|---|
//! | disable | never | - | - |
//! | prefer | when offered | no | no |
//! | require | always | only with `sslrootcert` | no |
//! | verify-ca | always | yes | no |
//! | verify-full | always | yes | yes |
//!
//! SCRAM channel binding (`tls-server-end-point`) hashes the server's
//! certificate with the hash of its signature algorithm (SHA-256 for MD5 and
//! SHA-1, RFC 5929 section 4.1); [`channel_binding`] computes it for both
//! connections.
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

use super::params::{ConnectParams, RootCerts, SslMode};

/// TLS cannot be set up as the URL asks.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The root certificate file is missing or unreadable.
    #[error(
        "cannot read the CA certificates in {path} (sslrootcert): {source}; \
         point sslrootcert at the PEM file of the CA that signed the server's certificate"
    )]
    ReadRoots {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The root certificate file holds no usable certificate.
    #[error("{path} (sslrootcert) holds no usable PEM certificate")]
    NoRoots {
        /// The file.
        path: String,
    },
    /// `sslrootcert=system` but the system trust store is empty.
    #[error("sslrootcert=system, but the system trust store holds no certificate")]
    NoSystemRoots,
    /// The host is not a valid DNS name or IP address for verification.
    #[error("{0:?} is not a valid host name for TLS")]
    InvalidHost(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[source] rustls::Error),
}

/// What the connection layer needs to start TLS: `None` when `sslmode=disable`.
#[derive(Clone)]
pub struct TlsSetup {
    /// The rustls configuration with the verifier the mode calls for.
    pub config: Arc<ClientConfig>,
    /// The name sent as SNI and, for verify-full, checked against the certificate.
    pub server_name: ServerName<'static>,
    /// Whether a server that answers `N` to SSLRequest is acceptable (prefer).
    pub optional: bool,
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSetup")
            .field("server_name", &self.server_name)
            .field("optional", &self.optional)
            .finish_non_exhaustive()
    }
}

impl TlsSetup {
    /// Builds the TLS setup for `params`, reading root certificates as needed.
    pub fn new(params: &ConnectParams) -> Result<Option<Self>, TlsError> {
        let default_roots = || {
            std::env::var_os("HOME")
                .map(|home| std::path::Path::new(&home).join(".postgresql/root.crt"))
                .filter(|p| p.exists())
                .map(RootCerts::File)
        };
        let (verifier, optional): (Arc<dyn ServerCertVerifier>, bool) = match params.sslmode {
            SslMode::Disable => return Ok(None),
            SslMode::Prefer => (Arc::new(AcceptAnyCertificate::new()), true),
            // libpq verifies the chain in require mode when a root file is given.
            SslMode::Require => match &params.sslrootcert {
                Some(roots) => (Arc::new(ChainOnly(webpki_verifier(roots)?)), false),
                None => (Arc::new(AcceptAnyCertificate::new()), false),
            },
            SslMode::VerifyCa | SslMode::VerifyFull => {
                let roots = params
                    .sslrootcert
                    .clone()
                    .or_else(default_roots)
                    .ok_or_else(|| TlsError::ReadRoots {
                        path: "~/.postgresql/root.crt".into(),
                        source: io::Error::new(
                            io::ErrorKind::NotFound,
                            "no sslrootcert given and the default file does not exist",
                        ),
                    })?;
                let verifier = webpki_verifier(&roots)?;
                if params.sslmode == SslMode::VerifyCa {
                    (Arc::new(ChainOnly(verifier)), false)
                } else {
                    (verifier, false)
                }
            }
        };
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        let server_name = ServerName::try_from(params.host.clone())
            .map_err(|_| TlsError::InvalidHost(params.host.clone()))?;
        Ok(Some(TlsSetup {
            config: Arc::new(config),
            server_name,
            optional,
        }))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn webpki_verifier(roots: &RootCerts) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
    let mut store = RootCertStore::empty();
    match roots {
        RootCerts::File(path) => {
            let shown = path.display().to_string();
            let pem = std::fs::read(path).map_err(|source| TlsError::ReadRoots {
                path: shown.clone(),
                source,
            })?;
            for cert in CertificateDer::pem_slice_iter(&pem).flatten() {
                // A certificate webpki cannot use as an anchor is skipped, as libpq
                // skips what OpenSSL cannot load.
                let _ = store.add(cert);
            }
            if store.is_empty() {
                return Err(TlsError::NoRoots { path: shown });
            }
        }
        RootCerts::System => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                return Err(TlsError::NoSystemRoots);
            }
        }
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider())
        .build()
        .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))
}

/// verify-ca: the chain must lead to a trusted root; the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain before the name, so a name error means the
        // chain itself was good.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// prefer and require without roots: encryption without authentication, as
/// libpq does. The handshake signature is still checked, so the session key
/// belongs to whoever holds the certificate's key.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl AcceptAnyCertificate {
    fn new() -> Self {
        AcceptAnyCertificate(provider())
    }
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The `tls-server-end-point` channel binding data for a server certificate:
/// its DER hashed with the hash of its signature algorithm. `None` for an
/// algorithm without a defined hash (SCRAM then runs without binding).
pub fn channel_binding(cert: &[u8]) -> Option<Vec<u8>> {
    use x509_cert::der::Decode;
    use x509_cert::der::oid::db::rfc5912 as oids;

    let parsed = x509_cert::Certificate::from_der(cert).ok()?;
    let oid = parsed.signature_algorithm.oid;
    let algorithm = if [
        oids::MD_5_WITH_RSA_ENCRYPTION,
        oids::SHA_1_WITH_RSA_ENCRYPTION,
        oids::SHA_256_WITH_RSA_ENCRYPTION,
        oids::ECDSA_WITH_SHA_256,
        oids::DSA_WITH_SHA_1,
        oids::ID_RSASSA_PSS,
    ]
    .contains(&oid)
    {
        &ring::digest::SHA256
    } else if [oids::SHA_384_WITH_RSA_ENCRYPTION, oids::ECDSA_WITH_SHA_384].contains(&oid) {
        &ring::digest::SHA384
    } else if [oids::SHA_512_WITH_RSA_ENCRYPTION, oids::ECDSA_WITH_SHA_512].contains(&oid) {
        &ring::digest::SHA512
    } else {
        return None;
    };
    Some(ring::digest::digest(algorithm, cert).as_ref().to_vec())
}

/// [`MakeTlsConnect`] for the tokio-postgres metadata connection, with the
/// same verification as the replication connection.
#[derive(Clone, Debug)]
pub struct MakeRustlsConnect(pub TlsSetup);

impl<S> MakeTlsConnect<S> for MakeRustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, _domain: &str) -> io::Result<RustlsConnect> {
        // The name comes from our own parameters, not tokio-postgres's, so both
        // connections verify the same thing.
        Ok(RustlsConnect(self.0.clone()))
    }
}

/// One TLS handshake for tokio-postgres.
#[derive(Debug)]
pub struct RustlsConnect(TlsSetup);

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.0.config);
        let name = self.0.server_name;
        Box::pin(async move { connector.connect(name, stream).await.map(RustlsStream) })
    }
}

/// A TLS stream for tokio-postgres.
#[derive(Debug)]
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        let (_, session) = self.0.get_ref();
        session
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|cert| channel_binding(cert))
            .map_or_else(ChannelBinding::none, ChannelBinding::tls_server_end_point)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_binding_hashes_the_certificate_with_its_signature_hash() {
        // rcgen signs with ECDSA P-256 and SHA-256 by default.
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der();
        let expected = ring::digest::digest(&ring::digest::SHA256, der);
        assert_eq!(channel_binding(der).as_deref(), Some(expected.as_ref()));

        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let expected = ring::digest::digest(&ring::digest::SHA384, cert.der());
        assert_eq!(
            channel_binding(cert.der()).as_deref(),
            Some(expected.as_ref())
        );
    }

    #[test]
    fn garbage_has_no_channel_binding() {
        assert_eq!(channel_binding(b"not a certificate"), None);
    }

    #[test]
    fn verify_modes_need_roots_and_disable_needs_no_tls() {
        let params = |q: &str| {
            ConnectParams::from_url_with_env(&format!("postgres://u@localhost/d?{q}"), |_| None)
                .unwrap()
        };
        assert!(TlsSetup::new(&params("sslmode=disable")).unwrap().is_none());
        assert!(
            TlsSetup::new(&params("sslmode=prefer"))
                .unwrap()
                .unwrap()
                .optional
        );
        assert!(
            !TlsSetup::new(&params("sslmode=require"))
                .unwrap()
                .unwrap()
                .optional
        );
        let err =
            TlsSetup::new(&params("sslmode=verify-full&sslrootcert=/nonexistent.pem")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent.pem"), "{err}");
    }
}

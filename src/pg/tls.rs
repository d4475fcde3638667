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
//! SHA-1, RFC 5929 section 4.1; for RSASSA-PSS the hash in its parameters);
//! [`channel_binding`] computes it for both connections, or says why it
//! cannot (Ed25519 and Ed448 sign without a separate hash, so no binding is
//! defined for them).
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

/// Why the `tls-server-end-point` channel binding of a server certificate
/// cannot be computed. SCRAM must then not bind, and since a server that
/// offers SCRAM-SHA-256-PLUS expects binding over TLS, authentication fails
/// with this reason rather than quietly running unbound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelBindingError {
    /// The certificate does not parse as X.509.
    #[error("the server's certificate cannot be parsed for channel binding: {0}")]
    Certificate(#[source] x509_cert::der::Error),
    /// RSASSA-PSS whose parameters do not parse.
    #[error("the RSASSA-PSS parameters of the server's certificate cannot be parsed: {0}")]
    PssParameters(#[source] x509_cert::der::Error),
    /// A signature algorithm without a separate hash (Ed25519, Ed448).
    #[error(
        "the server's certificate is signed with {0}, which uses no separate hash function, so \
         RFC 5929 defines no tls-server-end-point channel binding for it (libpq fails the same \
         way: \"could not find digest for NID UNDEF\"); give the server an RSA or ECDSA \
         certificate"
    )]
    NoHash(&'static str),
    /// A hash walrelay cannot compute.
    #[error(
        "the server's certificate is signed with {0}, which walrelay cannot compute for channel \
         binding; give the server a certificate signed with SHA-256, SHA-384 or SHA-512"
    )]
    UnsupportedHash(&'static str),
    /// A signature algorithm walrelay does not know.
    #[error(
        "the server's certificate has signature algorithm {0}, for which walrelay knows no \
         channel-binding hash; give the server an RSA or ECDSA certificate"
    )]
    UnknownAlgorithm(x509_cert::der::oid::ObjectIdentifier),
}

/// The hash a certificate's signature algorithm names, as RFC 5929 section
/// 4.1 uses it.
enum SignatureHash {
    /// MD5 or SHA-1: binding uses SHA-256 instead.
    Weak,
    /// The hash itself.
    Ring(&'static ring::digest::Algorithm),
    /// A hash ring does not implement.
    Unsupported(&'static str),
}

/// The hash of a digest algorithm's OID (as RSASSA-PSS parameters name it).
fn digest_hash(oid: x509_cert::der::oid::ObjectIdentifier) -> Option<SignatureHash> {
    use x509_cert::der::oid::db::rfc5912 as oids;
    Some(match oid {
        oids::ID_MD_5 | oids::ID_SHA_1 => SignatureHash::Weak,
        oids::ID_SHA_224 => SignatureHash::Unsupported("SHA-224"),
        oids::ID_SHA_256 => SignatureHash::Ring(&ring::digest::SHA256),
        oids::ID_SHA_384 => SignatureHash::Ring(&ring::digest::SHA384),
        oids::ID_SHA_512 => SignatureHash::Ring(&ring::digest::SHA512),
        _ => return None,
    })
}

/// The hash named in RSASSA-PSS parameters (RFC 4055: a SEQUENCE whose
/// first field, `[0] EXPLICIT hashAlgorithm`, defaults to SHA-1).
fn pss_hash(
    parameters: Option<&x509_cert::der::Any>,
) -> Result<x509_cert::der::oid::ObjectIdentifier, ChannelBindingError> {
    use x509_cert::der::asn1::ContextSpecific;
    use x509_cert::der::{Reader, TagNumber};
    use x509_cert::spki::AlgorithmIdentifierOwned;

    let sha1 = x509_cert::der::oid::db::rfc5912::ID_SHA_1;
    let Some(parameters) = parameters else {
        // Absent parameters mean every default.
        return Ok(sha1);
    };
    parameters
        .sequence(|reader| {
            let hash = ContextSpecific::<AlgorithmIdentifierOwned>::decode_explicit(
                reader,
                TagNumber::N0,
            )?;
            // The mask generation function, salt length and trailer do not matter here.
            let rest = reader.remaining_len();
            reader.read_slice(rest)?;
            Ok(hash.map_or(sha1, |h| h.value.oid))
        })
        .map_err(ChannelBindingError::PssParameters)
}

/// The `tls-server-end-point` channel binding data for a server certificate
/// (RFC 5929 section 4.1, as libpq computes it): the certificate's DER hashed
/// with the hash of its signature algorithm, SHA-256 where that is MD5 or
/// SHA-1, and for RSASSA-PSS the hash its parameters name.
pub fn channel_binding(cert: &[u8]) -> Result<Vec<u8>, ChannelBindingError> {
    use x509_cert::der::Decode;
    use x509_cert::der::oid::ObjectIdentifier;
    use x509_cert::der::oid::db::{rfc5912 as oids, rfc8410};

    /// ecdsa-with-SHA1 (ANSI X9.62), which the OID database lacks.
    const ECDSA_WITH_SHA_1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.1");

    let parsed =
        x509_cert::Certificate::from_der(cert).map_err(ChannelBindingError::Certificate)?;
    let algorithm = &parsed.signature_algorithm;
    let hash = match algorithm.oid {
        oids::MD_5_WITH_RSA_ENCRYPTION
        | oids::SHA_1_WITH_RSA_ENCRYPTION
        | oids::DSA_WITH_SHA_1
        | ECDSA_WITH_SHA_1 => SignatureHash::Weak,
        oids::SHA_224_WITH_RSA_ENCRYPTION | oids::ECDSA_WITH_SHA_224 | oids::DSA_WITH_SHA_224 => {
            SignatureHash::Unsupported("SHA-224")
        }
        oids::SHA_256_WITH_RSA_ENCRYPTION | oids::ECDSA_WITH_SHA_256 | oids::DSA_WITH_SHA_256 => {
            SignatureHash::Ring(&ring::digest::SHA256)
        }
        oids::SHA_384_WITH_RSA_ENCRYPTION | oids::ECDSA_WITH_SHA_384 => {
            SignatureHash::Ring(&ring::digest::SHA384)
        }
        oids::SHA_512_WITH_RSA_ENCRYPTION | oids::ECDSA_WITH_SHA_512 => {
            SignatureHash::Ring(&ring::digest::SHA512)
        }
        oids::ID_RSASSA_PSS => {
            let oid = pss_hash(algorithm.parameters.as_ref())?;
            digest_hash(oid).ok_or(ChannelBindingError::UnknownAlgorithm(oid))?
        }
        rfc8410::ID_ED_25519 => return Err(ChannelBindingError::NoHash("Ed25519")),
        rfc8410::ID_ED_448 => return Err(ChannelBindingError::NoHash("Ed448")),
        other => return Err(ChannelBindingError::UnknownAlgorithm(other)),
    };
    let digest = match hash {
        SignatureHash::Weak => &ring::digest::SHA256,
        SignatureHash::Ring(digest) => digest,
        SignatureHash::Unsupported(name) => {
            return Err(ChannelBindingError::UnsupportedHash(name));
        }
    };
    Ok(ring::digest::digest(digest, cert).as_ref().to_vec())
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
        let Some(cert) = session.peer_certificates().and_then(|certs| certs.first()) else {
            return ChannelBinding::none();
        };
        match channel_binding(cert) {
            Ok(hash) => ChannelBinding::tls_server_end_point(hash),
            Err(error) => {
                // tokio-postgres then tells a server that offers
                // SCRAM-SHA-256-PLUS that it could not bind, which the
                // server refuses: say why.
                tracing::warn!(error = %error, "cannot bind SCRAM to the TLS session of the metadata connection");
                ChannelBinding::none()
            }
        }
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

    /// A self-signed certificate from rcgen with `algorithm`.
    fn rcgen_cert(algorithm: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(algorithm).unwrap();
        rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap()
            .der()
            .to_vec()
    }

    fn hash(algorithm: &'static ring::digest::Algorithm, der: &[u8]) -> Vec<u8> {
        ring::digest::digest(algorithm, der).as_ref().to_vec()
    }

    // The RSA fixtures are self-signed certificates made with OpenSSL 3.0
    // (ring cannot make RSA keys, rcgen cannot sign RSASSA-PSS):
    //   openssl req -x509 -newkey rsa:2048 -nodes -keyout k.pem -subj /CN=localhost \
    //     -days 36500 -sha384 [-sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:digest] \
    //     -outform DER -out rsa[-pss]-sha384.der
    const RSA_SHA1: &[u8] = include_bytes!("fixtures/certs/rsa-sha1.der");
    const RSA_SHA224: &[u8] = include_bytes!("fixtures/certs/rsa-sha224.der");
    const RSA_SHA256: &[u8] = include_bytes!("fixtures/certs/rsa-sha256.der");
    const RSA_SHA384: &[u8] = include_bytes!("fixtures/certs/rsa-sha384.der");
    const RSA_SHA512: &[u8] = include_bytes!("fixtures/certs/rsa-sha512.der");
    /// RSASSA-PSS with every parameter at its default: SHA-1.
    const RSA_PSS_SHA1: &[u8] = include_bytes!("fixtures/certs/rsa-pss-sha1.der");
    const RSA_PSS_SHA256: &[u8] = include_bytes!("fixtures/certs/rsa-pss-sha256.der");
    const RSA_PSS_SHA384: &[u8] = include_bytes!("fixtures/certs/rsa-pss-sha384.der");
    const RSA_PSS_SHA512: &[u8] = include_bytes!("fixtures/certs/rsa-pss-sha512.der");

    #[test]
    fn channel_binding_hashes_with_the_signature_hash_sha256_for_md5_and_sha1() {
        use ring::digest::{SHA256, SHA384, SHA512};
        let p256 = rcgen_cert(&rcgen::PKCS_ECDSA_P256_SHA256);
        let p384 = rcgen_cert(&rcgen::PKCS_ECDSA_P384_SHA384);
        let cases: [(&str, &[u8], &'static ring::digest::Algorithm); 9] = [
            ("RSA SHA-1", RSA_SHA1, &SHA256),
            ("RSA SHA-256", RSA_SHA256, &SHA256),
            ("RSA SHA-384", RSA_SHA384, &SHA384),
            ("RSA SHA-512", RSA_SHA512, &SHA512),
            ("ECDSA P-256", &p256, &SHA256),
            ("ECDSA P-384", &p384, &SHA384),
            ("RSA-PSS default (SHA-1)", RSA_PSS_SHA1, &SHA256),
            ("RSA-PSS SHA-256", RSA_PSS_SHA256, &SHA256),
            ("RSA-PSS SHA-384", RSA_PSS_SHA384, &SHA384),
        ];
        for (name, der, algorithm) in cases {
            assert_eq!(channel_binding(der), Ok(hash(algorithm, der)), "{name}");
        }
        assert_eq!(
            channel_binding(RSA_PSS_SHA512),
            Ok(hash(&SHA512, RSA_PSS_SHA512))
        );
        // What OpenSSL's X509_digest, libpq's hash, gives for the PSS SHA-384
        // certificate (openssl x509 -inform DER -noout -fingerprint -sha384).
        let openssl = "28:45:EB:45:F5:9C:89:97:25:12:4C:75:2B:65:7C:CE:64:13:14:E4:09:9C:34:CD:\
                       78:CC:8C:C1:17:8B:F0:A5:C0:31:4F:7F:E8:34:33:8E:70:C1:C3:4B:80:8E:21:FD";
        let ours = channel_binding(RSA_PSS_SHA384).unwrap();
        let ours: Vec<String> = ours.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(ours.join(":"), openssl);
    }

    #[test]
    fn channel_binding_that_cannot_be_computed_says_why() {
        // Ed25519 signs without a separate hash: no binding is defined, and
        // libpq fails ("could not find digest for NID UNDEF").
        let ed25519 = rcgen_cert(&rcgen::PKCS_ED25519);
        let err = channel_binding(&ed25519).unwrap_err();
        assert_eq!(err, ChannelBindingError::NoHash("Ed25519"));
        assert!(err.to_string().contains("RSA or ECDSA"), "{err}");
        assert_eq!(
            channel_binding(RSA_SHA224),
            Err(ChannelBindingError::UnsupportedHash("SHA-224"))
        );
        assert!(matches!(
            channel_binding(b"not a certificate"),
            Err(ChannelBindingError::Certificate(_))
        ));
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

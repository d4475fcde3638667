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
//! | require | always | when a root file exists (`sslrootcert`, `PGSSLROOTCERT` or `~/.postgresql/root.crt`) | no |
//! | verify-ca | always | yes | no |
//! | verify-full | always | yes | yes |
//!
//! The chain is verified by webpki against the trusted roots. The host name
//! is checked as libpq checks it ([`super::hostcheck`]): rustls' own check
//! would refuse a certificate that names the server only in its Common
//! Name, which libpq accepts and PostgreSQL setups often have. A refused
//! certificate's error says why: which roots it does not chain to, or which
//! names it has and which host was expected. Whether the certificate was
//! verified ([`TlsSetup::verified`]) decides what authentication may reveal
//! ([`super::auth`]).
//!
//! SCRAM channel binding (`tls-server-end-point`) hashes the server's
//! certificate with the hash of its signature algorithm (SHA-256 for MD5 and
//! SHA-1, RFC 5929 section 4.1; for RSASSA-PSS the hash in its parameters);
//! [`channel_binding`] computes it for both connections, or says why it
//! cannot (Ed25519 and Ed448 sign without a separate hash, so no binding is
//! defined for them).
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use super::hostcheck;
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
    /// verify-ca or verify-full without sslrootcert, and the default file is missing.
    #[error(
        "root certificate file {path} does not exist, and sslmode={sslmode} needs one: provide \
         the file, name one with sslrootcert (or PGSSLROOTCERT), use the system's trusted roots \
         with sslrootcert=system, or change sslmode to disable server certificate verification"
    )]
    NoRootFile {
        /// The default file looked for.
        path: String,
        /// The mode that needs it.
        sslmode: &'static str,
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
    /// Whether the server's certificate is verified against trusted roots
    /// (verify-ca, verify-full, and require with a root file).
    pub verified: bool,
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSetup")
            .field("server_name", &self.server_name)
            .field("optional", &self.optional)
            .field("verified", &self.verified)
            .finish_non_exhaustive()
    }
}

impl TlsSetup {
    /// Builds the TLS setup for `params`, reading root certificates as needed;
    /// the default root file is `$HOME/.postgresql/root.crt`.
    pub fn new(params: &ConnectParams) -> Result<Option<Self>, TlsError> {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        Self::with_home(params, home.as_deref())
    }

    /// As [`TlsSetup::new`], with the home directory given (`None`: no
    /// default root file).
    pub fn with_home(
        params: &ConnectParams,
        home: Option<&Path>,
    ) -> Result<Option<Self>, TlsError> {
        let Some((check, optional)) = Check::for_params(params, home)? else {
            return Ok(None);
        };
        let verified = !matches!(check, Check::Nothing);
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Verifier {
                provider: provider(),
                check,
            }))
            .with_no_client_auth();
        let server_name = ServerName::try_from(params.host.clone())
            .map_err(|_| TlsError::InvalidHost(params.host.clone()))?;
        Ok(Some(TlsSetup {
            config: Arc::new(config),
            server_name,
            optional,
            verified,
        }))
    }
}

/// The default root certificate file under the home directory, as libpq's.
const DEFAULT_ROOT_FILE: &str = ".postgresql/root.crt";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The CA certificates a server's chain must lead to, and where they came from.
#[derive(Debug)]
struct TrustedRoots {
    store: RootCertStore,
    /// For errors: the file, or the system's trust store.
    origin: String,
}

impl TrustedRoots {
    fn load(roots: &RootCerts) -> Result<Self, TlsError> {
        let mut store = RootCertStore::empty();
        let origin = match roots {
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
                format!("{shown} (sslrootcert)")
            }
            RootCerts::System => {
                let found = rustls_native_certs::load_native_certs();
                store.add_parsable_certificates(found.certs);
                if store.is_empty() {
                    return Err(TlsError::NoSystemRoots);
                }
                "the system's trust store (sslrootcert=system)".to_owned()
            }
        };
        Ok(TrustedRoots { store, origin })
    }
}

/// What is checked of the server's certificate beyond the handshake
/// signature, which is always checked (so the session belongs to whoever
/// holds the certificate's key).
#[derive(Debug)]
enum Check {
    /// prefer, and require without a root file: encryption without
    /// authentication, as libpq does.
    Nothing,
    /// verify-ca, and require with a root file: the chain leads to a trusted root.
    Chain(TrustedRoots),
    /// verify-full: the chain, and the certificate names the host (libpq's
    /// rules, CN fallback included: [`super::hostcheck`]).
    ChainAndHost(TrustedRoots, String),
}

impl Check {
    /// What `params` asks for, and whether a server without TLS is acceptable
    /// (prefer); `None` for sslmode=disable.
    fn for_params(
        params: &ConnectParams,
        home: Option<&Path>,
    ) -> Result<Option<(Self, bool)>, TlsError> {
        let default_file = home.map(|h| h.join(DEFAULT_ROOT_FILE));
        // libpq uses the default file only when it exists; a file named by
        // sslrootcert or PGSSLROOTCERT must exist (stricter than libpq under
        // require, which would quietly skip verification: a mistyped path
        // must not turn verification off).
        let roots = params.sslrootcert.clone().or_else(|| {
            default_file
                .clone()
                .filter(|f| f.exists())
                .map(RootCerts::File)
        });
        Ok(Some(match params.sslmode {
            SslMode::Disable => return Ok(None),
            SslMode::Prefer => (Check::Nothing, true),
            // libpq verifies the chain under require when a root file exists.
            SslMode::Require => match &roots {
                Some(roots) => (Check::Chain(TrustedRoots::load(roots)?), false),
                None => (Check::Nothing, false),
            },
            SslMode::VerifyCa | SslMode::VerifyFull => {
                let Some(roots) = &roots else {
                    return Err(TlsError::NoRootFile {
                        path: default_file.map_or_else(
                            || format!("~/{DEFAULT_ROOT_FILE} (HOME is not set)"),
                            |f| f.display().to_string(),
                        ),
                        sslmode: params.sslmode.as_str(),
                    });
                };
                let roots = TrustedRoots::load(roots)?;
                if params.sslmode == SslMode::VerifyCa {
                    (Check::Chain(roots), false)
                } else {
                    (Check::ChainAndHost(roots, params.host.clone()), false)
                }
            }
        }))
    }
}

/// The certificate verifier of both connections.
#[derive(Debug)]
struct Verifier {
    provider: Arc<rustls::crypto::CryptoProvider>,
    check: Check,
}

/// A certificate the chain check refused, with where the trusted roots came from.
#[derive(Debug, thiserror::Error)]
#[error(
    "the server's certificate does not chain to a CA in {origin}: {source}; point sslrootcert \
     at the certificate of the CA that signed it"
)]
struct UntrustedChain {
    origin: String,
    #[source]
    source: rustls::Error,
}

/// A TLS handshake failure as an operator should read it: rustls shows a
/// refusal of our verifier with `Debug`, so its explanation is taken out.
pub fn explain_handshake_error(error: &io::Error) -> String {
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(CertificateError::Other(other))) => {
            format!("invalid peer certificate: {}", other.0)
        }
        _ => error.to_string(),
    }
}

/// A refusal rustls reports as an invalid certificate, with our explanation.
fn refused(error: impl std::error::Error + Send + Sync + 'static) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(error))))
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let (roots, host) = match &self.check {
            Check::Nothing => return Ok(ServerCertVerified::assertion()),
            Check::Chain(roots) => (roots, None),
            Check::ChainAndHost(roots, host) => (roots, Some(host)),
        };
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &roots.store,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )
        .map_err(|source| match source {
            rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature,
            ) => refused(UntrustedChain {
                origin: roots.origin.clone(),
                source,
            }),
            other => other,
        })?;
        if let Some(host) = host {
            hostcheck::verify(end_entity, host).map_err(refused)?;
        }
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
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
    /// The handshake left no server certificate (rustls always keeps it).
    #[error("the TLS session has no server certificate to bind to")]
    NoCertificate,
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

    /// A CA, and a server certificate it signed with `sans` and Common Name `cn`.
    fn ca_and_server(
        sans: &[&str],
        cn: &str,
    ) -> (rcgen::CertifiedIssuer<'static, rcgen::KeyPair>, Vec<u8>) {
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let ca =
            rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().unwrap()).unwrap();
        let mut server =
            rcgen::CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .unwrap();
        server.distinguished_name = rcgen::DistinguishedName::new();
        server
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        server.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = server
            .signed_by(&rcgen::KeyPair::generate().unwrap(), &ca)
            .unwrap();
        (ca, leaf.der().to_vec())
    }

    /// The verifier for `params` (with no home directory unless given).
    fn verifier(params: &ConnectParams, home: Option<&Path>) -> Verifier {
        let (check, _) = Check::for_params(params, home).unwrap().unwrap();
        Verifier {
            provider: provider(),
            check,
        }
    }

    /// Runs `verifier` on `cert` as a handshake would; a refusal as the
    /// handshake error would show it.
    fn verify(verifier: &Verifier, cert: &[u8]) -> Result<(), String> {
        verifier
            .verify_server_cert(
                &CertificateDer::from(cert.to_vec()),
                &[],
                &ServerName::try_from("ignored").unwrap(),
                &[],
                UnixTime::now(),
            )
            .map(|_| ())
            .map_err(|e| explain_handshake_error(&io::Error::new(io::ErrorKind::InvalidData, e)))
    }

    #[test]
    fn verify_full_checks_the_host_as_libpq_does_and_says_why_it_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.crt");
        let params = |host: &str, mode: &str| {
            ConnectParams::from_url_with_env(
                &format!(
                    "postgres://u@{host}/d?sslmode={mode}&sslrootcert={}",
                    ca_file.display()
                ),
                |_| None,
            )
            .unwrap()
        };
        // Only a Common Name: libpq accepts it, rustls' own check would not.
        let (ca, cn_only) = ca_and_server(&[], "db.example.com");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let full = params("db.example.com", "verify-full");
        assert!(TlsSetup::new(&full).unwrap().unwrap().verified);
        verify(&verifier(&full, None), &cn_only).unwrap();
        let other = params("other.example.com", "verify-full");
        let err = verify(&verifier(&other, None), &cn_only).unwrap_err();
        assert!(
            err.contains("\"db.example.com\" (Common Name)")
                && err.contains("\"other.example.com\""),
            "{err}"
        );
        // verify-ca does not check the name.
        let ca_only = params("other.example.com", "verify-ca");
        verify(&verifier(&ca_only, None), &cn_only).unwrap();
        // A certificate from another CA: the error names the roots.
        let (_, foreign) = ca_and_server(&["db.example.com"], "db.example.com");
        let err = verify(&verifier(&full, None), &foreign).unwrap_err();
        assert!(
            err.contains("does not chain to a CA in") && err.contains("ca.crt"),
            "{err}"
        );
    }

    #[test]
    fn require_verifies_the_chain_when_a_root_file_exists_as_libpq_does() {
        let home = tempfile::tempdir().unwrap();
        let params = |query: &str| {
            ConnectParams::from_url_with_env(
                &format!("postgres://u@db.example.com/d?{query}"),
                |_| None,
            )
            .unwrap()
        };
        let setup = |query: &str, home: &Path| {
            TlsSetup::with_home(&params(query), Some(home))
                .unwrap()
                .unwrap()
        };
        let (ca, good) = ca_and_server(&["elsewhere.example.com"], "elsewhere");
        let (_, foreign) = ca_and_server(&["db.example.com"], "db.example.com");
        let require = params("sslmode=require");
        // No root file: encryption only.
        assert!(!setup("sslmode=require", home.path()).verified);
        verify(&verifier(&require, Some(home.path())), &foreign).unwrap();
        // ~/.postgresql/root.crt exists: the chain is verified (not the name).
        std::fs::create_dir(home.path().join(".postgresql")).unwrap();
        std::fs::write(home.path().join(DEFAULT_ROOT_FILE), ca.pem()).unwrap();
        assert!(setup("sslmode=require", home.path()).verified);
        let chain = verifier(&require, Some(home.path()));
        verify(&chain, &good).unwrap();
        assert!(verify(&chain, &foreign).is_err());
        // prefer never verifies.
        assert!(!setup("sslmode=prefer", home.path()).verified);
        // verify-full without any root file says where it looked.
        let empty = tempfile::tempdir().unwrap();
        let err =
            TlsSetup::with_home(&params("sslmode=verify-full"), Some(empty.path())).unwrap_err();
        assert!(matches!(err, TlsError::NoRootFile { .. }), "{err}");
        assert!(
            err.to_string().contains(".postgresql/root.crt")
                && err.to_string().contains("sslrootcert=system"),
            "{err}"
        );
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

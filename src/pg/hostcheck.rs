//! `sslmode=verify-full`'s host-name check, as libpq makes it
//! (`pq_verify_peer_name_matches_certificate` in fe-secure-common.c and
//! fe-secure-openssl.c), on a certificate whose chain was already verified.
//!
//! rustls' own check looks at subjectAltName entries only; libpq also falls
//! back to the subject's Common Name, and certificates made for PostgreSQL
//! often carry only a CN. The rules:
//!
//! - The host is an IP address (IPv4 dotted quad or IPv6) or a DNS name;
//!   subjectAltName entries of the same kind decide. A DNS name matches
//!   exactly (ASCII case-insensitive) or through a wildcard `*.` that stands
//!   for exactly one label; an address matches byte for byte.
//! - Only when the certificate has no subjectAltName of the host's kind is the
//!   first Common Name compared, as a DNS name (so a host given as an address
//!   matches a CN that spells it). This allows a CN beside DNS names for an
//!   address host, as libpq (and NSS) do and RFC 6125 does not.
//! - A name with an embedded NUL, or an address entry that is neither 4 nor
//!   16 bytes long, refuses the certificate (CVE-2009-4034).
//!
//! A refusal lists every name the certificate was checked for, and says
//! why the Common Name was or was not used.
use std::net::IpAddr;

use x509_cert::der::Decode;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;

/// Why the certificate does not name the host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostMismatch {
    /// None of the names checked is the host.
    #[error(
        "the server certificate is for {} and not for the host {host:?} connected to \
         (sslmode=verify-full compares the host with the certificate's subjectAltName entries \
         of its kind, {}, and only when there are none with the Common Name{cn_note}); \
         connect with a host name the certificate names, or have it reissued for {host:?}",
        list(.found),
        plural(.kind)
    )]
    NoMatch {
        /// The host connected to.
        host: String,
        /// `DNS name` or `IP address`.
        kind: &'static str,
        /// The names compared, in order (`"db.example.com"`, `IP 10.0.0.1`).
        found: Vec<String>,
        /// Why the Common Name was not compared, if it was not.
        cn_note: String,
    },
    /// Nothing to compare with.
    #[error(
        "could not get the server's host name from its certificate: it has no subjectAltName \
         entry of the host's kind ({kind}) and no Common Name; have it reissued for {host:?}"
    )]
    NoNames {
        /// The host connected to.
        host: String,
        /// `DNS name` or `IP address`.
        kind: &'static str,
    },
    /// A name with a NUL byte in it.
    #[error("the server certificate's name {0:?} contains an embedded NUL byte")]
    EmbeddedNul(String),
    /// An address entry of an impossible length.
    #[error("the server certificate contains an IP address of invalid length {0}")]
    AddressLength(usize),
    /// The certificate or its subjectAltName does not parse.
    #[error("the server certificate's names cannot be read: {0}")]
    Unreadable(String),
}

fn list(names: &[String]) -> String {
    match names {
        [] => "no name".to_owned(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// `DNS names` or `IP addresses`.
fn plural(kind: &str) -> &'static str {
    if kind == "IP address" {
        "IP addresses"
    } else {
        "DNS names"
    }
}

/// Checks that the DER certificate `cert` names `host`, as libpq does.
pub fn verify(cert: &[u8], host: &str) -> Result<(), HostMismatch> {
    let cert = x509_cert::Certificate::from_der(cert)
        .map_err(|e| HostMismatch::Unreadable(e.to_string()))?;
    let tbs = &cert.tbs_certificate;
    let address = host.parse::<IpAddr>().ok();
    let kind = if address.is_some() {
        "IP address"
    } else {
        "DNS name"
    };
    let mut found = Vec::new();
    let mut san_of_kind = false;
    let sans = tbs
        .get::<SubjectAltName>()
        .map_err(|e| HostMismatch::Unreadable(e.to_string()))?;
    for name in sans.map(|(_, san)| san.0).unwrap_or_default() {
        let matched = match &name {
            GeneralName::DnsName(dns) => {
                san_of_kind |= address.is_none();
                let matched = name_matches(dns.as_bytes(), host)?;
                found.push(format!("{:?}", String::from_utf8_lossy(dns.as_bytes())));
                matched
            }
            GeneralName::IpAddress(octets) => {
                san_of_kind |= address.is_some();
                let (shown, matched) = address_matches(octets.as_bytes(), address)?;
                found.push(format!("IP {shown}"));
                matched
            }
            _ => false,
        };
        if matched {
            return Ok(());
        }
    }
    let common_name = first_common_name(&cert);
    let cn_note = match (&common_name, san_of_kind) {
        (Some(cn), true) => format!(
            "; its Common Name {:?} was not compared, since it has {}",
            String::from_utf8_lossy(cn),
            plural(kind)
        ),
        _ => String::new(),
    };
    if !san_of_kind {
        if let Some(cn) = &common_name {
            let matched = name_matches(cn, host)?;
            found.push(format!("{:?} (Common Name)", String::from_utf8_lossy(cn)));
            if matched {
                return Ok(());
            }
        }
    }
    if found.is_empty() {
        return Err(HostMismatch::NoNames {
            host: host.to_owned(),
            kind,
        });
    }
    Err(HostMismatch::NoMatch {
        host: host.to_owned(),
        kind,
        found,
        cn_note,
    })
}

/// The value of the subject's first Common Name, as its raw string bytes.
fn first_common_name(cert: &x509_cert::Certificate) -> Option<Vec<u8>> {
    use x509_cert::der::oid::db::rfc4519::CN;
    cert.tbs_certificate
        .subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|attribute| attribute.oid == CN)
        // libpq compares the string's bytes whatever its type; a BMPString
        // then holds NUL bytes and is refused as such.
        .map(|attribute| attribute.value.value().to_vec())
}

/// Whether a certificate name matches `host`: equal ignoring ASCII case, or
/// a wildcard `*.rest` whose `*` stands for one label of at least one byte.
fn name_matches(name: &[u8], host: &str) -> Result<bool, HostMismatch> {
    if name.contains(&0) {
        return Err(HostMismatch::EmbeddedNul(
            String::from_utf8_lossy(name).into_owned(),
        ));
    }
    let host = host.as_bytes();
    if name.eq_ignore_ascii_case(host) {
        return Ok(true);
    }
    let Some(suffix) = name.strip_prefix(b"*") else {
        return Ok(false);
    };
    if !suffix.starts_with(b".") || name.len() < 3 || name.len() > host.len() {
        return Ok(false);
    }
    let (label, rest) = host.split_at(host.len() - suffix.len());
    Ok(rest.eq_ignore_ascii_case(suffix) && !label.contains(&b'.'))
}

/// Whether an iPAddress entry is the host's address, and how to show it.
fn address_matches(octets: &[u8], host: Option<IpAddr>) -> Result<(String, bool), HostMismatch> {
    let entry = match octets.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(octets).expect("4 bytes")),
        16 => IpAddr::from(<[u8; 16]>::try_from(octets).expect("16 bytes")),
        other => return Err(HostMismatch::AddressLength(other)),
    };
    // An IPv4 host never matches an IPv6 entry, even a mapped one (libpq
    // compares the bytes of the same family).
    Ok((entry.to_string(), host == Some(entry)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate with `sans` (DNS names, or IP addresses
    /// when they parse as such) and, if given, the Common Name `cn`.
    fn cert(sans: &[&str], cn: Option<&str>) -> Vec<u8> {
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn subject_alt_names_of_the_hosts_kind_decide() {
        let c = cert(
            &["db.example.com", "*.pg.example.com", "10.0.0.5"],
            Some("ignored"),
        );
        for ok in [
            "db.example.com",
            "DB.Example.COM",
            "a.pg.example.com",
            "10.0.0.5",
        ] {
            verify(&c, ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for refused in [
            "example.com",
            "b.a.pg.example.com",
            "pg.example.com",
            "10.0.0.6",
            "ignored",
        ] {
            let err = verify(&c, refused).unwrap_err();
            assert!(
                matches!(err, HostMismatch::NoMatch { .. }),
                "{refused}: {err}"
            );
        }
        let text = verify(&c, "other.example.com").unwrap_err().to_string();
        for needle in [
            "\"db.example.com\", \"*.pg.example.com\" and IP 10.0.0.5",
            "not for the host \"other.example.com\"",
            "Common Name \"ignored\" was not compared, since it has DNS names",
        ] {
            assert!(text.contains(needle), "{needle:?} not in {text}");
        }
    }

    #[test]
    fn the_common_name_counts_when_no_san_is_of_the_hosts_kind() {
        // Only a CN: it is all there is, for a name or an address.
        let c = cert(&[], Some("db.example.com"));
        verify(&c, "db.example.com").unwrap();
        verify(&c, "DB.EXAMPLE.COM").unwrap();
        let err = verify(&c, "db2.example.com").unwrap_err().to_string();
        assert!(err.contains("\"db.example.com\" (Common Name)"), "{err}");
        let c = cert(&[], Some("*.example.com"));
        verify(&c, "db.example.com").unwrap();
        assert!(verify(&c, "a.db.example.com").is_err());
        let c = cert(&[], Some("127.0.0.1"));
        verify(&c, "127.0.0.1").unwrap();
        // An address host with DNS SANs only: libpq still takes the CN.
        let c = cert(&["db.example.com"], Some("10.1.2.3"));
        verify(&c, "10.1.2.3").unwrap();
        // A DNS host with address SANs only: the CN too.
        let c = cert(&["10.1.2.3"], Some("db.example.com"));
        verify(&c, "db.example.com").unwrap();
        // A DNS host with DNS SANs: the CN is not compared.
        let c = cert(&["other.example.com"], Some("db.example.com"));
        assert!(verify(&c, "db.example.com").is_err());
    }

    #[test]
    fn wildcards_stand_for_exactly_one_label() {
        for (pattern, host, expected) in [
            ("*.example.com", "a.example.com", true),
            ("*.example.com", "A.EXAMPLE.com", true),
            ("*.example.com", "example.com", false),
            ("*.example.com", ".example.com", false),
            ("*.example.com", "a.b.example.com", false),
            ("*.example.com", "aexample.com", false),
            ("a*.example.com", "ab.example.com", false),
            ("*", "host", false),
            ("*.", "a.", false),
            ("*.a", "b.a", true),
        ] {
            assert_eq!(
                name_matches(pattern.as_bytes(), host).unwrap(),
                expected,
                "{pattern} vs {host}"
            );
        }
    }

    #[test]
    fn a_certificate_without_names_or_with_a_nul_is_refused_saying_so() {
        let c = cert(&[], None);
        let err = verify(&c, "db").unwrap_err();
        assert!(matches!(err, HostMismatch::NoNames { .. }), "{err}");
        assert!(err.to_string().contains("no Common Name"), "{err}");
        assert!(matches!(
            name_matches(b"db.example.com\0.evil.com", "db.example.com"),
            Err(HostMismatch::EmbeddedNul(_))
        ));
        assert_eq!(
            address_matches(&[1, 2, 3], None),
            Err(HostMismatch::AddressLength(3))
        );
        assert!(matches!(
            verify(b"garbage", "db"),
            Err(HostMismatch::Unreadable(_))
        ));
    }

    #[test]
    fn ipv6_addresses_compare_by_value() {
        let c = cert(&["::1"], None);
        verify(&c, "::1").unwrap();
        verify(&c, "0:0:0:0:0:0:0:1").unwrap();
        assert!(verify(&c, "127.0.0.1").is_err());
    }
}

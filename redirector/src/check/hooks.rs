//! Other programs on our hooks (connect4, connect6, sockops) at the cgroup root, via bpftool.
use std::{collections::BTreeSet, path::Path, process::Command};

use serde::Deserialize;

use super::Check;
use crate::bpf::PinLayout;
use redirector_common::names;

/// One entry of `bpftool -j cgroup show`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Attached {
    pub id: u32,
    pub attach_type: String,
    #[serde(default)]
    pub attach_flags: String,
    #[serde(default)]
    pub name: String,
}

/// The attach types our programs use, as bpftool names them (old and new spellings).
const OUR_HOOKS: [&str; 4] = [
    "cgroup_inet4_connect",
    "cgroup_inet6_connect",
    "sock_ops",
    "cgroup_sock_ops",
];

pub fn parse_bpftool(out: &str) -> Result<Vec<Attached>, String> {
    let t = out.trim();
    if t.is_empty() {
        // bpftool prints nothing at all for a cgroup without programs.
        return Ok(Vec::new());
    }
    serde_json::from_str(t).map_err(|e| format!("unexpected bpftool output: {e}"))
}

pub(super) struct HookScan {
    pub(super) check: Check,
    /// The kernel answered a BPF_PROG_QUERY on a cgroup (so cgroup BPF is built in).
    pub(super) queried: bool,
}

impl HookScan {
    /// The cgroup root is unusable, so there is nothing to ask about.
    pub(super) fn not_checked() -> HookScan {
        HookScan {
            check: Check::warn(
                "hooks",
                "not checked: the cgroup root is unusable (see above)",
                Vec::new(),
            ),
            queried: false,
        }
    }
}

fn bpftool(args: &[&str]) -> Result<String, String> {
    let o = Command::new("bpftool")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).trim().to_owned())
    }
}

/// Programs on connect4/connect6/sockops at the attach point. aya has no public cgroup
/// program query (BPF_PROG_QUERY) for these attach types, so this asks bpftool.
pub(super) fn scan(root: &Path, pins: &PinLayout) -> HookScan {
    let name = "hooks";
    let root_s = root.display().to_string();
    let direct = match bpftool(&["-j", "cgroup", "show", &root_s]) {
        Err(e) if e.contains("No such file") || e.contains("os error 2") => {
            return HookScan {
                check: Check::warn(
                    name,
                    format!("bpftool not found: cannot list the programs attached to {root_s}"),
                    vec![
                        "install bpftool (Debian: apt-get install bpftool) and run check again"
                            .into(),
                    ],
                ),
                queried: false,
            };
        }
        // Older bpftool releases (bookworm's 7.1) fail to list a directory on 5.10 once
        // programs are attached there, while the `effective` listing works: at the attach
        // root it names the same programs (plus any inherited from above, which count as
        // being on our hooks just as well).
        Err(e) => match bpftool(&["-j", "cgroup", "show", &root_s, "effective"])
            .ok()
            .and_then(|o| parse_bpftool(&o).ok())
        {
            // The effective listing carries no attach flags: say so rather than take the
            // missing flags for an exclusive attachment.
            Some(v) => v
                .into_iter()
                .map(|a| Attached {
                    attach_flags: "flags unknown".into(),
                    ..a
                })
                .collect(),
            None => {
                return HookScan {
                    check: Check::warn(
                        name,
                        format!("`bpftool cgroup show {root_s}` failed: {e}"),
                        Vec::new(),
                    ),
                    queried: false,
                };
            }
        },
        Ok(out) => match parse_bpftool(&out) {
            Ok(v) => v,
            Err(e) => {
                return HookScan {
                    check: Check::warn(name, e, Vec::new()),
                    queried: true,
                };
            }
        },
    };
    let effective = bpftool(&["-j", "cgroup", "show", &root_s, "effective"])
        .ok()
        .and_then(|o| parse_bpftool(&o).ok())
        .unwrap_or_default();
    // The netns probe (`rdr_p_netns`, kernels without SO_NETNS_COOKIE) is attached to the
    // daemon's own cgroup, which can be an ancestor of the root: it acts only on its daemon's
    // connects to 127.0.0.1:0, so it is no program "on our hooks" in the sense of this check.
    let not_probe = |a: &Attached| !a.name.starts_with("rdr_p_");
    let direct: Vec<Attached> = direct.into_iter().filter(not_probe).collect();
    let effective: Vec<Attached> = effective.into_iter().filter(not_probe).collect();
    let ours: BTreeSet<u32> = names::PROGRAMS
        .iter()
        .filter_map(|p| aya::programs::ProgramInfo::from_pin(pins.path(p)).ok())
        .map(|i| i.id())
        .collect();
    HookScan {
        check: judge_hooks(root, &direct, &effective, &ours),
        queried: true,
    }
}

/// Ours (pinned under our pin root), another redirector's (`rdr_*`), or someone else's.
pub fn judge_hooks(
    root: &Path,
    direct: &[Attached],
    effective: &[Attached],
    ours: &BTreeSet<u32>,
) -> Check {
    let name = "hooks";
    let on_hooks = |a: &&Attached| OUR_HOOKS.contains(&a.attach_type.as_str());
    let describe = |a: &Attached| {
        let whose = if ours.contains(&a.id) {
            "ours"
        } else if a.name.starts_with("rdr_") {
            "a redirector with another pin root"
        } else {
            "not ours"
        };
        let flags = if a.attach_flags.is_empty() {
            "exclusive".to_owned()
        } else {
            a.attach_flags.clone()
        };
        format!(
            "{} id {} on {} [{flags}] ({whose})",
            if a.name.is_empty() { "?" } else { &a.name },
            a.id,
            a.attach_type
        )
    };
    let at_root: Vec<&Attached> = direct.iter().filter(on_hooks).collect();
    let inherited: Vec<&Attached> = effective
        .iter()
        .filter(on_hooks)
        .filter(|e| !direct.iter().any(|d| d.id == e.id))
        .collect();
    let foreign: Vec<&Attached> = at_root
        .iter()
        .chain(inherited.iter())
        .copied()
        .filter(|a| !ours.contains(&a.id))
        .collect();
    let mut detail = if at_root.is_empty() {
        format!(
            "nothing on connect4/connect6/sockops at {} (ours attach when the daemon starts)",
            root.display()
        )
    } else {
        format!(
            "at {}: {}",
            root.display(),
            at_root
                .iter()
                .map(|a| describe(a))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    if !inherited.is_empty() {
        detail += &format!(
            "; inherited from an ancestor: {}",
            inherited
                .iter()
                .map(|a| describe(a))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let exclusive: Vec<&&Attached> = foreign
        .iter()
        .filter(|a| a.attach_flags.is_empty() || a.attach_flags == "override")
        .collect();
    if let Some(a) = exclusive
        .iter()
        .find(|a| at_root.iter().any(|r| r.id == a.id))
    {
        return Check::fail(
            name,
            detail,
            vec![format!(
                "{} is attached without BPF_F_ALLOW_MULTI, so ours cannot attach next to it: detach it (`bpftool cgroup detach {} {} id {}`) or use another --cgroup-root",
                a.name,
                root.display(),
                a.attach_type,
                a.id
            )],
        );
    }
    if foreign.is_empty() {
        return Check::ok(name, detail);
    }
    let (rdr, others): (Vec<&Attached>, Vec<&Attached>) =
        foreign.iter().partition(|a| a.name.starts_with("rdr_"));
    let mut fix = Vec::new();
    if !rdr.is_empty() {
        fix.push(format!(
            "a redirector whose pins are not under {} is attached here: pass its --pin-root, or remove it with `redirector uninstall --pin-root <its pin root>` before starting another",
            pins_hint(ours)
        ));
    }
    if !others.is_empty() {
        let names: Vec<&str> = others.iter().map(|a| a.name.as_str()).collect();
        fix.push(format!(
            "{} run on the same hooks as ours (every program runs, in attach order): make sure none of them rewrites or blocks the connects of enabled pods",
            names.join(", ")
        ));
    }
    Check::warn(name, detail, fix)
}

fn pins_hint(ours: &BTreeSet<u32>) -> &'static str {
    if ours.is_empty() {
        "this --pin-root (none found there)"
    } else {
        "this --pin-root"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Level;

    #[test]
    fn hooks_ours_foreign_and_exclusive() {
        let a = |id, t: &str, flags: &str, name: &str| Attached {
            id,
            attach_type: t.into(),
            attach_flags: flags.into(),
            name: name.into(),
        };
        let ours: BTreeSet<u32> = [1, 2, 3].into();
        let mine = vec![
            a(1, "cgroup_inet4_connect", "multi", "rdr_connect4"),
            a(2, "cgroup_inet6_connect", "multi", "rdr_connect6"),
            a(3, "cgroup_sock_ops", "multi", "rdr_sockops"),
        ];
        let root = Path::new("/sys/fs/cgroup");
        let c = judge_hooks(root, &mine, &mine, &ours);
        assert_eq!(c.level, Level::Ok, "{c:?}");
        assert!(
            c.detail
                .contains("rdr_connect4 id 1 on cgroup_inet4_connect [multi] (ours)"),
            "{c:?}"
        );
        let mut more = mine.clone();
        more.push(a(9, "cgroup_inet4_connect", "multi", "cil_sock4_conne"));
        more.push(a(10, "cgroup_skb_ingress", "multi", "unrelated"));
        let c = judge_hooks(root, &more, &more, &ours);
        assert_eq!(c.level, Level::Warn, "{c:?}");
        assert!(
            c.detail.contains("cil_sock4_conne id 9")
                && c.detail.contains("not ours")
                && !c.detail.contains("unrelated"),
            "{c:?}"
        );
        let c = judge_hooks(
            root,
            &[a(7, "cgroup_inet4_connect", "", "legacy")],
            &[],
            &ours,
        );
        assert_eq!(c.level, Level::Fail, "{c:?}");
        assert!(
            c.fix[0].contains("bpftool cgroup detach /sys/fs/cgroup cgroup_inet4_connect id 7"),
            "{c:?}"
        );
        let c = judge_hooks(
            root,
            &[],
            &[a(5, "cgroup_inet4_connect", "multi", "rdr_connect4")],
            &ours,
        );
        assert!(
            c.level == Level::Warn
                && c.detail.contains("inherited")
                && c.detail.contains("a redirector with another pin root"),
            "{c:?}"
        );
        assert!(
            c.fix[0].contains("redirector uninstall --pin-root"),
            "{c:?}"
        );
        assert_eq!(parse_bpftool("").unwrap(), Vec::new());
        let parsed = parse_bpftool(r#"[{"id":236,"attach_type":"cgroup_inet4_connect","attach_flags":"multi","name":"rdr_connect4"}]"#).unwrap();
        assert_eq!(parsed[0].id, 236);
    }
}

//! `serve --user`: a router started as root binds its listeners, hands what its workers
//! need to the user (the snapshots' files, a cgroup of its own), then becomes that user for
//! good. Its workers, spawned as that user, jail themselves in user namespaces inside the
//! delegated cgroup (`supermachine_worker::jail`): nothing of the router stays privileged.

use std::path::PathBuf;

use nix::unistd::{Gid, Uid};
use supermachine_worker::jail::{self, cgroup, JailConfig};
use supermachine_worker::snapshot::Snapshot;

use crate::RouterError;

/// Who the router becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (a named user's, from the group database: `kvm` among them is
    /// how it reaches /dev/kvm).
    pub groups: Vec<u32>,
}

impl RunAs {
    /// `NAME`, `UID` or `UID:GID`; the error names what was not found.
    pub fn parse(user: &str) -> Result<RunAs, String> {
        let number = |s: &str| s.parse::<u32>().ok();
        if let Some((u, g)) = user.split_once(':') {
            return match (number(u), number(g)) {
                (Some(uid), Some(gid)) => Ok(RunAs {
                    uid,
                    gid,
                    groups: vec![gid],
                }),
                _ => Err(format!("--user {user:?}: expected NAME, UID or UID:GID")),
            };
        }
        if let Some(uid) = number(user) {
            let gid = nix::unistd::User::from_uid(Uid::from_raw(uid))
                .ok()
                .flatten()
                .map_or(uid, |u| u.gid.as_raw());
            return Ok(RunAs {
                uid,
                gid,
                groups: vec![gid],
            });
        }
        let u = nix::unistd::User::from_name(user)
            .map_err(|e| format!("--user {user:?}: reading the user database: {e}"))?
            .ok_or_else(|| format!("--user {user:?}: no such user"))?;
        let name = std::ffi::CString::new(user).map_err(|_| format!("--user {user:?}"))?;
        let groups = nix::unistd::getgrouplist(&name, u.gid)
            .map_err(|e| format!("--user {user:?}: its groups: {e}"))?;
        Ok(RunAs {
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
            groups: groups.into_iter().map(|g| g.as_raw()).collect(),
        })
    }
}

fn jail_error(e: jail::JailError) -> RouterError {
    RouterError::Config(format!("--user: {e}"))
}

/// Becomes `user` once and for all, after handing it what workers of `snapshots` need.
/// Call with every listener bound and before any worker starts.
pub fn drop_to(user: &RunAs, snapshots: &[PathBuf]) -> Result<(), RouterError> {
    if user.uid == 0 {
        return Err(RouterError::Config("--user: that is root".into()));
    }
    if !Uid::effective().is_root() {
        return Err(RouterError::Config(
            "--user: the router must start as root to drop to another user".into(),
        ));
    }
    let paths = snapshots
        .iter()
        .map(|d| Snapshot::open(d).map(|s| supermachine_worker::process::jail_paths(&s, &[])))
        .collect::<Result<Vec<_>, _>>()?;
    let jail_cfg = JailConfig::current();
    if jail_cfg.enabled {
        for p in &paths {
            jail::share_with(p, user.uid, user.gid).map_err(jail_error)?;
        }
        cgroup::remove_stale_delegations();
        let group = cgroup::delegate(
            &format!("router-{}", std::process::id()),
            user.uid,
            user.gid,
            jail_cfg.cpus.is_some(),
        )
        .map_err(jail_error)?;
        tracing::info!(%group, "VM cgroups delegated");
        JailConfig::set_default(JailConfig {
            cgroup: Some(group),
            ..jail_cfg
        });
    }
    let groups: Vec<Gid> = user.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    let (u, g) = (Uid::from_raw(user.uid), Gid::from_raw(user.gid));
    // glibc applies each of these to every thread of the process; leaving uid 0 (keepcaps
    // off) clears every thread's capabilities.
    let sys =
        |what: &str, e: nix::errno::Errno| RouterError::Config(format!("--user: {what}: {e}"));
    nix::unistd::setgroups(&groups).map_err(|e| sys("setgroups", e))?;
    nix::unistd::setresgid(g, g, g).map_err(|e| sys("setresgid", e))?;
    nix::unistd::setresuid(u, u, u).map_err(|e| sys("setresuid", e))?;
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(RouterError::Config("--user: root could be regained".into()));
    }
    tracing::info!(uid = user.uid, gid = user.gid, "router dropped root");
    if jail_cfg.enabled {
        for p in &paths {
            jail::check_reachable(p).map_err(jail_error)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::RunAs;

    #[test]
    fn users_by_number_and_name() {
        assert_eq!(
            RunAs::parse("1234:5678"),
            Ok(RunAs {
                uid: 1234,
                gid: 5678,
                groups: vec![5678]
            })
        );
        let nobody = RunAs::parse("nobody").unwrap();
        assert_eq!(nobody.uid, 65534);
        assert!(RunAs::parse("no-such-user-here")
            .unwrap_err()
            .contains("no such user"));
        assert!(RunAs::parse("1:x").unwrap_err().contains("UID:GID"));
    }
}

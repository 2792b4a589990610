//! What a worker's jail is made of, as the host chooses it and passes it on the worker's
//! command line.

use std::sync::Mutex;

/// The jail of each worker process (see [`crate::jail`]). On by default.
#[derive(Debug, Clone, PartialEq)]
pub struct JailConfig {
    /// false: the worker runs as its parent does (`--no-jail`, for debugging).
    pub enabled: bool,
    /// Each worker runs as one uid (and gid) from this range, not in use by another live
    /// worker on the host.
    pub uids: (u32, u32),
    /// The cgroup's memory limit: the snapshot's guest memory plus this much for the
    /// monitor (page tables, device state, QEMU's translation cache).
    pub memory_overhead_mib: u32,
    /// A fixed memory limit in place of guest memory + overhead.
    pub memory_max_mib: Option<u32>,
    /// The cgroup's process limit (threads count: a thread per connection).
    pub pids_max: u32,
    /// CPU limit in CPUs (cgroup cpu quota), none by default.
    pub cpus: Option<f64>,
    /// A cgroup delegated to the (non-root) user workers run as — `NAME` is
    /// `/sys/fs/cgroup/NAME` on v2, under each controller on v1 — in which each worker
    /// makes its VM's group with the limits above. Root ignores it (its workers' groups go
    /// under `supermachine/`); without it a non-root worker has no cgroup.
    pub cgroup: Option<String>,
    /// Debug builds only, for tests: a handoff whose bytes carry
    /// [`crate::jail::seccomp::TEST_TRIGGER`] makes the worker call a forbidden syscall.
    #[doc(hidden)]
    pub test_forbidden_syscall: bool,
}

/// The default uid range: far above any Debian system or user account (ids up to
/// 59999 are theirs, 65534 is nobody) and below the 100000+ subuid blocks.
pub const DEFAULT_UIDS: (u32, u32) = (70000, 99999);

/// Measured on the QEMU backend (TCG, 256 MiB guest): a worker and its QEMU use about
/// 190 MiB besides guest RAM; kvm needs far less. Round up so a busy guest is not killed.
pub const DEFAULT_MEMORY_OVERHEAD_MIB: u32 = 384;

pub const DEFAULT_PIDS_MAX: u32 = 512;

impl Default for JailConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            uids: DEFAULT_UIDS,
            memory_overhead_mib: DEFAULT_MEMORY_OVERHEAD_MIB,
            memory_max_mib: None,
            pids_max: DEFAULT_PIDS_MAX,
            cpus: None,
            cgroup: None,
            test_forbidden_syscall: false,
        }
    }
}

static DEFAULT: Mutex<Option<JailConfig>> = Mutex::new(None);

impl JailConfig {
    /// What workers spawned by this process get: the one set by [`JailConfig::set_default`],
    /// else the default, off where `SUPERMACHINE_NO_JAIL=1`.
    pub fn current() -> JailConfig {
        if let Some(c) = DEFAULT.lock().ok().and_then(|g| g.clone()) {
            return c;
        }
        JailConfig::from_env().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "ignoring the jail settings of the environment");
            JailConfig::default()
        })
    }

    /// The default, changed by `SUPERMACHINE_NO_JAIL=1`, `SUPERMACHINE_JAIL_UIDS=A-B`,
    /// `SUPERMACHINE_JAIL_MEMORY_OVERHEAD_MIB`, `SUPERMACHINE_JAIL_MEMORY_MAX_MIB`,
    /// `SUPERMACHINE_JAIL_PIDS_MAX` and `SUPERMACHINE_JAIL_CPUS` (what the CLI's `--no-jail`
    /// and `--jail-*` flags set, so daemons and their workers inherit them). An error names
    /// the variable.
    pub fn from_env() -> Result<JailConfig, String> {
        let mut c = JailConfig::default();
        if std::env::var("SUPERMACHINE_NO_JAIL").is_ok_and(|v| v == "1") {
            c.enabled = false;
        }
        for (var, flag) in [
            ("SUPERMACHINE_JAIL_UIDS", "--jail-uids"),
            (
                "SUPERMACHINE_JAIL_MEMORY_OVERHEAD_MIB",
                "--jail-memory-overhead-mib",
            ),
            ("SUPERMACHINE_JAIL_MEMORY_MAX_MIB", "--jail-memory-max-mib"),
            ("SUPERMACHINE_JAIL_PIDS_MAX", "--jail-pids-max"),
            ("SUPERMACHINE_JAIL_CPUS", "--jail-cpus"),
            ("SUPERMACHINE_JAIL_CGROUP", "--jail-cgroup"),
        ] {
            if let Ok(v) = std::env::var(var) {
                c.apply_arg(flag, Some(&v))
                    .map_err(|e| format!("{var}: {e}"))?;
            }
        }
        Ok(c)
    }

    /// Sets the jail of every worker this process spawns from now on (the CLI's flags).
    pub fn set_default(c: JailConfig) {
        if let Ok(mut g) = DEFAULT.lock() {
            *g = Some(c);
        }
    }

    /// The worker's command-line arguments for this jail.
    pub fn to_args(&self) -> Vec<String> {
        if !self.enabled {
            return vec!["--no-jail".into()];
        }
        let mut a = vec![
            "--jail-uids".into(),
            format!("{}-{}", self.uids.0, self.uids.1),
            "--jail-memory-overhead-mib".into(),
            self.memory_overhead_mib.to_string(),
            "--jail-pids-max".into(),
            self.pids_max.to_string(),
        ];
        if let Some(m) = self.memory_max_mib {
            a.extend(["--jail-memory-max-mib".into(), m.to_string()]);
        }
        if let Some(c) = self.cpus {
            a.extend(["--jail-cpus".into(), c.to_string()]);
        }
        if let Some(g) = &self.cgroup {
            a.extend(["--jail-cgroup".into(), g.clone()]);
        }
        if self.test_forbidden_syscall {
            a.extend(["--test-forbidden-syscall".into(), "1".into()]);
        }
        a
    }

    /// Applies one worker argument (`flag`, `value`); false if `flag` is not a jail flag.
    pub fn apply_arg(&mut self, flag: &str, value: Option<&str>) -> Result<bool, String> {
        let need = || value.ok_or_else(|| format!("{flag} needs a value"));
        let num = |v: &str| {
            v.parse::<u32>()
                .map_err(|_| format!("{flag}: {v:?} is not a number"))
        };
        match flag {
            "--no-jail" => self.enabled = false,
            "--jail-uids" => self.uids = parse_uid_range(need()?)?,
            "--jail-memory-overhead-mib" => self.memory_overhead_mib = num(need()?)?,
            "--jail-memory-max-mib" => self.memory_max_mib = Some(num(need()?)?),
            "--jail-pids-max" => self.pids_max = num(need()?)?,
            "--jail-cgroup" => {
                let v = need()?;
                if v.is_empty()
                    || v.starts_with('/')
                    || v.split('/').any(|p| p.is_empty() || p == "." || p == "..")
                {
                    return Err(format!(
                        "{flag}: {v:?} is not a cgroup name (a relative path like \
                         user.slice/mine, no . or .. parts)"
                    ));
                }
                self.cgroup = Some(v.to_string());
            }
            "--test-forbidden-syscall" if cfg!(debug_assertions) => {
                self.test_forbidden_syscall = need()? == "1"
            }
            "--jail-cpus" => {
                let v = need()?;
                let c: f64 = v
                    .parse()
                    .ok()
                    .filter(|c: &f64| c.is_finite() && *c > 0.0)
                    .ok_or_else(|| format!("{flag}: {v:?} is not a positive number"))?;
                self.cpus = Some(c);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// `START-END`, inclusive, never uid 0.
pub fn parse_uid_range(s: &str) -> Result<(u32, u32), String> {
    let bad = || format!("bad uid range {s:?} (expected START-END, e.g. 70000-99999)");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (a, b): (u32, u32) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
    if a == 0 || b < a || b == u32::MAX {
        return Err(bad());
    }
    Ok((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_round_trip() {
        let c = JailConfig {
            memory_max_mib: Some(200),
            cpus: Some(0.5),
            cgroup: Some("delegated/to-me".into()),
            test_forbidden_syscall: cfg!(debug_assertions),
            ..JailConfig::default()
        };
        let args = c.to_args();
        let mut back = JailConfig::default();
        for pair in args.chunks(2) {
            assert!(back
                .apply_arg(&pair[0], pair.get(1).map(|s| s.as_str()))
                .unwrap());
        }
        assert_eq!(back, c);
        let mut off = JailConfig::default();
        off.apply_arg("--no-jail", None).unwrap();
        assert!(!off.enabled);
    }

    #[test]
    fn uid_ranges() {
        assert_eq!(parse_uid_range("100-200"), Ok((100, 200)));
        assert!(parse_uid_range("0-10").is_err());
        assert!(parse_uid_range("20-10").is_err());
        assert!(parse_uid_range("x").is_err());
        assert!(JailConfig::default()
            .apply_arg("--jail-pids-max", Some("lots"))
            .unwrap_err()
            .contains("--jail-pids-max"));
        for bad in ["/abs", "a/../b", "", "a//b"] {
            assert!(JailConfig::default()
                .apply_arg("--jail-cgroup", Some(bad))
                .unwrap_err()
                .contains("--jail-cgroup"));
        }
    }
}

//! Resolves the image's `User` (`name`, `uid`, `name:group`, `uid:gid`) against the image's
//! own /etc/passwd and /etc/group, as docker does.

use std::fs;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: String,
}

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("unable to find user {0}: no matching entries in passwd file")]
    NoUser(String),
    #[error("unable to find group {0}: no matching entries in group file")]
    NoGroup(String),
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

fn read_passwd(root: &Path) -> Vec<PasswdEntry> {
    let text = fs::read_to_string(root.join("etc/passwd")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 7 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_string(),
            })
        })
        .collect()
}

fn read_group(root: &Path) -> Vec<GroupEntry> {
    let text = fs::read_to_string(root.join("etc/group")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_string(),
                gid: f[2].parse().ok()?,
                members: f[3]
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect(),
            })
        })
        .collect()
}

pub fn resolve(spec: &str, new_root: &str) -> Result<Identity, UserError> {
    let root = Path::new(new_root);
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = read_passwd(root);
    let (uid, mut gid, home, name) = if user_part.is_empty() {
        let root_entry = passwd.iter().find(|p| p.uid == 0);
        (
            0,
            0,
            root_entry.map_or("/root".into(), |p| p.home.clone()),
            Some("root".to_string()),
        )
    } else if let Some(p) = passwd.iter().find(|p| p.name == user_part) {
        (p.uid, p.gid, p.home.clone(), Some(p.name.clone()))
    } else if let Ok(uid) = user_part.parse::<u32>() {
        match passwd.iter().find(|p| p.uid == uid) {
            Some(p) => (uid, p.gid, p.home.clone(), Some(p.name.clone())),
            None => (uid, 0, "/".to_string(), None),
        }
    } else {
        return Err(UserError::NoUser(user_part.to_string()));
    };
    let groups_db = read_group(root);
    if let Some(g) = group_part.filter(|g| !g.is_empty()) {
        gid = if let Some(e) = groups_db.iter().find(|e| e.name == g) {
            e.gid
        } else if let Ok(n) = g.parse::<u32>() {
            n
        } else {
            return Err(UserError::NoGroup(g.to_string()));
        };
    }
    let mut groups = vec![gid];
    if group_part.is_none() {
        if let Some(name) = &name {
            for e in &groups_db {
                if e.members.iter().any(|m| m == name) && !groups.contains(&e.gid) {
                    groups.push(e.gid);
                }
            }
        }
    }
    Ok(Identity {
        uid,
        gid,
        groups,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("etc")).unwrap();
        fs::write(
            d.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001:App:/home/app:/bin/sh\n",
        )
        .unwrap();
        fs::write(
            d.path().join("etc/group"),
            "root:x:0:\napp:x:1001:\nextra:x:2000:app\n",
        )
        .unwrap();
        d
    }

    #[test]
    fn names_numbers_and_groups() {
        let d = root();
        let r = d.path().to_str().unwrap();
        let app = resolve("app", r).unwrap();
        assert_eq!(
            (app.uid, app.gid, app.home.as_str()),
            (1000, 1001, "/home/app")
        );
        assert_eq!(app.groups, vec![1001, 2000]);
        assert_eq!(resolve("1000:extra", r).unwrap().gid, 2000);
        assert_eq!(
            resolve("4242", r).unwrap(),
            Identity {
                uid: 4242,
                gid: 0,
                groups: vec![0],
                home: "/".into()
            }
        );
        assert_eq!(resolve("", r).unwrap().uid, 0);
        assert!(matches!(resolve("nobody", r), Err(UserError::NoUser(_))));
        assert!(matches!(
            resolve("app:nogroup", r),
            Err(UserError::NoGroup(_))
        ));
    }
}

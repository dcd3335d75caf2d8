//! User lookups from `/etc/passwd` and `/etc/group` (the static agent has
//! no NSS): name or uid to uid, gid, supplementary groups, home and shell.

use std::path::Path;

use crate::protocol::UserSpec;

/// Everything needed to run a process as a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    /// Supplementary groups, the primary group included.
    pub groups: Vec<libc::gid_t>,
    pub home: String,
    pub shell: String,
}

/// A user that cannot be resolved.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("no user {0:?} in the guest's /etc/passwd")]
    UnknownName(String),
}

/// Resolves `spec` (the agent's own uid when `None`).
pub fn resolve(passwd: &Path, group: &Path, spec: Option<&UserSpec>) -> Result<User, UserError> {
    let passwd = std::fs::read_to_string(passwd).unwrap_or_default();
    let group = std::fs::read_to_string(group).unwrap_or_default();
    // SAFETY: getuid has no preconditions.
    let own_uid = unsafe { libc::getuid() };
    let spec = spec.cloned().unwrap_or(UserSpec::Uid(own_uid));
    let mut user = match &spec {
        UserSpec::Name(name) => find_passwd(&passwd, |u| &u.name == name)
            .ok_or_else(|| UserError::UnknownName(name.clone()))?,
        UserSpec::Uid(uid) => find_passwd(&passwd, |u| u.uid == *uid).unwrap_or_else(|| User {
            name: if *uid == 0 {
                "root".into()
            } else {
                uid.to_string()
            },
            uid: *uid,
            gid: *uid,
            groups: Vec::new(),
            home: if *uid == 0 {
                "/root".into()
            } else {
                "/".into()
            },
            shell: "/bin/sh".into(),
        }),
    };
    user.groups = groups_of(&group, &user.name, user.gid);
    Ok(user)
}

/// Parses one `name:x:uid:gid:gecos:home:shell` line.
fn parse_passwd_line(line: &str) -> Option<User> {
    let f: Vec<&str> = line.split(':').collect();
    if f.len() < 7 || line.starts_with('#') {
        return None;
    }
    Some(User {
        name: f[0].to_string(),
        uid: f[2].parse().ok()?,
        gid: f[3].parse().ok()?,
        groups: Vec::new(),
        home: f[5].to_string(),
        shell: if f[6].is_empty() {
            "/bin/sh".into()
        } else {
            f[6].to_string()
        },
    })
}

fn find_passwd(passwd: &str, pred: impl Fn(&User) -> bool) -> Option<User> {
    passwd
        .lines()
        .filter_map(parse_passwd_line)
        .find(|u| pred(u))
}

/// The primary group plus every `/etc/group` entry listing `name`.
fn groups_of(group: &str, name: &str, primary: libc::gid_t) -> Vec<libc::gid_t> {
    let mut out = vec![primary];
    for line in group.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 {
            continue;
        }
        let Ok(gid) = f[2].parse::<libc::gid_t>() else {
            continue;
        };
        if f[3].split(',').any(|m| m.trim() == name) && !out.contains(&gid) {
            out.push(gid);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_and_groups() {
        let dir = std::env::temp_dir().join(format!("ks-users-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (p, g) = (dir.join("passwd"), dir.join("group"));
        std::fs::write(
            &p,
            "root:x:0:0:root:/root:/bin/bash\n# comment\ndev:x:1000:1000:Dev:/home/dev:\n",
        )
        .unwrap();
        std::fs::write(&g, "dev:x:1000:\nwheel:x:10:root,dev\ndocker:x:999:dev\n").unwrap();
        let dev = resolve(&p, &g, Some(&UserSpec::Name("dev".into()))).unwrap();
        assert_eq!((dev.uid, dev.gid), (1000, 1000));
        assert_eq!(dev.groups, vec![1000, 10, 999]);
        assert_eq!(dev.home, "/home/dev");
        assert_eq!(dev.shell, "/bin/sh");
        let root = resolve(&p, &g, Some(&UserSpec::Uid(0))).unwrap();
        assert_eq!(root.name, "root");
        assert_eq!(root.groups, vec![0, 10]);
        let anon = resolve(&p, &g, Some(&UserSpec::Uid(4242))).unwrap();
        assert_eq!((anon.uid, anon.gid, anon.home.as_str()), (4242, 4242, "/"));
        assert!(resolve(&p, &g, Some(&UserSpec::Name("nobody-here".into()))).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

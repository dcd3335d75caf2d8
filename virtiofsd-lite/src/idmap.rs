//! UID/GID translation between the guest and the host, configured with the
//! same rule syntax as virtiofsd's `--translate-uid`/`--translate-gid`:
//! `<kind>:<from>:<to>:<count>` (any one non-alphanumeric character may
//! separate the fields; the first one found is used throughout):
//!
//! | kind | direction | meaning |
//! |---|---|---|
//! | `guest` | guest → host | `from..from+count` maps 1:1 onto `to..` |
//! | `host` | host → guest | `from..from+count` maps 1:1 onto `to..` |
//! | `squash-guest` | guest → host | every ID of the range becomes `to` |
//! | `squash-host` | host → guest | every ID of the range becomes `to` |
//! | `forbid-guest:<from>:<count>` | guest → host | creating a file as, or giving a file to, these IDs fails with `EPERM` |
//! | `map:<guest>:<host>:<count>` | both | 1:1 both ways |
//!
//! IDs no rule covers pass unchanged. Ranges of one direction may not
//! overlap, so the order of the rules never matters.
//!
//! Guest → host applies to the credentials files are created with and to
//! the owner a SETATTR sets; host → guest applies to every attribute the
//! guest is sent. The typical use is a daemon that does not run as root:
//! `squash-guest:0:<uid>:4294967295` makes every guest user's files the
//! daemon user's (a guest `chown` then succeeds instead of failing with
//! `EPERM`), and `host:<uid>:1000:1` shows them to the guest as its user
//! 1000's.

use std::fmt;
use std::str::FromStr;

/// One translation rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdRule {
    /// Guest `from..from+count` → host `to..`.
    Guest { from: u32, to: u32, count: u32 },
    /// Host `from..from+count` → guest `to..`.
    Host { from: u32, to: u32, count: u32 },
    /// Guest `from..from+count` → host `to`.
    SquashGuest { from: u32, to: u32, count: u32 },
    /// Host `from..from+count` → guest `to`.
    SquashHost { from: u32, to: u32, count: u32 },
    /// Guest `from..from+count` may not own files.
    ForbidGuest { from: u32, count: u32 },
    /// Guest `guest..` ↔ host `host..`, `count` IDs.
    Map { guest: u32, host: u32, count: u32 },
}

/// The half-open range `[start, start + count)` as `u64` bounds.
fn span(start: u32, count: u32) -> (u64, u64) {
    (u64::from(start), u64::from(start) + u64::from(count))
}

impl IdRule {
    /// The guest IDs this rule translates to the host, if any.
    fn guest_range(&self) -> Option<(u64, u64)> {
        match *self {
            IdRule::Guest { from, count, .. }
            | IdRule::SquashGuest { from, count, .. }
            | IdRule::ForbidGuest { from, count } => Some(span(from, count)),
            IdRule::Map { guest, count, .. } => Some(span(guest, count)),
            IdRule::Host { .. } | IdRule::SquashHost { .. } => None,
        }
    }

    /// The host IDs this rule translates to the guest, if any.
    fn host_range(&self) -> Option<(u64, u64)> {
        match *self {
            IdRule::Host { from, count, .. } | IdRule::SquashHost { from, count, .. } => {
                Some(span(from, count))
            }
            IdRule::Map { host, count, .. } => Some(span(host, count)),
            _ => None,
        }
    }

    /// The ranges this rule maps onto, which must fit in 32 bits.
    fn targets(&self) -> Option<(u64, u64)> {
        match *self {
            IdRule::Guest { to, count, .. } | IdRule::Host { to, count, .. } => {
                Some(span(to, count))
            }
            IdRule::Map { guest, host, count } => {
                let (g, h) = (span(guest, count), span(host, count));
                Some(if g.1 > h.1 { g } else { h })
            }
            _ => None,
        }
    }

    fn count(&self) -> u32 {
        match *self {
            IdRule::Guest { count, .. }
            | IdRule::Host { count, .. }
            | IdRule::SquashGuest { count, .. }
            | IdRule::SquashHost { count, .. }
            | IdRule::ForbidGuest { count, .. }
            | IdRule::Map { count, .. } => count,
        }
    }
}

impl FromStr for IdRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let sep = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
            .ok_or_else(|| format!("ID map {s:?}: expected <kind>:<from>:<to>:<count>"))?;
        let mut parts = s.split(sep);
        let kind = parts.next().unwrap_or_default().to_ascii_lowercase();
        let numbers = parts
            .map(|p| {
                p.parse::<u32>()
                    .map_err(|e| format!("ID map {s:?}: {p:?} is not an ID: {e}"))
            })
            .collect::<Result<Vec<u32>, String>>()?;
        let want = if kind == "forbid-guest" { 2 } else { 3 };
        if numbers.len() != want {
            return Err(format!(
                "ID map {s:?}: {kind} takes {want} numbers, found {}",
                numbers.len()
            ));
        }
        let (a, b) = (numbers[0], numbers[1]);
        let c = numbers.get(2).copied().unwrap_or_default();
        let rule = match kind.as_str() {
            "guest" => IdRule::Guest {
                from: a,
                to: b,
                count: c,
            },
            "host" => IdRule::Host {
                from: a,
                to: b,
                count: c,
            },
            "squash-guest" => IdRule::SquashGuest {
                from: a,
                to: b,
                count: c,
            },
            "squash-host" => IdRule::SquashHost {
                from: a,
                to: b,
                count: c,
            },
            "forbid-guest" => IdRule::ForbidGuest { from: a, count: b },
            "map" => IdRule::Map {
                guest: a,
                host: b,
                count: c,
            },
            other => {
                return Err(format!(
                    "ID map {s:?}: unknown kind {other:?} (guest, host, squash-guest, \
                     squash-host, forbid-guest or map)"
                ))
            }
        };
        rule.check().map_err(|e| format!("ID map {s:?}: {e}"))?;
        Ok(rule)
    }
}

impl IdRule {
    /// Refuses an empty range and one that passes the largest ID.
    fn check(&self) -> Result<(), String> {
        if self.count() == 0 {
            return Err("the count is 0".into());
        }
        let limit = u64::from(u32::MAX) + 1;
        let ranges = [self.guest_range(), self.host_range(), self.targets()];
        if ranges.iter().flatten().any(|&(_, end)| end > limit) {
            return Err("the range passes 4294967295".into());
        }
        Ok(())
    }
}

impl fmt::Display for IdRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            IdRule::Guest { from, to, count } => write!(f, "guest:{from}:{to}:{count}"),
            IdRule::Host { from, to, count } => write!(f, "host:{from}:{to}:{count}"),
            IdRule::SquashGuest { from, to, count } => {
                write!(f, "squash-guest:{from}:{to}:{count}")
            }
            IdRule::SquashHost { from, to, count } => write!(f, "squash-host:{from}:{to}:{count}"),
            IdRule::ForbidGuest { from, count } => write!(f, "forbid-guest:{from}:{count}"),
            IdRule::Map { guest, host, count } => write!(f, "map:{guest}:{host}:{count}"),
        }
    }
}

/// A guest ID that a `forbid-guest` rule refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forbidden;

/// The translation of one kind of ID (UIDs or GIDs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdMap {
    rules: Vec<IdRule>,
}

impl IdMap {
    /// A map from `rules`; ranges of one direction may not overlap.
    pub fn new(rules: Vec<IdRule>) -> Result<Self, String> {
        for (i, a) in rules.iter().enumerate() {
            a.check().map_err(|e| format!("ID map {a}: {e}"))?;
            for b in &rules[..i] {
                let overlap = |x: Option<(u64, u64)>, y: Option<(u64, u64)>| matches!((x, y), (Some(x), Some(y)) if x.0 < y.1 && y.0 < x.1);
                if overlap(a.guest_range(), b.guest_range()) {
                    return Err(format!("ID maps {b} and {a} cover the same guest IDs"));
                }
                if overlap(a.host_range(), b.host_range()) {
                    return Err(format!("ID maps {b} and {a} cover the same host IDs"));
                }
            }
        }
        Ok(IdMap { rules })
    }

    /// Whether every ID passes unchanged.
    pub fn is_identity(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules, in the order given.
    pub fn rules(&self) -> &[IdRule] {
        &self.rules
    }

    /// The host ID for a guest ID.
    pub fn to_host(&self, id: u32) -> Result<u32, Forbidden> {
        let within = |from: u32, count: u32| id >= from && u64::from(id - from) < u64::from(count);
        for rule in &self.rules {
            match *rule {
                IdRule::Guest { from, to, count } if within(from, count) => {
                    return Ok(to + (id - from))
                }
                IdRule::Map { guest, host, count } if within(guest, count) => {
                    return Ok(host + (id - guest))
                }
                IdRule::SquashGuest { from, to, count } if within(from, count) => return Ok(to),
                IdRule::ForbidGuest { from, count } if within(from, count) => {
                    return Err(Forbidden)
                }
                _ => {}
            }
        }
        Ok(id)
    }

    /// The guest ID for a host ID.
    pub fn to_guest(&self, id: u32) -> u32 {
        let within = |from: u32, count: u32| id >= from && u64::from(id - from) < u64::from(count);
        for rule in &self.rules {
            match *rule {
                IdRule::Host { from, to, count } if within(from, count) => return to + (id - from),
                IdRule::Map { guest, host, count } if within(host, count) => {
                    return guest + (id - host)
                }
                IdRule::SquashHost { from, to, count } if within(from, count) => return to,
                _ => {}
            }
        }
        id
    }
}

/// UID and GID translation together.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdMaps {
    pub uid: IdMap,
    pub gid: IdMap,
}

impl IdMaps {
    /// Whether both maps pass every ID unchanged.
    pub fn is_identity(&self) -> bool {
        self.uid.is_identity() && self.gid.is_identity()
    }

    /// The maps a daemon running as `host_uid:host_gid` (not root) uses to
    /// show the guest user `guest_uid:guest_gid` the files it owns, and to
    /// turn every guest owner into the daemon user on the host.
    pub fn unprivileged(host_uid: u32, host_gid: u32, guest_uid: u32, guest_gid: u32) -> Self {
        let side = |host: u32, guest: u32| IdMap {
            rules: vec![
                IdRule::SquashGuest {
                    from: 0,
                    to: host,
                    count: u32::MAX,
                },
                IdRule::Host {
                    from: host,
                    to: guest,
                    count: 1,
                },
            ],
        };
        IdMaps {
            uid: side(host_uid, guest_uid),
            gid: side(host_gid, guest_gid),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(rules: &[&str]) -> Result<IdMap, String> {
        let rules = rules
            .iter()
            .map(|r| r.parse())
            .collect::<Result<Vec<IdRule>, String>>()?;
        IdMap::new(rules)
    }

    #[test]
    fn parses_virtiofsd_syntax_with_any_separator() {
        let r: IdRule = "map:1000:5000:10".parse().unwrap();
        assert_eq!(
            r,
            IdRule::Map {
                guest: 1000,
                host: 5000,
                count: 10
            }
        );
        let r: IdRule = "squash-guest/0/1001/4294967295".parse().unwrap();
        assert_eq!(
            r,
            IdRule::SquashGuest {
                from: 0,
                to: 1001,
                count: u32::MAX
            }
        );
        let r: IdRule = "FORBID-GUEST:0:1".parse().unwrap();
        assert_eq!(r, IdRule::ForbidGuest { from: 0, count: 1 });
        assert_eq!(r.to_string(), "forbid-guest:0:1");
    }

    #[test]
    fn rejects_malformed_rules_with_the_reason() {
        for (text, says) in [
            ("map", "expected"),
            ("map:1:2", "takes 3 numbers"),
            ("forbid-guest:1:2:3", "takes 2 numbers"),
            ("guest:a:1:1", "not an ID"),
            ("sideways:1:2:3", "unknown kind"),
            ("host:1:2:0", "count is 0"),
            ("guest:4294967295:0:2", "passes 4294967295"),
            ("host:0:4294967290:10", "passes 4294967295"),
        ] {
            let e = text.parse::<IdRule>().unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn overlapping_ranges_of_one_direction_are_refused() {
        let e = map(&["guest:0:100:10", "squash-guest:5:1:1"]).unwrap_err();
        assert!(e.contains("same guest IDs"), "{e}");
        let e = map(&["map:0:100:10", "host:109:0:1"]).unwrap_err();
        assert!(e.contains("same host IDs"), "{e}");
        // One rule per direction over the same numbers is fine.
        map(&["guest:0:100:10", "host:0:100:10"]).unwrap();
    }

    #[test]
    fn translates_each_kind_and_passes_the_rest() {
        let m = map(&[
            "map:1000:5000:10",
            "squash-guest:2000:7:100",
            "forbid-guest:0:1",
            "squash-host:9000:65534:10",
            "host:42:43:1",
        ])
        .unwrap();
        assert_eq!(m.to_host(1000), Ok(5000));
        assert_eq!(m.to_host(1009), Ok(5009));
        assert_eq!(m.to_host(1010), Ok(1010));
        assert_eq!(m.to_host(2099), Ok(7));
        assert_eq!(m.to_host(0), Err(Forbidden));
        assert_eq!(m.to_guest(5003), 1003);
        assert_eq!(m.to_guest(9005), 65534);
        assert_eq!(m.to_guest(42), 43);
        assert_eq!(m.to_guest(7), 7);
        assert!(IdMap::default().is_identity());
        assert_eq!(IdMap::default().to_host(u32::MAX), Ok(u32::MAX));
    }

    #[test]
    fn unprivileged_shows_the_daemon_users_files_as_the_guest_users() {
        let m = IdMaps::unprivileged(1234, 999, 1000, 1000);
        assert_eq!(m.uid.to_host(0), Ok(1234));
        assert_eq!(m.uid.to_host(1000), Ok(1234));
        assert_eq!(m.uid.to_host(u32::MAX - 1), Ok(1234));
        assert_eq!(m.uid.to_guest(1234), 1000);
        assert_eq!(m.gid.to_guest(999), 1000);
        assert_eq!(m.uid.to_guest(0), 0);
    }
}

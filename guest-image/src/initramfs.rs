//! A minimal initramfs for the guest: an uncompressed `newc` cpio archive
//! holding the guest agent as `/init` (mode 0755), the directories it
//! mounts on (`/dev`, `/proc`, `/sys`, `/run`, `/tmp`) and `/dev/console`
//! (character device 5:1, so the kernel can open the console before
//! devtmpfs is mounted).
//!
//! `newc` entry: the ASCII magic `070701`, thirteen 8-digit hex fields
//! (ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
//! rdevmajor, rdevminor, namesize with the NUL, check), the name and its
//! NUL padded to 4 bytes, then the data padded to 4 bytes. The archive ends
//! with an entry named `TRAILER!!!`.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

/// One archive member.
struct Entry<'a> {
    name: &'a str,
    mode: u32,
    rdev: (u32, u32),
    data: &'a [u8],
}

/// Appends one `newc` entry to `out`.
fn write_entry(out: &mut Vec<u8>, ino: u32, e: &Entry<'_>) {
    let nlink = if e.mode & S_IFDIR != 0 { 2 } else { 1 };
    let fields = [
        ino,
        e.mode,
        0,
        0,
        nlink,
        0,
        e.data.len() as u32,
        0,
        0,
        e.rdev.0,
        e.rdev.1,
        e.name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(e.name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(e.data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

/// A `newc` archive being built, entry by entry.
#[derive(Default)]
pub struct Archive {
    out: Vec<u8>,
    entries: u32,
}

impl Archive {
    pub fn new() -> Self {
        Self::default()
    }

    fn add(&mut self, e: &Entry<'_>) -> &mut Self {
        self.entries += 1;
        write_entry(&mut self.out, self.entries, e);
        self
    }

    /// A directory with permission bits `perm`.
    pub fn dir(&mut self, name: &str, perm: u32) -> &mut Self {
        self.add(&Entry {
            name,
            mode: S_IFDIR | perm,
            rdev: (0, 0),
            data: &[],
        })
    }

    /// A regular file with permission bits `perm`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> &mut Self {
        self.add(&Entry {
            name,
            mode: S_IFREG | perm,
            rdev: (0, 0),
            data,
        })
    }

    /// A character device node.
    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> &mut Self {
        self.add(&Entry {
            name,
            mode: S_IFCHR | perm,
            rdev: (major, minor),
            data: &[],
        })
    }

    /// The archive: the trailer, then zeros to a multiple of 512 bytes
    /// (as cpio(1) pads).
    pub fn finish(mut self) -> Vec<u8> {
        write_entry(
            &mut self.out,
            0,
            &Entry {
                name: "TRAILER!!!",
                mode: 0,
                rdev: (0, 0),
                data: &[],
            },
        );
        while self.out.len() % 512 != 0 {
            self.out.push(0);
        }
        self.out
    }
}

/// Builds the archive bytes around an agent binary's contents.
pub fn agent_initramfs_bytes(agent: &[u8]) -> Vec<u8> {
    let mut a = Archive::new();
    a.dir("dev", 0o755)
        .char_dev("dev/console", 0o600, 5, 1)
        .dir("proc", 0o755)
        .dir("sys", 0o755)
        .dir("run", 0o755)
        .dir("tmp", 0o1777)
        .file("init", 0o755, agent);
    a.finish()
}

/// Writes an initramfs with `agent_binary` as `/init` to `out`.
pub fn write_agent_initramfs(agent_binary: &Path, out: &Path) -> io::Result<()> {
    let agent = fs::read(agent_binary)?;
    let bytes = agent_initramfs_bytes(&agent);
    let tmp = out.with_extension("tmp");
    let mut f = fs::File::create(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, mode, rdev, data) of an entry.
    type Parsed = (String, u32, (u32, u32), Vec<u8>);

    /// Every entry, trailer included.
    fn parse(mut buf: &[u8]) -> Vec<Parsed> {
        let start_len = buf.len();
        let mut out = Vec::new();
        loop {
            assert_eq!(&buf[..6], b"070701", "magic");
            let field = |i: usize| {
                let s = std::str::from_utf8(&buf[6 + i * 8..14 + i * 8]).unwrap();
                u32::from_str_radix(s, 16).unwrap()
            };
            let (mode, size, namesize) = (field(1), field(6) as usize, field(11) as usize);
            let rdev = (field(9), field(10));
            let name_end = 110 + namesize;
            assert_eq!(buf[name_end - 1], 0, "name is NUL-terminated");
            let name = String::from_utf8(buf[110..name_end - 1].to_vec()).unwrap();
            let data_start = name_end.div_ceil(4) * 4;
            let data = buf[data_start..data_start + size].to_vec();
            let next = (data_start + size).div_ceil(4) * 4;
            let done = name == "TRAILER!!!";
            out.push((name, mode, rdev, data));
            buf = &buf[next..];
            if done {
                assert!(
                    buf.iter().all(|b| *b == 0),
                    "only padding after the trailer"
                );
                assert_eq!((start_len - buf.len()) % 4, 0);
                return out;
            }
        }
    }

    #[test]
    fn archive_parses_back() {
        let dir = std::env::temp_dir().join(format!("ks-initramfs-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let agent = dir.join("agent");
        let payload: Vec<u8> = (0..1001u32).map(|i| i as u8).collect();
        fs::write(&agent, &payload).unwrap();
        let out = dir.join("initramfs.cpio");
        write_agent_initramfs(&agent, &out).unwrap();
        let bytes = fs::read(&out).unwrap();
        assert_eq!(bytes.len() % 512, 0);
        let entries = parse(&bytes);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "proc",
                "sys",
                "run",
                "tmp",
                "init",
                "TRAILER!!!"
            ]
        );
        let get = |n: &str| entries.iter().find(|e| e.0 == n).unwrap();
        assert_eq!(get("init").1, S_IFREG | 0o755);
        assert_eq!(get("init").3, payload);
        assert_eq!(get("dev/console").1, S_IFCHR | 0o600);
        assert_eq!(get("dev/console").2, (5, 1));
        assert_eq!(get("proc").1, S_IFDIR | 0o755);
        assert_eq!(get("tmp").1, S_IFDIR | 0o1777);
        assert!(get("TRAILER!!!").3.is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }
}
